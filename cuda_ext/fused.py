"""Fused elementwise ops of a decoder layer on CUDA (Triton): one launch each where the PyTorch module
path (models/llama.py) launches 8 (RMSNorm) and 12 (rotary embedding of q and k) small kernels.

    y = rms_norm(x, weight, eps)      # weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype), per last-dim row
    q, k = rope(q, k, cos, sin)       # q * cos + rotate_half(q) * sin (and k), in place

Why: a batch-1 decode step on an H100 is launch-bound outside the GEMVs: an eager SmolLM2-shaped step
launched ~62 kernels per layer, most of them these (bench/RESULTS.md "Second GPU session"); each costs
~2-3 us even replayed from a CUDA graph. The models call these on CUDA tensors when autograd is off (serving,
evaluation: the kernels have no backward); on CPU, and with autograd on, the PyTorch ops run. Under TRITON_INTERPRET=1 the kernels run on CPU tensors,
which is how CI checks them against those semantics (tests/test_fused_ops.py).
GPU status: written after the second H100 session; compiled for every arch by `fbserve kernels check`,
never run on a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import interpreting

RMS_NORM_WARPS = 4
ROPE_WARPS = 1


@triton.jit
def rms_norm_kernel(x_ptr, w_ptr, y_ptr, N, stride_x, stride_y, eps, BLOCK: tl.constexpr):
    """One row per program: fp32 mean of squares, the normalised row rounded to x's dtype (as the
    module), then times the weight (fp32 product rounded to y's dtype, as torch's fp16 multiply)."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    xn = (x * inv).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + offs, (w * xn).to(y_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """models.llama.RMSNorm's forward in one launch; x (..., N), weight (N,); the result has the dtype of
    weight * x (torch's promotion)."""
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"weight must be ({n},), got {tuple(weight.shape)}")
    if x.device.type != "cuda" and not interpreting():
        raise ValueError(f"rms_norm needs CUDA tensors (or TRITON_INTERPRET=1); x is on {x.device}")
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if x2.shape[0]:
        rms_norm_kernel[(x2.shape[0],)](x2, weight, y, n, x2.stride(0), y.stride(0), float(eps),
                                        BLOCK=triton.next_power_of_2(n), num_warps=RMS_NORM_WARPS)
    return y.view(*x.shape[:-1], n)


@triton.jit
def rope_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, H, HKV, stride_q, stride_k, stride_c,
                D: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (token, head): heads 0..H-1 are q's, H..H+HKV-1 k's; each head vector x of D values
    becomes x * cos + rotate_half(x) * sin (rotate_half: (-x[D/2:], x[:D/2])), products and sum in fp32,
    rounded once to the tensor's dtype; written in place (all loads precede the store)."""
    tok = tl.program_id(0)
    head = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)  # BLOCK_D: D rounded up to a power of two
    inside = d < D
    partner = (d + D // 2) % D
    sign = tl.where(d < D // 2, -1.0, 1.0)
    c = tl.load(cos_ptr + tok * stride_c + d, mask=inside, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + tok * stride_c + d, mask=inside, other=0.0).to(tl.float32)
    is_q = head < H
    base = tl.where(is_q, q_ptr + tok * stride_q + head * D, k_ptr + tok * stride_k + (head - H) * D)
    x = tl.load(base + d, mask=inside, other=0.0).to(tl.float32)
    xp = tl.load(base + partner, mask=inside, other=0.0).to(tl.float32)
    tl.store(base + d, (x * c + sign * xp * s).to(q_ptr.dtype.element_ty), mask=inside)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q (B, T, H, D) and k (B, T, Hkv, D) with cos, sin (B, T, D) in one launch,
    in place (q and k are fresh projection outputs in the model). Returns (q, k)."""
    b, t, h, d = q.shape
    hkv = k.shape[2]
    if k.shape[:2] != (b, t) or k.shape[3] != d or cos.shape != (b, t, d) or sin.shape != (b, t, d):
        raise ValueError(f"rope: q {tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)}, "
                         f"sin {tuple(sin.shape)} do not match (B, T, H, D), (B, T, Hkv, D), (B, T, D)")
    if q.dtype != k.dtype or d % 2:
        raise ValueError(f"rope needs q, k of one dtype and an even head dim; got {q.dtype}, {k.dtype}, D={d}")
    if q.device.type != "cuda" and not interpreting():
        raise ValueError(f"rope needs CUDA tensors (or TRITON_INTERPRET=1); q is on {q.device}")
    cos, sin = cos.contiguous(), sin.contiguous()
    if b * t:
        rope_kernel[(b * t, h + hkv)](q, k, cos, sin, h, hkv, _token_stride(q, "q"), _token_stride(k, "k"), d,
                                      D=d, BLOCK_D=triton.next_power_of_2(d), num_warps=ROPE_WARPS)
    return q, k


def _token_stride(v: torch.Tensor, name: str) -> int:
    """The one stride between consecutive tokens of v (B, T, heads, D) with packed heads (tokens may be
    strided: views of a wider projection output)."""
    b, t, h, d = v.shape
    if v.stride(3) != 1 or (h > 1 and v.stride(2) != d):
        raise ValueError(f"rope: {name} must have packed heads, got strides {v.stride()}")
    if t == 1:
        return v.stride(0)
    if b > 1 and v.stride(0) != t * v.stride(1):
        raise ValueError(f"rope: {name}'s tokens must be evenly strided, got strides {v.stride()}")
    return v.stride(1)
