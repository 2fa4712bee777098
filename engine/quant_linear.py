"""QuantLinear: a packed low-bit linear layer (+ optional low-rank branch and bias) that picks its
kernel path from the device and reports it.

Paths:
  triton     CUDA tensors: cuda_ext's Triton kernels (decode m <= 16 fused branch, prefill m > 16)
  cpu_int4   CPU tensors (converted once per .to()): fbserve's own kernel (cuda_ext/cpu_native.c: the
             codes at 2/3.25/4 bits per weight, the branch in the same call) where the CPU has AVX-512 BF16
             or AVX2 and a C compiler is present, else torch's int4 CPU matmul + the branch in fp32
             (kernel_paths() rows say which, key "decode", and why); calls of many rows (prefill) dequantize to bf16 for
             oneDNN's GEMM where the CPU has native bf16 (cuda_ext.cpu.bf16_prefill_rows; key "prefill")
  reference  cuda_ext.reference in fp32; only when asked (path="reference" or FBSERVE_KERNEL_PATH)
The environment variable FBSERVE_KERNEL_PATH (auto|triton|cpu_int4|reference) overrides the
default "auto".  A Triton failure on CUDA raises; with FBSERVE_KERNEL_FALLBACK=1 it logs an error,
switches that layer to the reference path and shows the reason in kernel_paths() instead.
"""
from __future__ import annotations

import logging
import os
import weakref

import torch
from torch import nn

from cuda_ext import (PackedWeight, block_diagonal_b, cpu_matmul, interpreting, prepare_cpu, quant_matmul,
                      quant_matmul_ref)
from cuda_ext.launch import check_segments
from cuda_ext.cpu import bf16_prefill_reason, bf16_prefill_rows
from cuda_ext.cpu_native import NativeGroup, NativeWeight, kernel_name, native_matmul, native_reason, prepare_native

log = logging.getLogger("fbserve.kernels")
PATHS = ("triton", "cpu_int4", "reference")
ENV_PATH = "FBSERVE_KERNEL_PATH"
ENV_FALLBACK = "FBSERVE_KERNEL_FALLBACK"

_LIVE: weakref.WeakSet = weakref.WeakSet()
_ANNOUNCED: set[tuple] = set()


