"""FBQuant: W_F = Q(W - BA) + BA, the branch subtracted before quantization and added back after it.

Objective per linear: the layer output error tr(E H E^T), E = W_F - W, H = X^T X of calibration inputs.

Why not gradient descent through a straight-through estimator: with STE, d W_F / d(BA) = -I + I = 0
on every entry that does not clip, so A and B never move (`ste_gradient` shows it; a test asserts it).

What we do instead (block-coordinate descent, every step evaluated with the stored fp16 tensors):
  init   C = GPTQ(W), S = B A = whitened-SVD_r(W - C)           (the GPTQ+QERA solution)
  round  C = GPTQ_{H_a}(W - S)                                  quantize the feedback target
         scales = least squares of the output error given the codes, zeros and S   (exact, per row)
         S = whitened-SVD_r(W - C)                              exact rank-r refit given C
  keep the round of least measured output error (so FBQuant never ends worse than GPTQ+QERA).
The stored pair of a round is (C_t, S_t) with C_t = Q(W - S_{t-1}): the branch is refit after the codes,
so it is the feedback form W_F = Q(W - BA) + BA exactly at a fixed point of the loop and up to the last
refit otherwise (the refit can only lower the measured error given C_t).
H_a = H - a H A^T (A H A^T)^-1 A H is the Gram matrix with the share `a` of the directions the current
branch spans projected out: for a fixed A the best B absorbs any error lying in the row space of A, so
GPTQ's error feedback is told those errors are (mostly) cheap. a = 1 over-commits to the previous A (its
singular directions move); a = 0.8 was best on real layers (bench/RESULTS.md, "Quantization").
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from quant.gptq import gptq, small_op_threads
from quant.lowrank import Whitener, branch_product, output_error, whitened_branch
from quant.quantizer import MIN_SCALE, QuantizedWeight, expand_groups, num_groups, pad_groups, quantize_rtn


@dataclass
class FBQuantConfig:
    rounds: int = 6  # quantize/refit rounds after the GPTQ+QERA start (error still falls at 6, slowly)
    base: str = "gptq"  # quantizer inside the loop: gptq | rtn
    projection: float = 0.8  # share `a` of the branch directions projected out of GPTQ's Gram matrix
    refit_scales: bool = True  # least-squares scales given the codes (zeros stay integers)
    damp: float = 0.01  # GPTQ damping, relative to mean(diag H)
    act_order: bool = False


@dataclass
class FBQuantResult:
    qweight: QuantizedWeight  # codes of W - S (as they were quantized) with their fp16 scales/zeros
    a: Tensor  # fp16 (r, K)
    b: Tensor  # fp16 (N, r)
    error: float  # relative output error tr(E H E^T) / tr(W H W^T) of the kept iterate
    history: list[float] = field(default_factory=list)  # relative error of the start and each round

    def weight(self) -> Tensor:
        """W_F in fp32 (N, K) as serving computes it: dequant(codes) + B A from the fp16 tensors."""
        return self.qweight.dequantize() + branch_product(self.a, self.b)


def projected_gram(h: Tensor, a: Tensor, share: float) -> Tensor:
    """H - share * H A^T (A H A^T)^-1 A H, fp32 (K, K): errors in the row space of `a` (r, K) made cheap."""
    a = a.float()
    ha = h @ a.T  # (K, r)
    m = a @ ha  # (r, r)
    m = m + 1e-6 * m.diagonal().mean().clamp(min=1e-30) * torch.eye(m.shape[0], device=m.device)
    return h - share * ha @ torch.linalg.solve(m, ha.T)


def refit_scales(qw: QuantizedWeight, target: Tensor, h: Tensor) -> QuantizedWeight:
    """Per-group scales minimising tr((Wq - T) H (Wq - T)^T) for fixed codes and integer zeros.

    Wq[n, k] = s[n, k // g] * d[n, k] with d = codes - zeros is linear in the scales, so each row is a
    G x G least-squares problem: (D_n^T H D_n) s_n = D_n^T H t_n, D_n = diag(d_n) * group indicator.
    A small ridge toward the current scales keeps empty or degenerate groups where they were. Rows
    whose error does not fall (fp16 rounding) keep their scales.
    """
    n, k = target.shape
    g = qw.group_size
    ng = num_groups(k, g)
    h = h.float()
    hp = torch.nn.functional.pad(h, (0, ng * g - k)).view(k, ng, g)  # (K, G, g), padded columns are 0
    d_all = qw.codes.float() - expand_groups(qw.zeros.float(), k, g)  # (N, K)
    old = qw.scales.float()
    new = old.clone()
    eye = torch.eye(ng, device=h.device)
    row_chunk = max(1, (1 << 25) // (k * ng))  # keeps the (rows, K, G) product at 32M elements
    for r0 in range(0, n, row_chunk):
        d = d_all[r0:r0 + row_chunk]  # (n, K)
        dg = pad_groups(d, g)  # (n, G, g)
        hd = torch.einsum("kgj,ngj->nkg", hp, dg)  # (n, K, G): H D_n
        hd = torch.nn.functional.pad(hd, (0, 0, 0, ng * g - k)).view(-1, ng, g, ng)  # (n, G, g, G)
        m = torch.einsum("ngj,ngjh->ngh", dg, hd)  # (n, G, G): D_n^T H D_n
        rhs = (pad_groups((target[r0:r0 + row_chunk].float() @ h) * d, g)).sum(-1)  # (n, G)
        lam = 1e-6 * m.diagonal(dim1=1, dim2=2).mean(-1).clamp(min=1e-30)  # (n,)
        s = old[r0:r0 + row_chunk]
        sol = torch.linalg.solve(m + lam[:, None, None] * eye, (rhs + lam[:, None] * s)[..., None])[..., 0]
        new[r0:r0 + row_chunk] = torch.where(sol > MIN_SCALE, sol, s)
    cand = QuantizedWeight(qw.codes, new.half(), qw.zeros, qw.bits, g)
    # keep, per row, whichever scales give the smaller output error
    e_old = qw.dequantize() - target
    e_new = cand.dequantize() - target
    better = ((e_new @ h) * e_new).sum(1) < ((e_old @ h) * e_old).sum(1)
    scales = torch.where(better[:, None], cand.scales, qw.scales)
    return QuantizedWeight(qw.codes, scales, qw.zeros, qw.bits, g)


def _quantize_base(w: Tensor, h: Tensor, bits: int, group_size: int, cfg: FBQuantConfig) -> QuantizedWeight:
    if cfg.base == "gptq":
        return gptq(w, h, bits, group_size, damp=cfg.damp, act_order=cfg.act_order)
    if cfg.base == "rtn":
        return quantize_rtn(w, bits, group_size)
    raise ValueError(f"FBQuant base quantizer {cfg.base!r} unknown (gptq | rtn)")


def fbquant(w: Tensor, h: Tensor, bits: int, group_size: int, rank: int, cfg: FBQuantConfig | None = None,
            whitener: Whitener | None = None, start: QuantizedWeight | None = None) -> FBQuantResult:
    """FBQuant of one linear `w` (N, K) fp32 with input Gram matrix `h` (K, K); see the module docstring.

    `start`: the base quantizer's codes of W if already computed (the GPTQ+QERA start reuses them).
    Deterministic; runs on the device of `w`.
    """
    cfg = cfg or FBQuantConfig()
    if rank <= 0:
        raise ValueError("FBQuant needs a low-rank branch: rank >= 1")
    with small_op_threads(w.device):
        return _fbquant(w, h, bits, group_size, rank, cfg, whitener, start)


def _fbquant(w: Tensor, h: Tensor, bits: int, group_size: int, rank: int, cfg: FBQuantConfig,
             whitener: Whitener | None, start: QuantizedWeight | None) -> FBQuantResult:
    w = w.float()
    h = h.float().to(w.device)
    whitener = whitener or Whitener(h)
    ref = max(output_error(w, h), 1e-30)

    def evaluate(c: QuantizedWeight, a: Tensor, b: Tensor) -> float:
        return output_error(c.dequantize() + branch_product(a, b) - w, h) / ref

    c = start if start is not None else _quantize_base(w, h, bits, group_size, cfg)
    a, b = whitened_branch(w - c.dequantize(), rank, whitener)
    best = FBQuantResult(c, a, b, evaluate(c, a, b))
    best.history.append(best.error)
    for _ in range(cfg.rounds):
        s = branch_product(a, b)
        target = w - s  # the feedback: quantize what the branch does not carry
        h_q = projected_gram(h, a, cfg.projection) if cfg.projection > 0 and cfg.base == "gptq" else h
        c = _quantize_base(target, h_q, bits, group_size, cfg)
        if cfg.refit_scales:
            c = refit_scales(c, target, h)
        a, b = whitened_branch(w - c.dequantize(), rank, whitener)
        err = evaluate(c, a, b)
        best.history.append(err)
        if err < best.error:
            best.qweight, best.a, best.b, best.error = c, a, b, err
    return best


def ste_gradient(w: Tensor, h: Tensor, a: Tensor, b: Tensor, bits: int, group_size: int,
                 clip_search: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Gradient of tr(E H E^T) w.r.t. A and B through a plain straight-through estimator.

    W_F = STE(Q(W - BA)) + BA with Q's group parameters fixed from W - BA (detached) and
    STE(Q(x)) = c(x) + (Q(x) - c(x)).detach(), c clamping x to the quantizer's range. Returns (dA, dB, clipped) where `clipped` (N, K) bool marks
    the entries the quantizer clips: elsewhere d W_F / d(BA) is exactly 0, so dA and dB are 0 when
    nothing clips. Kept for the test and the ablation that show why FBQuant cannot be trained this way.
    """
    a = a.float().clone().requires_grad_(True)
    b = b.float().clone().requires_grad_(True)
    s = b @ a
    x = w.float() - s
    qw = quantize_rtn(x.detach(), bits, group_size, clip_search=clip_search)
    k = w.shape[1]
    sc = expand_groups(qw.scales.float(), k, group_size)
    z = expand_groups(qw.zeros.float(), k, group_size)
    # entries rounding to a code in [0, maxq] without saturating: within half a step of the grid's ends
    lo, hi = (0 - z - 0.5) * sc, (2 ** bits - 1 - z + 0.5) * sc
    inside = torch.minimum(torch.maximum(x, lo), hi)  # gradient 1 there, 0 where the quantizer clips
    q = inside + (qw.dequantize() - inside).detach()  # STE: forward Q(x), backward d clamp(x) / dx
    w_f = q + s
    e = w_f - w.float()
    loss = ((e @ h.float()) * e).sum()
    loss.backward()
    clipped = ((x < lo) | (x > hi)).detach()
    return a.grad, b.grad, clipped
