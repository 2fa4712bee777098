"""GPTQ (Frantar et al., 2022): column-by-column rounding with second-order error feedback.

Minimises the layer output error tr(E H E^T), H = X^T X (K, K), greedily: each column is rounded with
its group's parameters and the rounding error is spread over the columns not yet rounded through the
Cholesky factor of H^-1. Lazy batch updates: inside a block of columns updates are applied at once
to the block, and the rest of the matrix is updated once per block.

Groups are contiguous along the input in the original column order (the kernel's format). Without
act-order each group's scale and zero are found (with the MSE clipping search) when its first column
is reached, from the weights as updated so far; the block size is a multiple of the group size so a
group never straddles blocks. With act-order columns are visited by decreasing diag(H) and the group
parameters are fixed before the sweep from the original weights ("static groups"), because a group
then no longer starts at a single moment.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from quant.quantizer import QuantizedWeight, check_format, find_params, num_groups, pad_groups


@contextlib.contextmanager
def small_op_threads(device: torch.device) -> Iterator[None]:
    """One CPU thread for loops of small ops: on a busy 2-core machine two threads made GPTQ 15x slower."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def damped_cholesky_inverse(h: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, fp32 (K, K).

    Retries with 10x the damping when H is too ill-conditioned for the factorisation.
    """
    k = h.shape[0]
    eye = torch.eye(k, device=h.device, dtype=h.dtype)
    mean_diag = h.diagonal().mean().clamp(min=1e-8)
    for _ in range(6):
        try:
            hinv = torch.cholesky_inverse(torch.linalg.cholesky(h + damp * mean_diag * eye))
            return torch.linalg.cholesky(hinv, upper=True)
        except torch.linalg.LinAlgError:
            damp *= 10
    raise torch.linalg.LinAlgError("GPTQ: Hessian not positive definite even with heavy damping")


def gptq(w: Tensor, h: Tensor, bits: int, group_size: int, *, damp: float = 0.01, act_order: bool = False,
         block_size: int = 128, clip_search: bool = True) -> QuantizedWeight:
    """Quantize `w` (N, K) against the Gram matrix `h` (K, K) of its inputs; returns codes and fp16 params.

    Works on the device of `w`; `h` is not modified. Columns whose input is always zero are set to 0
    (their value does not change any output).
    """
    check_format(bits, group_size)
    with small_op_threads(w.device):  # also makes the result independent of the caller's thread count
        return _gptq(w, h, bits, group_size, damp, act_order, block_size, clip_search)


def _gptq(w: Tensor, h: Tensor, bits: int, group_size: int, damp: float, act_order: bool, block_size: int,
          clip_search: bool) -> QuantizedWeight:
    n, k = w.shape
    w = w.detach().clone().float()
    h = h.detach().clone().float().to(w.device)
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    g = group_size
    ngroups = num_groups(k, g)
    scale = torch.zeros(n, ngroups, device=w.device)
    zero = torch.zeros(n, ngroups, device=w.device)
    if act_order:
        perm = torch.argsort(h.diagonal(), descending=True)
        scale, zero = find_params(pad_groups(w, g), bits, clip_search)  # static groups, (N, G)
        w = w[:, perm]
        h = h[perm][:, perm]
    else:
        perm = torch.arange(k, device=w.device)
    group_of = (perm // g).tolist()  # group of the column visited at each step
    hinv = damped_cholesky_inverse(h, damp)
    codes = torch.zeros(n, k, device=w.device)
    block = max(block_size // g, 1) * g  # groups never straddle blocks (matters without act-order)
    _sweep(w, hinv, codes, scale, zero, group_of, bits, g, block, act_order, clip_search)
    if act_order:
        codes = codes[:, torch.argsort(perm)]
    return QuantizedWeight(codes.to(torch.uint8), scale.half(), zero.half(), bits, group_size)


def _sweep(w: Tensor, hinv: Tensor, codes: Tensor, scale: Tensor, zero: Tensor, group_of: list[int], bits: int,
           g: int, block: int, act_order: bool, clip_search: bool) -> None:
    """The column loop with lazy block updates; fills `codes` and (without act-order) `scale`, `zero`."""
    k = w.shape[1]
    maxq = 2 ** bits - 1
    current = -1
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if not act_order and col % g == 0:
                grp = w1[:, i:i + g]  # the whole group lies in this block, updated so far
                if grp.shape[1] < g:
                    grp = torch.nn.functional.pad(grp, (0, g - grp.shape[1]))
                scale[:, col // g], zero[:, col // g] = find_params(grp, bits, clip_search)
                current = -1
            if group_of[col] != current:  # the group's parameters, fetched once per run of columns
                current = group_of[col]
                s, z = scale[:, current].contiguous(), zero[:, current].contiguous()
            x = w1[:, i]
            q = torch.round(x / s).add_(z).clamp_(0, maxq)
            codes[:, col] = q
            e = (x - (q - z) * s).div_(hinv1[i, i])
            w1[:, i:].addr_(e, hinv1[i, i:], alpha=-1)  # w1[:, i:] -= e hinv1[i, i:]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
