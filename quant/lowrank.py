"""Low-rank branches `B A` (A: (r, K), B: (N, r)) fitted to a weight error, and the output-error metric.

The three sub-branch baselines (lowrank-baselines.md), all fitted to E = W - Q(W) at rank r:
  svd   ZeroQuant-V2 / LoRC: SVD_r(E), sqrt(Sigma) split between the factors, no statistic.
  lqer  LQER: SVD_r(E diag(s)) diag(s)^-1, s_k = max over calibration samples of mean |x_k|.
  qera  QERA-exact / EoRA: SVD_r(E R^1/2) R^-1/2 with R the (damped) input Gram matrix. Given Q(W),
        this is the rank-r branch of least layer output error tr((E - BA) H (E - BA)^T), and it is
        the refit step of FBQuant.
Factors are returned in fp16 exactly as stored, each rank-1 term balanced so that its row of A and
column of B have the same norm (fp16 range and precision are then shared evenly).
"""
from __future__ import annotations

import torch
from torch import Tensor

BRANCH_METHODS = ("svd", "lqer", "qera")


def output_error(e: Tensor, h: Tensor) -> float:
    """tr(E H E^T) for a weight error `e` (N, K) and Gram matrix `h` (K, K): the summed squared output error."""
    e = e.float()
    return float(((e @ h.float()) * e).sum())


def relative_output_error(w_hat: Tensor, w: Tensor, h: Tensor) -> float:
    """tr(E H E^T) / tr(W H W^T), E = w_hat - w: the layer's relative output error (lower is better)."""
    return output_error(w_hat.float() - w.float(), h) / max(output_error(w, h), 1e-30)


class Whitener:
    """R^{1/2} and R^{-1/2} of the damped Gram matrix R = H + damp * mean(diag H) * I (eigendecomposition).

    Built once per Gram matrix and shared by every linear reading the same input (q, k, v; gate, up).
    """

    def __init__(self, h: Tensor, damp: float = 1e-4) -> None:
        # fp32 is enough once damped (same branch errors as fp64 on real layers) and 2-3x faster
        h = h.float()
        lam = float(damp * h.diagonal().mean().clamp(min=1e-12))
        evals, evecs = torch.linalg.eigh(h + lam * torch.eye(h.shape[0], dtype=h.dtype, device=h.device))
        evals = evals.clamp(min=lam)
        self.sqrt = (evecs * evals.sqrt()) @ evecs.T  # (K, K), symmetric
        self.inv_sqrt = (evecs * evals.rsqrt()) @ evecs.T


def _balanced_fp16(u: Tensor, s: Tensor, vh: Tensor, right: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """A = sqrt(s) vh (right), B = u sqrt(s), rescaled per rank to equal norms; fp16 (r, K) and (N, r)."""
    root = s.clamp(min=0).sqrt()
    b = u * root  # (N, r)
    a = root[:, None] * vh  # (r, K)
    if right is not None:
        a = a @ right
    na, nb = a.norm(dim=1), b.norm(dim=0)
    c = torch.where((na > 0) & (nb > 0), (nb / na.clamp(min=1e-30)).sqrt(), torch.ones_like(na))
    return (a * c[:, None]).half(), (b / c[None, :]).half()


def top_svd(m: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """The `rank` leading singular triplets of `m` (N, K) fp32: u (N, r), s (r,), vh (r, K).

    Through the eigendecomposition of the smaller Gram matrix (min(N, K) square), 3-5x faster than a
    full SVD on CPU; only the leading triplets are used, whose accuracy squaring does not hurt.
    """
    m = m.float()
    rank = min(rank, *m.shape)
    if m.shape[0] >= m.shape[1]:
        evals, v = torch.linalg.eigh(m.T @ m)  # ascending
        v = v[:, -rank:].flip(-1)  # (K, r)
        mv = m @ v  # (N, r) = u * s
        s = mv.norm(dim=0)
        return mv / s.clamp(min=1e-30), s, v.T
    evals, u = torch.linalg.eigh(m @ m.T)
    u = u[:, -rank:].flip(-1)  # (N, r)
    um = u.T @ m  # (r, K) = s * vh
    s = um.norm(dim=1)
    return u, s, um / s.clamp(min=1e-30)[:, None]


def svd_branch(e: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """ZeroQuant-V2 / LoRC: best rank-r approximation of `e` (N, K) in Frobenius norm; (A, B) fp16."""
    return _balanced_fp16(*top_svd(e, rank))


def lqer_branch(e: Tensor, rank: int, act_scale: Tensor) -> tuple[Tensor, Tensor]:
    """LQER: SVD_r(E diag(s)) diag(s)^-1 with `act_scale` s (K,) = max over samples of mean |x_k|."""
    s_in = act_scale.float().clamp(min=1e-6)
    s_in = s_in / s_in.mean()  # scale-invariant; normalised for the numerics
    u, s, vh = top_svd(e.float() * s_in[None, :], rank)
    return _balanced_fp16(u, s, vh / s_in[None, :])


def whitened_branch(e: Tensor, rank: int, whitener: Whitener) -> tuple[Tensor, Tensor]:
    """QERA-exact / EoRA: the rank-r B A minimising tr((E - BA) R (E - BA)^T); (A, B) fp16."""
    u, s, vh = top_svd(e.float() @ whitener.sqrt, rank)
    return _balanced_fp16(u, s, vh, whitener.inv_sqrt)


def branch_product(a: Tensor, b: Tensor) -> Tensor:
    """B A in fp32 (N, K) from the stored fp16 factors."""
    return b.float() @ a.float()
