"""CPU serving path: torch's int4 CPU matmul plus the two small branch matmuls.

`torch.ops.aten._weight_int4pack_mm_for_cpu` dequantizes w = (q - 8) * scale + zero_point with
q a 4-bit code and scales_and_zeros of shape (K / g, N, 2). Codes of 2, 3 and 4 bits all fit that
container. Its fast kernel needs bf16 activations (fp32 activations take a ~30x slower path on
torch 2.13), so x is rounded to bf16 and the result is returned in x's dtype.

Exactness: for 2 and 3 bits we store q = code - zero + 8 (|code - zero| <= 7) and zero_point = 0,
so the only rounding is the scale's fp16 -> bf16; for 4 bits zero_point = (8 - zero) * scale is
rounded to bf16 too (|error| <= scale / 64). The branch runs in fp32.

Prefill: for many rows (>= `bf16_prefill_rows()`, 512 by default) the int4 op is compute-bound and
oneDNN's bf16 GEMM (AVX-512 bf16 / AMX) is ~2x faster, so the layer is dequantized to a bf16 W^T from
the packed planes for that one call (~5 ms for 3072 x 576, freed afterwards) and multiplied in bf16
with fp32 accumulation. The weight's only rounding is then (code - zero) * scale to bf16 (relative
error <= 2^-9, the size of the int4 op's own bf16 scale rounding). Off where oneDNN has no native bf16
(it would be emulated) or with FBSERVE_CPU_BF16_PREFILL_ROWS=0; `bf16_prefill_reason()` says why.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .packing import PackedWeight, codes_k_major, unpack

_CPU_GROUPS = (256, 128, 64, 32)  # group sizes the CPU op accepts
BF16_PREFILL_ENV = "FBSERVE_CPU_BF16_PREFILL_ROWS"
BF16_PREFILL_ROWS = 512  # rows from which dequantize + bf16 GEMM beats the int4 op (bench/RESULTS.md)


@dataclass
class CpuInt4Weight:
    """A layer converted once for the CPU op.

    weight:       uint8, torch's opaque int4 CPU pack of a (n16, k_cpu) code matrix.
    scales_zeros: bf16 (k_cpu // group_size, n16, 2): [..., 0] scale, [..., 1] zero_point.
    group_size:   the group size the op runs with (a divisor of the quantization group).
    k_cpu:        K as the op sees it; x is zero-padded from in_features when larger.
    n16:          out_features rounded up to 16 (the op's requirement); extra columns are sliced off.
    """

    weight: torch.Tensor
    scales_zeros: torch.Tensor
    group_size: int
    in_features: int
    out_features: int
    k_cpu: int
    n16: int

    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size() + self.scales_zeros.numel() * 2


def _cpu_codes(packed: PackedWeight) -> tuple[torch.Tensor, torch.Tensor, int, int, int]:
    """One layer in the op's terms: (int32 codes (n16, k_cpu), fp32 scales_zeros (k_cpu/g, n16, 2), g_cpu, k_cpu, n16)."""
    codes, scales, zeros = (t.cpu() for t in unpack(packed))
    n, k, g, bits = packed.out_features, packed.in_features, packed.group_size, packed.bits
    # A partial last group (e.g. K=576, g=128) is expressed with a smaller group dividing K when one
    # exists (576 -> 64), so x needs no padding; otherwise K is padded to a multiple of g.
    g_cpu = next((c for c in _CPU_GROUPS if c <= g and k % c == 0), g)
    k_cpu = -(-k // g_cpu) * g_cpu
    n16 = -(-n // 16) * 16
    rep = g // g_cpu
    s = scales.float().repeat_interleave(rep, dim=1)[:, :k_cpu // g_cpu]  # (N, k_cpu/g_cpu)
    z = zeros.float().repeat_interleave(rep, dim=1)[:, :k_cpu // g_cpu]
    z_k = z.repeat_interleave(g_cpu, dim=1)  # (N, k_cpu) zero point of every k
    c = torch.zeros(n, k_cpu)
    c[:, :k] = codes.float()
    c[:, k:] = z_k[:, k:]  # padded k dequantize to 0 (x is zero there as well)
    if bits <= 3:
        q = c - z_k + 8
        zp = torch.zeros_like(s)
    else:
        q = c
        zp = (8 - z) * s
    q_full = torch.zeros(n16, k_cpu, dtype=torch.int32)
    q_full[:n] = q.round().to(torch.int32)
    sz = torch.zeros(k_cpu // g_cpu, n16, 2)
    sz[:, :n, 0] = s.t()
    sz[:, :n, 1] = zp.t()
    return q_full, sz, g_cpu, k_cpu, n16


def prepare_cpu(packed: PackedWeight) -> CpuInt4Weight:
    """Convert a packed layer (on any device) into the CPU int4 op's layout, once."""
    q_full, sz, g_cpu, k_cpu, n16 = _cpu_codes(packed)
    weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q_full, 1)
    return CpuInt4Weight(weight, sz.to(torch.bfloat16).contiguous(), g_cpu, packed.in_features,
                         packed.out_features, k_cpu, n16)


def fuse_cpu(ws: list[CpuInt4Weight]) -> tuple[CpuInt4Weight, list[CpuInt4Weight]]:
    """Several converted layers that read the same input (q/k/v, gate/up) as ONE int4 CPU weight,
    concatenated along the output dimension (each part keeps its padding to 16 rows), plus one
    CpuInt4Weight per part whose int4 pack is a VIEW of the fused one, so the parts cost no memory
    beyond their own small scales. This relies on the op's pack being row-separable,
    pack(cat(q_i)) == cat(pack(q_i)), which holds on torch 2.13 when every part but the last has a
    multiple of 64 rows (the pack works in blocks of 64 rows, a shorter tail differently; checked in
    tests). Part i is columns offsets[i] : offsets[i] + out_features of the fused output, the offsets
    being the running sum of the parts' n16. Raises ValueError when the layers differ in input width or
    CPU group size, or a part before the last is not a multiple of 64 rows."""
    if len({(w.in_features, w.group_size, w.k_cpu) for w in ws}) != 1:
        raise ValueError("fused layers need the same in_features and CPU group size: "
                         f"{[(w.in_features, w.group_size) for w in ws]}")
    if any(w.n16 % 64 for w in ws[:-1]):
        raise ValueError(f"fused layers before the last need multiples of 64 rows: {[w.n16 for w in ws]}")
    weight = torch.cat([w.weight for w in ws])
    sz = torch.cat([w.scales_zeros for w in ws], dim=1).contiguous()
    n_total = weight.shape[0]
    w0 = ws[0]
    fused = CpuInt4Weight(weight, sz, w0.group_size, w0.in_features, n_total, w0.k_cpu, n_total)
    views, off = [], 0
    for w in ws:
        # scales_zeros stay the part's own contiguous tensor: the op reads them as if contiguous
        # (a strided slice gives silently wrong results on torch 2.13)
        views.append(CpuInt4Weight(weight[off:off + w.n16], w.scales_zeros, w.group_size, w.in_features,
                                   w.out_features, w.k_cpu, w.n16))
        off += w.n16
    return fused, views


@functools.cache
def _native_bf16() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def bf16_prefill_reason() -> str | None:
    """Why prefill does not use the dequantize + bf16 GEMM path here, or None when it does."""
    if os.environ.get(BF16_PREFILL_ENV, "").strip() in ("0", "off"):
        return f"disabled ({BF16_PREFILL_ENV}=0)"
    if not _native_bf16():
        return "this CPU has no native bf16 GEMM (oneDNN would emulate it)"
    return None


def bf16_prefill_rows() -> int | None:
    """Rows (tokens) from which a CPU matmul dequantizes to bf16; None when that path is off."""
    if bf16_prefill_reason() is not None:
        return None
    env = os.environ.get(BF16_PREFILL_ENV, "").strip()
    if not env:
        return BF16_PREFILL_ROWS
    if not env.isdigit():
        raise ValueError(f"{BF16_PREFILL_ENV}={env!r}: expected a row count (0 turns the path off)")
    return int(env)


def dequantize_bf16_t(packed: PackedWeight) -> torch.Tensor:
    """W^T as bf16 (K, N), contiguous: the reference's fp32 (code - zero) * scale, rounded once to bf16."""
    k, n, g = packed.in_features, packed.out_features, packed.group_size
    codes = codes_k_major(packed)[:k, :n]
    s = packed.scales[:, :n].float()  # (G, N)
    z = packed.zeros[:, :n].float()
    out = torch.empty(k, n, dtype=torch.bfloat16, device=codes.device)
    full = k // g
    if full:  # whole groups: (G, g, N) against one scale row per group
        out[:full * g].view(full, g, n).copy_((codes[:full * g].view(full, g, n) - z[:full, None]) * s[:full, None])
    if full * g < k:  # a partial last group
        out[full * g:].copy_((codes[full * g:] - z[full:full + 1]) * s[full:full + 1])
    return out


def bf16_prefill_matmul(x2: torch.Tensor, packed: PackedWeight) -> torch.Tensor:
    """x2 (M, K) @ W^T through the dequantize + bf16 GEMM path (prefill): fp32 (M, N)."""
    return (x2.to(torch.bfloat16) @ dequantize_bf16_t(packed)).float()


def cpu_matmul(x: torch.Tensor, w: CpuInt4Weight, a_t: torch.Tensor | None = None,
               b_t: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               packed: PackedWeight | None = None) -> torch.Tensor:
    """y = x @ W^T (+ (x @ A^T) @ B^T) (+ bias) on CPU.

    x: (..., K) fp32/fp16/bf16 CPU.  a_t: fp32 (K, r) = A^T.  b_t: fp32 (r, N) = B^T.
    bias: fp32 (N,).  packed: the layer's PackedWeight; given, calls of >= bf16_prefill_rows() rows
    dequantize it to bf16 and use the bf16 GEMM instead of the int4 op.  Returns (..., N) in x.dtype.
    """
    if x.shape[-1] != w.in_features:
        raise ValueError(f"x: last dim {x.shape[-1]} != in_features {w.in_features}")
    x2 = x.reshape(-1, w.in_features)
    min_rows = bf16_prefill_rows() if packed is not None else None
    if min_rows is not None and x2.shape[0] >= min_rows:
        y = bf16_prefill_matmul(x2, packed)
    else:
        xb = x2.to(torch.bfloat16)
        if w.k_cpu > w.in_features:
            xb = F.pad(xb, (0, w.k_cpu - w.in_features))
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb.contiguous(), w.weight, w.group_size, w.scales_zeros)
        if w.n16 != w.out_features:
            y = y[:, :w.out_features]
    if a_t is not None or bias is not None:
        y = y.float()
        if a_t is not None:
            y = torch.addmm(y, x2.float() @ a_t, b_t)
        if bias is not None:
            y = y + bias
    return y.to(x.dtype).reshape(*x.shape[:-1], w.out_features)
