"""Pure-PyTorch references: they define what every kernel in cuda_ext computes.

All math is fp32; results are cast to the activation dtype at the end, as the kernels do.
"""
from __future__ import annotations

import torch

from .packing import PackedWeight, unpack


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """fp32 (N, K) weight from quant's codes uint8 (N, K), scales (N, G), zeros (N, G).

    w[n, k] = (codes[n, k] - zeros[n, k // g]) * scales[n, k // g]; the last group may be partial.
    """
    k = codes.shape[1]
    s = scales.float().repeat_interleave(group_size, dim=1)[:, :k]
    z = zeros.float().repeat_interleave(group_size, dim=1)[:, :k]
    return (codes.float() - z) * s


def dequantize_packed(packed: PackedWeight) -> torch.Tensor:
    """fp32 (N, K) weight of a packed layer."""
    codes, scales, zeros = unpack(packed)
    return dequantize(codes, scales, zeros, packed.group_size)


def branch_down_ref(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """t = x @ A^T in fp32: x (M, K) any float dtype, A fp16 (r, K) -> fp32 (M, r).

    Meaning of the branch_down kernel (first half of the low-rank branch)."""
    return x.float() @ a.float().t()


def block_diagonal_b(b: torch.Tensor, segments: tuple[int, ...] | None) -> torch.Tensor:
    """A merged layer's B (N, r), one row block per segment, as the block-diagonal (N, segments x r) it
    stands for: rows of segment s see only columns s*r..(s+1)*r of t. segments=None: b itself."""
    if segments is None or len(segments) == 1:
        return b
    r = b.shape[1]
    full = torch.zeros(b.shape[0], len(segments) * r, dtype=b.dtype, device=b.device)
    row = 0
    for s, size in enumerate(segments):
        full[row:row + size, s * r:(s + 1) * r] = b[row:row + size]
        row += size
    return full


def quant_matmul_ref(x: torch.Tensor, packed: PackedWeight, a: torch.Tensor | None = None,
                     b: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                     weight: torch.Tensor | None = None, segments: tuple[int, ...] | None = None) -> torch.Tensor:
    """y = x @ dequant(Wq)^T (+ (x @ A^T) @ B^T) (+ bias), computed in fp32, returned in x.dtype.

    x: (..., K) fp32/fp16/bf16.  A: fp16 (r, K).  B: fp16 (N, r).  bias: (N,) any float dtype.
    weight: optional precomputed dequantize_packed(packed) (fp32 (N, K)) to skip unpacking.
    segments: a merged layer's output sizes (A: one (r, K) block per segment; block_diagonal_b).
    Meaning of the decode and prefill kernels and of the CPU int4 path.
    """
    if (a is None) != (b is None):
        raise ValueError("the low-rank branch needs both A and B")
    w = dequantize_packed(packed) if weight is None else weight
    x2 = x.reshape(-1, x.shape[-1]).float()
    y = x2 @ w.t()
    if a is not None:
        y = y + branch_down_ref(x2, a) @ block_diagonal_b(b, segments).float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], packed.out_features)
