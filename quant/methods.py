"""One linear layer, one method: rtn | gptq | svd | lqer | qera | fbquant.

svd, lqer and qera are the sub-branch baselines without feedback (W_hat = Q(W) + BA, lowrank.py) on a
base quantizer Q that is RTN by default or GPTQ (`base="gptq"`: GPTQ + QERA is the strong baseline);
fbquant is W_F = Q(W - BA) + BA (fbquant.py), whose loop quantizer is GPTQ by default.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from torch import Tensor

from quant.fbquant import FBQuantConfig, fbquant
from quant.gptq import gptq, small_op_threads
from quant.lowrank import Whitener, branch_product, lqer_branch, relative_output_error, svd_branch, whitened_branch
from quant.quantizer import QuantizedWeight, bits_per_weight, check_format, quantize_rtn

METHODS = ("rtn", "gptq", "svd", "lqer", "qera", "fbquant")
BRANCH_METHODS = ("svd", "lqer", "qera", "fbquant")
BASES = ("rtn", "gptq")


@dataclass
class QuantConfig:
    """What `fbserve quantize` does to every decoder linear."""

    method: str = "fbquant"
    bits: int = 3
    group_size: int = 128
    rank: int = 32  # branch rank; ignored (0) for rtn and gptq
    base: str | None = None  # quantizer under the branch: None = rtn for svd/lqer/qera, gptq for fbquant
    damp: float = 0.01  # GPTQ damping relative to mean(diag H)
    act_order: bool = False
    fb: FBQuantConfig = field(default_factory=FBQuantConfig)
    # Quantize for QDEC: 0 = off; K = the Gram matrix is the one QDEC at k_chunk K leaves uncorrected,
    # H_qdec = X_m^T X_m + qdec_mix * X^T X with each token's K largest |x| per 1024-chunk zeroed in X_m
    # (quant/qdec.py, `qdec_gram`). The residual of those channels is fetched back at decode.
    qdec_k_chunk: int = 0
    qdec_mix: float = 1.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} unknown (choose from {', '.join(METHODS)})")
        check_format(self.bits, self.group_size)
        if self.base is not None and self.base not in BASES:
            raise ValueError(f"base quantizer {self.base!r} unknown (choose from {', '.join(BASES)})")
        if self.method in BRANCH_METHODS and self.rank <= 0:
            raise ValueError(f"method {self.method} needs --rank >= 1")
        if self.method not in BRANCH_METHODS:
            self.rank = 0
        if self.qdec_k_chunk < 0 or self.qdec_mix < 0:
            raise ValueError("--qdec-aware and --qdec-mix must be >= 0")
        if self.qdec_k_chunk and self.method in ("rtn", "svd", "lqer") and self.base_quantizer == "rtn":
            raise ValueError(f"--qdec-aware changes the Gram matrix, which --method {self.method} with RTN codes does not use")
        if self.qdec_k_chunk and self.qdec_mix == 0:
            raise ValueError("--qdec-mix 0 leaves always-salient channels unconstrained: use a share > 0")
        self.fb.damp, self.fb.act_order = self.damp, self.act_order
        self.fb.base = self.base_quantizer

    @property
    def base_quantizer(self) -> str:
        """The quantizer producing the codes: rtn, gptq, or the method itself."""
        if self.method in ("rtn", "gptq"):
            return self.method
        return self.base or ("gptq" if self.method == "fbquant" else "rtn")


class LinearStats:
    """Calibration statistics of one linear's input: Gram matrix H = X^T X / tokens (K, K) fp32, and
    LQER's s_k = max over calibration samples of mean |x_k| (K,). Shared by linears reading one input."""

    def __init__(self, h: Tensor, act_scale: Tensor | None, tokens: int) -> None:
        self.h, self.act_scale, self.tokens = h, act_scale, tokens

    @cached_property
    def whitener(self) -> Whitener:
        return Whitener(self.h)


@dataclass
class QuantizedLinear:
    qweight: QuantizedWeight
    a: Tensor | None  # fp16 (r, K)
    b: Tensor | None  # fp16 (N, r)
    error: float  # relative output error tr(E H E^T) / tr(W H W^T) on the calibration inputs
    history: list[float] = field(default_factory=list)  # FBQuant: start and every round

    def weight(self) -> Tensor:
        """The served weight in fp32 (N, K): dequant(codes) (+ B A), from the stored fp16 tensors."""
        w = self.qweight.dequantize()
        return w if self.a is None else w + branch_product(self.a, self.b)

    @property
    def rank(self) -> int:
        return 0 if self.a is None else int(self.a.shape[0])

    def bits_per_weight(self) -> float:
        n, k = self.qweight.codes.shape
        return bits_per_weight(n, k, self.qweight.bits, self.qweight.group_size, self.rank)


def quantize_linear(w: Tensor, stats: LinearStats, cfg: QuantConfig) -> QuantizedLinear:
    """Quantize one weight `w` (N, K) fp32 with `cfg.method`; runs on the device of `w`."""
    w = w.float()
    h = stats.h.to(w.device)
    with small_op_threads(w.device):
        if cfg.method == "fbquant":
            start = _base(w, h, cfg)
            r = fbquant(w, h, cfg.bits, cfg.group_size, cfg.rank, cfg.fb, stats.whitener, start=start)
            return QuantizedLinear(r.qweight, r.a, r.b, r.error, r.history)
        q = _base(w, h, cfg)
        a = b = None
        if cfg.method in BRANCH_METHODS:
            e = w - q.dequantize()
            if cfg.method == "svd":
                a, b = svd_branch(e, cfg.rank)
            elif cfg.method == "lqer":
                a, b = lqer_branch(e, cfg.rank, stats.act_scale.to(w.device))
            else:
                a, b = whitened_branch(e, cfg.rank, stats.whitener)
        out = QuantizedLinear(q, a, b, 0.0)
        out.error = relative_output_error(out.weight(), w, h)
        return out


def _base(w: Tensor, h: Tensor, cfg: QuantConfig) -> QuantizedWeight:
    if cfg.base_quantizer == "gptq":
        return gptq(w, h, cfg.bits, cfg.group_size, damp=cfg.damp, act_order=cfg.act_order)
    return quantize_rtn(w, cfg.bits, cfg.group_size, clip_search=True)