class QuantLinear(nn.Module):
    """y = x @ dequant(Wq)^T (+ (x @ A^T) @ B^T) (+ bias).

    Buffers (the checkpoint's tensor names under the layer's prefix):
      qweight int32 / scales fp16 / zeros fp16 / qmeta int32 (5,): a cuda_ext.PackedWeight
      A fp16 (r, in_features), B fp16 (out_features, r): optional low-rank branch
      bias (out_features,): optional, any float dtype
    segments (engine.merge's merged layers only, never in a checkpoint): the merged layers' out_features;
    A then stacks one (r, in_features) block per layer and B (out_features, r) their B's, each output
    column using its own layer's block (cuda_ext.block_diagonal_b gives the matrix it stands for).
    forward: x (..., in_features) fp32/fp16/bf16 -> (..., out_features) in x's dtype.
    """

    def __init__(self, packed: PackedWeight, a: torch.Tensor | None = None, b: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, path: str | None = None,
                 segments: tuple[int, ...] | None = None) -> None:
        super().__init__()
        packed.validate()
        if (a is None) != (b is None):
            raise ValueError("the low-rank branch needs both A and B")
        self.segments = None if segments is None else check_segments(segments, packed.out_features)
        n_seg = 1 if self.segments is None else len(self.segments)
        if a is not None and (a.shape[1] != packed.in_features or b.shape[0] != packed.out_features
                              or a.shape[0] != n_seg * b.shape[1]):
            raise ValueError(f"A {tuple(a.shape)} / B {tuple(b.shape)} do not fit a "
                             f"{packed.out_features}x{packed.in_features} layer of {n_seg} segment(s)")
        self.bits, self.group_size = packed.bits, packed.group_size
        self.in_features, self.out_features = packed.in_features, packed.out_features
        self.register_buffer("qweight", packed.qweight)
        self.register_buffer("scales", packed.scales)
        self.register_buffer("zeros", packed.zeros)
        self.register_buffer("qmeta", packed.meta().to(packed.device))
        self.register_buffer("A", None if a is None else a.to(torch.float16))
        self.register_buffer("B", None if b is None else b.to(torch.float16))
        self.register_buffer("bias", bias)
        self.requested_path = path or os.environ.get(ENV_PATH, "auto")
        if self.requested_path not in PATHS + ("auto",):
            raise ValueError(f"kernel path {self.requested_path!r} unknown; choose auto or one of {PATHS}")
        self.path = ""
        self.fallback_reason: str | None = None
        self._cpu = self._native = None
        self._select_path()
        self.register_load_state_dict_post_hook(lambda module, _keys: module._select_path())
        _LIVE.add(self)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], prefix: str = "", path: str | None = None) -> QuantLinear:
        """Build from checkpoint tensors <prefix>qweight/scales/zeros/qmeta[/A/B/bias]."""
        return cls(PackedWeight.from_state_dict(sd, prefix), sd.get(prefix + "A"), sd.get(prefix + "B"),
                   sd.get(prefix + "bias"), path=path)

    @property
    def packed(self) -> PackedWeight:
        return PackedWeight(self.qweight, self.scales, self.zeros, self.bits, self.group_size,
                            self.in_features, self.out_features)

    @property
    def rank(self) -> int:
        """Rows of A: the width of t = x @ A^T (a merged layer's ranks added up)."""
        return 0 if self.A is None else int(self.A.shape[0])

    def _full_b(self) -> torch.Tensor | None:
        """B as the matrix (N, rank) the reference and CPU paths multiply t by (block-diagonal if merged)."""
        return None if self.B is None else block_diagonal_b(self.B, self.segments)

    def _select_path(self) -> None:
        """Choose the path for the current device and prepare it (CPU int4 conversion happens here)."""
        dev = self.qweight.device
        path = self.requested_path
        if path == "auto":
            path = "triton" if dev.type == "cuda" else "cpu_int4"
        if path == "triton" and dev.type != "cuda" and not interpreting():
            raise ValueError(f"path 'triton' needs CUDA tensors (or TRITON_INTERPRET=1); layer is on {dev}")
        if path == "cpu_int4" and dev.type != "cpu":
            raise ValueError(f"path 'cpu_int4' needs CPU tensors; layer is on {dev}")
        self._cpu = self._a_t = self._b_t = self._bias32 = self._native = self._native_call = None
        owner, self._cpu_owner = getattr(self, "_cpu_owner", None), None
        if owner is not None:
            owner()  # whoever shared our CPU weight (engine.cpu_decode) learns that its copy is stale
        if path == "cpu_int4" and native_reason() is None:
            self._native = prepare_native(self.packed, self.A, self._full_b(), self.bias)
            self._native_call = NativeGroup([self._native])
        elif path == "cpu_int4":
            self._cpu = prepare_cpu(self.packed)
            if self.A is not None:
                self._a_t = self.A.float().t().contiguous()  # (K, r)
                self._b_t = self._full_b().float().t().contiguous()  # (r, N)
            if self.bias is not None:
                self._bias32 = self.bias.float()
        self.path, self.fallback_reason = path, None
        key = (path, self.bits, dev.type)
        level = logging.INFO if key not in _ANNOUNCED else logging.DEBUG
        _ANNOUNCED.add(key)
        log.log(level, "kernel path %s for %d-bit g%d %dx%d layers on %s (rank %d)%s", path, self.bits,
                self.group_size, self.out_features, self.in_features, dev, self.rank,
                f"; decode: {cpu_decode_kernel()}; prefill: {cpu_prefill_path()}" if path == "cpu_int4" else "")

    def native_weight(self, on_reprepare=None) -> NativeWeight | None:
        """The layer's CPU-kernel weight (None when torch's int4 op serves it), for engine.cpu_decode to
        run several layers in one call; `on_reprepare()` is called when the layer re-prepares its path."""
        if self._native is not None and on_reprepare is not None:
            self._cpu_owner = on_reprepare
        return self._native

    def share_cpu(self, w, a_t: torch.Tensor | None, b_t: torch.Tensor | None, on_reprepare=None) -> None:
        """Adopt a CpuInt4Weight (and fp32 A^T, B^T) that views a fused weight of several layers
        (cuda_ext.cpu.fuse_cpu): the same values as this layer's own, stored once. `on_reprepare()` is
        called when the layer later re-prepares its path (.to(), load_state_dict): the fused copy is stale."""
        if self.path != "cpu_int4":
            raise ValueError(f"share_cpu needs the cpu_int4 path, layer is on {self.path}")
        if (w.in_features, w.out_features) != (self.in_features, self.out_features) or (a_t is None) != (self.A is None):
            raise ValueError("shared CPU weight does not fit this layer")
        self._cpu, self._a_t, self._b_t = w, a_t, b_t
        self._cpu_owner = on_reprepare

    def _apply(self, fn, *args, **kwargs):
        """.to()/.cuda()/.half()/.bfloat16() move the layer; dtype casts never touch the packed
        tensors or the fp16 branch (a cast through bf16 would lose bits), only the bias."""
        keep = {n: getattr(self, n) for n in ("scales", "zeros", "A", "B") if getattr(self, n) is not None}
        super()._apply(fn, *args, **kwargs)
        for name, old in keep.items():
            new = getattr(self, name)
            if new.dtype != torch.float16:
                setattr(self, name, old.to(new.device))
        self._select_path()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x has {x.shape[-1]} features, layer expects {self.in_features}")
        if self.path == "triton":
            try:
                xk = x if x.dtype in (torch.float16, torch.bfloat16) else x.to(torch.float16)
                return quant_matmul(xk, self.packed, self.A, self.B, self.bias, segments=self.segments).to(x.dtype)
            except Exception as e:  # noqa: BLE001 - re-raised unless a loud fallback was asked for
                if os.environ.get(ENV_FALLBACK, "0") in ("", "0"):
                    log.error("Triton kernel failed on %s: %r (set %s=1 to fall back to the reference)",
                              x.device, e, ENV_FALLBACK)
                    raise
                log.error("Triton kernel failed on %s: %r; this layer falls back to the reference path",
                          x.device, e)
                self.path, self.fallback_reason = "reference", f"triton failed: {e!r}"[:300]
        if self._native_call is not None:
            return native_matmul(x, self._native_call, self.packed, self.A, self._full_b(), self.bias)
        if self.path == "cpu_int4":
            return cpu_matmul(x, self._cpu, self._a_t, self._b_t, self._bias32, packed=self.packed)
        return quant_matmul_ref(x, self.packed, self.A, self.B, self.bias, segments=self.segments)

    def weight_bytes(self) -> dict[str, int]:
        """Resident bytes by kind: packed (qweight), scales_zeros, branch (fp16 A, B), bias, and
        cpu_int4 (the CPU path's own copies: the CPU kernel's tiles, fp32 scales and fp16 B^T, or torch's
        int4 pack and fp32 A^T, B^T; 0 elsewhere)."""
        out = self.packed.nbytes()
        out["branch"] = 0 if self.A is None else (self.A.numel() + self.B.numel()) * 2
        out["bias"] = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        out["cpu_int4"] = 0 if self._cpu is None else self._cpu.nbytes()
        if self._native is not None:
            out["cpu_int4"] = self._native.nbytes()
        if self._a_t is not None:
            out["cpu_int4"] += (self._a_t.numel() + self._b_t.numel()) * 4
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, rank={self.rank}, path={self.path}"
                + (f", segments={self.segments}" if self.segments else ""))


