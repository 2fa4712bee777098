"""Decoding fbq1 words into weights inside Triton kernels (cuda_ext/packing.py has the layout), shared by
kernels.py (tensor-core tiles) and gemv.py (CUDA-core rows).

_load_sz       a group's scales and offset zeros in the weight tile's shape (or as rows).
_h2_planes, _h2_word, _h2_scales, _half_pairs
               the packed half2 form: two chunks' codes in the two 16-bit halves of one int32, put on the
               mantissas of two fp16 1024s by one AND-OR; minus (1024 + zero) it is (code - zero) exactly.
_bf16_rne      fp32 -> bf16 with the GPU's rounding, for the interpreter.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _bf16_rne(v):
    """fp32 -> bf16 rounded to nearest even, as the GPU's cvt.rn does.  Only for the interpreter
    (INTERP_BF16), whose fp32 -> bf16 cast truncates."""
    b = v.to(tl.int32, bitcast=True)
    b = b + 0x7FFF + ((b >> 16) & 1)
    return (b & -65536).to(tl.float32, bitcast=True).to(tl.bfloat16)


@triton.jit
def _load_sz(s_ptr, z_ptr, grp, offs_n, r, Np, G, DT: tl.constexpr, UNIT: tl.constexpr = 1.0):
    """Scale and offset zero of group `grp` for the column tile, broadcast to the weight tile's
    shape (16, BLOCK_N): loading them in that shape gives them the weight tile's register layout
    (16-byte loads, L1 hits for the repeated rows) instead of a shared-memory layout conversion.

    fp16: (s, (zero + 1024) * UNIT) in fp16 (UNIT 1 or 1/16, exact either way); otherwise (s, zero + 2**23)
    in fp32 (see _block_dot)."""
    cols = offs_n[None, :] + 0 * r[:, None]
    # (cols * 0 + grp): the interpreter cannot AND a scalar mask into a block mask
    mask = (cols < Np) & ((cols * 0 + grp) < G)
    s = tl.load(s_ptr + grp * Np + cols, mask=mask, other=0.0)
    z = tl.load(z_ptr + grp * Np + cols, mask=mask, other=0.0)
    if DT == tl.float16:
        return s, z * UNIT + 1024.0 * UNIT
    else:
        return s.to(tl.float32), z.to(tl.float32) + 8388608.0


@triton.jit
def _h2_planes(qw_ptr, offs_n, rb, Np, BITS: tl.constexpr, RR: tl.constexpr):
    """The half2 paths' start of a K block: (r, rmask, wmask, wp, w, w_odd, h): the tile's rows and masks,
    the plane-tile pointers and, at 3 bits, the two low planes' words rearranged so that chunks c and
    c + 16 share bit positions (w: chunks 0..7 | 16..23, w_odd: 8..15 | 24..31, low | high half) and the
    high-bit plane.  Other bit widths load a plane word per pair group instead: zeros here."""
    r = tl.arange(0, 16)
    rmask = r < RR
    wmask = rmask[:, None] & (offs_n < Np)[None, :]
    wp = qw_ptr + (rb + r)[:, None] * Np + offs_n[None, :]
    w = tl.zeros(wp.shape, dtype=tl.int32)
    w_odd = w
    h = w
    if BITS == 3:
        w0 = tl.load(wp, mask=wmask, other=0, eviction_policy="evict_first")
        w1 = tl.load(wp + RR * Np, mask=wmask, other=0, eviction_policy="evict_first")
        h = tl.load(wp + 2 * RR * Np, mask=wmask, other=0, eviction_policy="evict_first")
        w = (w0 & 0xFFFF) | (w1 << 16)
        w_odd = ((w0 >> 16) & 0xFFFF) | (w1 & -65536)
    return r, rmask, wmask, wp, w, w_odd, h


@triton.jit
def _h2_word(w, w_odd, h, magic, I: tl.constexpr, BITS: tl.constexpr):
    """Pair I's two codes on the mantissas of two fp16 magics (one int32: fp16 bit patterns in both halves).
    w: the plane word holding pair I (4/2 bits: fields I % D and I % D + D; 3 bits: see _h2_planes).
    magic: 0x64006400 (two fp16 1024s: codes count 1) or 0x54005400 (two 64s: codes count 1/16).  Held in a register
    (gemv_kernel computes it from an argument), each AND-OR is one LOP3 with the mask as its immediate; at 3 bits
    magic joins the high bits by XOR (the bits are disjoint, so XOR is OR), which keeps LLVM from regrouping the
    two ORs into three LOP3s.  A constant or constant-bank magic costs a separate OR per pair (qgemm_kernel passes
    the constant: in a register its 3-bit tile spills)."""
    if BITS == 3:
        src = w if I < 8 else w_odd
        if I >= 2:
            hb = ((h >> (I - 2)) & 0x00040004) ^ magic  # high bits of chunks I and I + 16 to bit 2 of each half
        else:
            hb = ((h << (2 - I)) & 0x00040004) ^ magic
        return ((src >> (2 * (I % 8))) & 0x00030003) | hb
    elif BITS == 4:
        return ((w >> (4 * (I % 4))) & 0x000F000F) | magic
    else:
        return ((w >> (2 * (I % 8))) & 0x00030003) | magic


@triton.jit
def _h2_scales(s_ptr, z_ptr, grp0, grp1, offs_n, rows, Np, G, UNIT: tl.constexpr):
    """Scales and -(1024 + zero) * UNIT of groups grp0 (half 0) and grp1 (half 1) as fp16 pairs
    (rows, BLOCK_N, 2), UNIT: the magic's mantissa unit (1 for 1024, 1/16 for 64); `rows` sets the shape
    they load in (see _load_sz)."""
    s0, z0 = _load_sz(s_ptr, z_ptr, grp0, offs_n, rows, Np, G, tl.float16, UNIT)
    s1, z1 = _load_sz(s_ptr, z_ptr, grp1, offs_n, rows, Np, G, tl.float16, UNIT)
    return tl.join(s0, s1), -tl.join(z0, z1)


@triton.jit
def _half_pairs(v):
    """(16, BLOCK_N) int32 words whose two 16-bit halves are fp16 bit patterns -> (16, BLOCK_N, 2) fp16."""
    return tl.join(v.to(tl.int16), (v >> 16).to(tl.int16)).to(tl.float16, bitcast=True)