def cpu_decode_kernel() -> str:
    """What cpu_int4 layers run calls of few rows with: fbserve's CPU kernel, or "torch-int4 (<why not>)"."""
    why = native_reason()
    return kernel_name() if why is None else f"torch-int4 ({why})"


def cpu_prefill_path() -> str:
    """How cpu_int4 layers run calls of many rows: "bf16-gemm from N rows", or the small-call kernel
    with why not bf16: "fbserve-<isa> (<why>)" / "int4 (<why>)" (torch's op)."""
    rows = bf16_prefill_rows()
    if rows is not None:
        return f"bf16-gemm from {rows} rows"
    return f"{kernel_name() if native_reason() is None else 'int4'} ({bf16_prefill_reason()})"


def kernel_paths() -> list[dict]:
    """Live kernel paths, one row per (path, bits, device, fallback): what /health and the gauge
    fbserve_kernel_info{path,bits,device} report.  Row keys: path, bits, device, group_sizes,
    layers, fallback (None, or why a layer left the Triton path); cpu_int4 rows add decode
    (`cpu_decode_kernel()`) and prefill (`cpu_prefill_path()`)."""
    rows: dict[tuple, dict] = {}
    decode, prefill = cpu_decode_kernel(), cpu_prefill_path()  # one answer for every cpu_int4 row
    for m in list(_LIVE):
        dev = str(m.qweight.device)
        key = (m.path, m.bits, dev, m.fallback_reason)
        row = rows.setdefault(key, {"path": m.path, "bits": m.bits, "device": dev, "group_sizes": [],
                                    "layers": 0, "fallback": m.fallback_reason})
        row["layers"] += 1
        if m.path == "cpu_int4":
            row["decode"], row["prefill"] = decode, prefill
        if m.group_size not in row["group_sizes"]:
            row["group_sizes"].append(m.group_size)
    return sorted(rows.values(), key=lambda r: (r["device"], r["path"], r["bits"]))


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Sum of QuantLinear.weight_bytes() over a model's quantized layers (fbserve_model_weight_bytes{kind})."""
    total: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, QuantLinear):
            for k, v in m.weight_bytes().items():
                total[k] = total.get(k, 0) + v
    return total
