"""gemv_kernel: the quantized linear layer for 1-4 rows on CUDA cores (decode at batch 1; launcher:
cuda_ext/launch.py quant_matmul).

(code - zero) comes exactly from the packed words: in fp32 one field per AND-OR (_gemv_block, bf16 and
2-4 rows), or in packed half2 math for one fp16 row (_gemv_block_h2); sums per group, scaled once per
group.  Split-K partials and the epilogue as qgemm_kernel's (kernels.py).  Optionally (config
`fused_branch`) the low-rank branch's t = x @ A^T is made inside the same launch (_branch_part).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .dequant import _h2_planes, _h2_scales, _h2_word, _half_pairs
from .kernels import _epilogue, _last_of_split


def gemv_magic(bits: int, half2: bool = False) -> int:
    """gemv_kernel's `magic` argument: the fp32 bits of 2**(23 - B0), B0 = 4 at 3 bits, else 0; in the half2 path
    0x54005400 (two fp16 64s, whose mantissa unit is 1/16: see _gemv_block_h2).  A run-time argument, not a
    constant: in a register, each field's AND-OR is one LOP3 with its mask as the immediate (with a constant, or
    a parameter read from the constant bank, the OR is a second LOP3).  The half2 path passes it through
    tl.maximum(magic, 0), a computed value, which ptxas keeps in a register; the fp32 path keeps the plain
    parameter (computed, it fuses there too on sm_80-89, but at 167 registers instead of 128 with ptxas 12.9).
    bench/RESULTS.md "Fourth session" has the instruction counts."""
    return 0x54005400 if half2 else (150 - gemv_b0(bits)) << 23


def gemv_b0(bits: int) -> int:
    """Lowest bit position of a field once gemv_kernel has shifted the words (3 bits: 4, else 0)."""
    return 4 * (bits % 2)


@triton.jit
def _field_value(word, magic, BIT: tl.constexpr, WIDTH: tl.constexpr):
    """fp32 2**(23-B0) + code * 2**(BIT-B0) for the WIDTH-bit field at bit BIT >= B0 of `word`
    (`magic` = the bits of 2**(23-B0), see gemv_magic): the field masked onto the mantissa by one
    AND-OR; no shift, no int->float conversion.  Needs BIT + WIDTH <= 23 (callers pre-shift the word
    for higher fields)."""
    return ((word & (((1 << WIDTH) - 1) << BIT)) | magic).to(tl.float32, bitcast=True)


@triton.jit
def _gemv_x(x_ptr, row, kv, kmask, M, stride_xm, MASKED: tl.constexpr):
    """x[row, kv] as fp32 (zeros for rows >= M or masked k).  Unmasked (MASKED False) where every k
    of the block is < K and row 0 always exists: no predicate, no zeroing per load."""
    if MASKED:
        return tl.load(x_ptr + row * stride_xm + kv, mask=kmask & ((kv * 0 + row) < M), other=0.0,
                       eviction_policy="evict_last").to(tl.float32)
    return tl.load(x_ptr + row * stride_xm + kv, eviction_policy="evict_last").to(tl.float32)


@triton.jit
def _gemv_field(g0, g1, g2, g3, w_lo, w_hi, h_lo, h_hi, z, magic, x_ptr, k, rmask, M, K, stride_xm,
                BITS: tl.constexpr, MR: tl.constexpr, C: tl.constexpr, FI: tl.constexpr, B0: tl.constexpr,
                TAIL: tl.constexpr):
    """g_i += (code - zero) * x[i, k] for chunk C (field FI of its plane word), see _gemv_block.
    w_lo/w_hi: the plane word as read for low/high fields (3 bits: << 4 / >> 12; else w / w >> 16);
    h_lo/h_hi: the 3-bit high-bit plane (<< 4 / >> 12); z: (1, BLOCK_N) zeros; k: the chunk's k (16,);
    TAIL: the block is the tail block (k may pass K, rows past its row count are masked)."""
    E0: tl.constexpr = 1 << (23 - B0)  # the value of the shared magic constant
    if BITS == 3:
        BIT: tl.constexpr = 2 * FI + 4 - 16 * (FI // 9)  # fields 0..8 from w << 4, 9..15 from w >> 12
        HBIT: tl.constexpr = (C % 16) + 4
        P: tl.constexpr = 2.0 ** (BIT + 2 - HBIT)  # moves the high bit to weight 4 at the low field's scale
        if FI < 9:
            lo = _field_value(w_lo, magic, BIT, 2)
        else:
            lo = _field_value(w_hi, magic, BIT, 2)
        if C < 16:
            hi = _field_value(h_lo, magic, HBIT, 1)
        else:
            hi = _field_value(h_hi, magic, HBIT, 1)
        # all terms are integers times 2**(BIT-B0) below 2**24 of that unit: exact
        wq = hi * P + (lo - (z * (2.0 ** (BIT - B0)) + E0 * (1.0 + P)))
    else:
        FB: tl.constexpr = 2 + 2 * (BITS // 4)
        BIT: tl.constexpr = FB * FI - 16 * ((FB * FI + FB) // 24)  # fields reaching bit 23 from w >> 16
        if FB * FI + FB <= 23:
            v = _field_value(w_lo, magic, BIT, FB)
        else:
            v = _field_value(w_hi, magic, BIT, FB)
        wq = v - (z * (2.0 ** (BIT - B0)) + E0)
    kv = k[:, None]
    kmask = rmask[:, None] & (kv < K)
    XS: tl.constexpr = 2.0 ** (B0 - BIT)  # exact: undoes the field's 2**(BIT-B0)
    g0 += (_gemv_x(x_ptr, 0, kv, kmask, M, stride_xm, TAIL) * XS) * wq
    if MR > 1:
        g1 += (_gemv_x(x_ptr, 1, kv, kmask, M, stride_xm, True) * XS) * wq
    if MR > 2:
        g2 += (_gemv_x(x_ptr, 2, kv, kmask, M, stride_xm, True) * XS) * wq
        g3 += (_gemv_x(x_ptr, 3, kv, kmask, M, stride_xm, True) * XS) * wq
    return g0, g1, g2, g3


@triton.jit
def _gemv_block(acc0, acc1, acc2, acc3, x_ptr, qw_ptr, s_ptr, z_ptr, offs_n, kb, rb, M, K, Np, G, stride_xm, magic,
                BITS: tl.constexpr, GROUP: tl.constexpr, MR: tl.constexpr, RR: tl.constexpr):
    """acc_i (16, BLOCK_N) fp32 += x[i, k] * dequant(W)[k, n] over one K block of RR-row chunks
    (rows i < MR of x), on CUDA cores (no tl.dot): the decode path for one row of x, where tensor
    cores would idle and the layout change into their operands costs more than the math.

    A field at bit BIT becomes (code - zero) * 2**(BIT-B0) exactly: one AND-OR (_field_value) and
    one subtraction of zero * 2**(BIT-B0) + 2**(23-B0), computed once per column and field; x is
    scaled by 2**(B0-BIT) (exact) once per row and chunk, so the FMA adds (code - zero) * x.  3 bits:
    a second AND-OR gives the high bit, and an FMA adds it times 4.  A group's partial sums are scaled
    once per group.  Scales and zeros are (1, BLOCK_N) rows broadcast over the tile's 16 rows, x a
    (16, 1) column broadcast over its columns: no per-element work for either."""
    FB: tl.constexpr = 2 + 2 * (BITS // 4)  # field width of the planes walked chunk by chunk
    F: tl.constexpr = 32 // FB  # chunks per word of such a plane
    CPG: tl.constexpr = GROUP // RR  # chunks per quantization group (RR divides GROUP)
    B0: tl.constexpr = 4 * (BITS % 2)  # lowest field bit after the shifts below (3 bits: 4, else 0)
    r = tl.arange(0, 16)
    rmask = r < RR
    nmask = offs_n < Np
    wmask = rmask[:, None] & nmask[None, :]
    wp = qw_ptr + (rb + r)[:, None] * Np + offs_n[None, :]
    h_lo = tl.zeros((16, acc0.shape[1]), dtype=tl.int32)
    h_hi = h_lo
    if BITS == 3:  # high-bit plane: bit c of a word is chunk c's third bit; shifted so bits sit at 4..19
        w2 = tl.load(wp + 2 * RR * Np, mask=wmask, other=0, eviction_policy="evict_first")
        h_lo = w2 << 4
        h_hi = w2 >> 12
    g0 = tl.zeros_like(acc0)
    g1 = g0
    g2 = g0
    g3 = g0
    s = tl.zeros((1, acc0.shape[1]), dtype=tl.float32)
    z = s
    # chunk c = p * F + f is spelled out, never assigned: Triton turns a local assigned in a loop into a
    # run-time value, and every field position, group start and shift must be a compile-time constant
    for p in tl.static_range(32 // F):
        w = tl.load(wp + p * RR * Np, mask=wmask, other=0, eviction_policy="evict_first")
        # fields must sit at bits <= 22 (the mantissa): the others are read from a shifted copy
        w_lo = w << 4 if BITS == 3 else w
        w_hi = w >> 12 if BITS == 3 else w >> 16
        for f in tl.static_range(F):
            if ((p * F + f) % CPG) == 0:  # a group starts: its scales and zeros for the tile's columns
                grp = (kb + (p * F + f) * RR) // GROUP
                gmask = nmask[None, :] & ((offs_n[None, :] * 0 + grp) < G)
                s = tl.load(s_ptr + grp * Np + offs_n[None, :], mask=gmask, other=0.0).to(tl.float32)
                z = tl.load(z_ptr + grp * Np + offs_n[None, :], mask=gmask, other=0.0).to(tl.float32)
            g0, g1, g2, g3 = _gemv_field(g0, g1, g2, g3, w_lo, w_hi, h_lo, h_hi, z, magic, x_ptr,
                                         kb + (p * F + f) * RR + r, rmask, M, K, stride_xm,
                                         BITS, MR, p * F + f, f, B0, RR < 16)
            if ((p * F + f) % CPG) == CPG - 1 or p * F + f == 31:  # the group ends: scale its sums once
                acc0 += g0 * s
                g0 = tl.zeros_like(acc0)
                if MR > 1:
                    acc1 += g1 * s
                    g1 = tl.zeros_like(acc0)
                if MR > 2:
                    acc2 += g2 * s
                    acc3 += g3 * s
                    g2 = tl.zeros_like(acc0)
                    g3 = tl.zeros_like(acc0)
    return acc0, acc1, acc2, acc3


@triton.jit
def _h2_x(x_ptr, kv, kmask, MASKED: tl.constexpr):
    """x[0, kv] as fp16 (0 where masked)."""
    if MASKED:
        return tl.load(x_ptr + kv, mask=kmask, other=0.0, eviction_policy="evict_last")
    return tl.load(x_ptr + kv, eviction_policy="evict_last")


@triton.jit
def _gemv_block_h2(acc, x_ptr, qw_ptr, s_ptr, z_ptr, offs_n, kb, rb, K, Np, G, magic,
                   BITS: tl.constexpr, GROUP: tl.constexpr, RR: tl.constexpr):
    """acc (16, BLOCK_N, 2) fp32 += one fp16 row of x times dequant(W) over one K block, in packed
    half2 math: one AND-OR puts two chunks' codes on the mantissas of two fp16 64s (mantissa unit 1/16), one add of
    -(64 + zero / 16) per half gives (code - zero) / 16 exactly (zeros are integers <= 15), one half2 FMA adds x *
    (code - zero) / 16 into an fp16 partial sum of the group, and the group's end adds that partial, scaled, into
    fp32; the tile's sum is multiplied by 16 once.  The 1/16 keeps a group's fp16 partial far from overflow (|x| up
    to ~1.8e4 at 3 bits g128) at no cost per x.  Pair i holds chunks c0 = 2D * (i // D) + i % D and c0 + D in a
    word's two halves: D = 4 at 4 bits and 8 at 2 bits (a plane word's fields f and f + 16 / FB); at 3 bits D = 16,
    the two low planes' words rearranged once per block so that chunk c's and c + 16's fields share bit positions,
    and the high-bit plane's bits c and c + 16 moved to bit 2 of each half."""
    D: tl.constexpr = 4 if BITS == 4 else (8 if BITS == 2 else 16)
    TAIL: tl.constexpr = RR < 16
    r, rmask, wmask, wp, w, w_odd, h = _h2_planes(qw_ptr, offs_n, rb, Np, BITS, RR)
    part = tl.zeros((16, offs_n.shape[0], 2), dtype=tl.float16)
    s = tl.zeros((16, offs_n.shape[0], 2), dtype=tl.float32)
    zz = tl.zeros((16, offs_n.shape[0], 2), dtype=tl.float16)
    for i in tl.static_range(16):
        # a group starts (half 0's group, relative to the block, is ((2D * (i // D) + i % D) * RR) // GROUP;
        # half 1's changes at the same pairs): both halves' scales and zeros, in the weight tile's shape
        if i == 0 or (((2 * D * (i // D) + i % D) * RR) // GROUP
                      != ((2 * D * ((i - 1) // D) + (i - 1) % D) * RR) // GROUP):
            s, zz = _h2_scales(s_ptr, z_ptr, kb // GROUP + ((2 * D * (i // D) + i % D) * RR) // GROUP,
                               kb // GROUP + ((2 * D * (i // D) + i % D + D) * RR) // GROUP, offs_n, r, Np, G, 0.0625)
            s = s.to(tl.float32)
        if BITS != 3 and i % D == 0:  # a new plane word
            w = tl.load(wp + (i // D) * RR * Np, mask=wmask, other=0, eviction_policy="evict_first")
        v = _h2_word(w, w_odd, h, magic, i, BITS)
        c0k = kb + (2 * D * (i // D) + i % D) * RR + r  # (16,): k of half 0's rows
        x0 = _h2_x(x_ptr, c0k, rmask & (c0k < K), TAIL)
        x1 = _h2_x(x_ptr, c0k + D * RR, rmask & (c0k + D * RR < K), TAIL)
        term = tl.join(x0, x1)[:, None, :] * (_half_pairs(v) + zz)
        if i == 0 or (((2 * D * (i // D) + i % D) * RR) // GROUP
                      != ((2 * D * ((i - 1) // D) + (i - 1) % D) * RR) // GROUP):
            part = term  # a group's first pair
        else:
            part += term
        if i == 15 or (((2 * D * (i // D) + i % D) * RR) // GROUP
                       != ((2 * D * ((i + 1) // D) + (i + 1) % D) * RR) // GROUP):
            acc += part.to(tl.float32) * s
    return acc


@triton.jit
def _gemv_tile(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr, t_ptr, b_ptr, bias_ptr,
               M, N, Np, K, G, n_full, n_blocks, rank, stride_xm, stride_ym, magic, pid_n, pid_k, n_split, n_tiles,
               seg1, seg2, BITS: tl.constexpr, GROUP: tl.constexpr, MR: tl.constexpr, BLOCK_N: tl.constexpr,
               TAIL_ROWS: tl.constexpr, RANK_P: tl.constexpr, USE_WS: tl.constexpr, HAS_BRANCH: tl.constexpr,
               HAS_BIAS: tl.constexpr, INTERP_BF16: tl.constexpr, HALF2: tl.constexpr, FUSED_BRANCH: tl.constexpr,
               N_SEG: tl.constexpr):
    """gemv_kernel's work for column tile pid_n and K split pid_k (of n_split), then the tile's epilogue
    by the last split to finish.  FUSED_BRANCH: the epilogue first waits for t (_wait_for_t) and then
    reports the tile done (_tile_done)."""
    offs_m = tl.arange(0, MR)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    per = tl.cdiv(n_blocks, n_split)
    b0 = pid_k * per
    b1 = tl.minimum(b0 + per, n_blocks)
    sel = offs_m[:, None]
    if HALF2:  # one fp16 row: packed half2 math (_gemv_block_h2)
        magic = tl.maximum(magic, 0)  # = magic (> 0), computed: a register, not a constant-bank operand
        acc = tl.zeros((16, BLOCK_N, 2), dtype=tl.float32)
        for b in range(b0, tl.minimum(b1, n_full)):
            acc = _gemv_block_h2(acc, x_ptr, qw_ptr, s_ptr, z_ptr, offs_n, b * 512, b * (BITS * 16), K, Np, G,
                                 magic, BITS, GROUP, 16)
        if TAIL_ROWS > 0:
            if b1 > n_full:
                acc = _gemv_block_h2(acc, x_ptr, qw_ptr, s_ptr, z_ptr, offs_n, n_full * 512, n_full * (BITS * 16),
                                     K, Np, G, magic, BITS, GROUP, TAIL_ROWS)
        part = tl.where(sel == 0, tl.sum(tl.sum(acc, axis=2), axis=0)[None, :] * 16.0, 0.0)  # undoes the 1/16
    else:
        acc0 = tl.zeros((16, BLOCK_N), dtype=tl.float32)
        acc1 = acc0
        acc2 = acc0
        acc3 = acc0
        for b in range(b0, tl.minimum(b1, n_full)):
            acc0, acc1, acc2, acc3 = _gemv_block(acc0, acc1, acc2, acc3, x_ptr, qw_ptr, s_ptr, z_ptr, offs_n,
                                                 b * 512, b * (BITS * 16), M, K, Np, G, stride_xm, magic, BITS,
                                                 GROUP, MR, 16)
        if TAIL_ROWS > 0:
            if b1 > n_full:
                acc0, acc1, acc2, acc3 = _gemv_block(acc0, acc1, acc2, acc3, x_ptr, qw_ptr, s_ptr, z_ptr, offs_n,
                                                     n_full * 512, n_full * (BITS * 16), M, K, Np, G, stride_xm,
                                                     magic, BITS, GROUP, MR, TAIL_ROWS)
        # (MR, BLOCK_N): row i of x is row i of the partial result
        part = tl.where(sel == 0, tl.sum(acc0, axis=0)[None, :], 0.0)
        if MR > 1:
            part += tl.where(sel == 1, tl.sum(acc1, axis=0)[None, :], 0.0)
        if MR > 2:
            part += tl.where(sel == 2, tl.sum(acc2, axis=0)[None, :], 0.0)
            part += tl.where(sel == 3, tl.sum(acc3, axis=0)[None, :], 0.0)
    if USE_WS:
        is_last, total = _last_of_split(part, ws_ptr, cnt_ptr, pid_n, pid_k, n_split, offs_m, offs_n, M,
                                        MR, n_tiles * BLOCK_N)
        if is_last:
            _finish_tile(total, y_ptr, t_ptr, b_ptr, bias_ptr, cnt_ptr, offs_m, offs_n, M, N, rank, stride_ym,
                         n_tiles, seg1, seg2, RANK_P, HAS_BRANCH, HAS_BIAS, INTERP_BF16, FUSED_BRANCH, N_SEG)
    else:
        _finish_tile(part, y_ptr, t_ptr, b_ptr, bias_ptr, cnt_ptr, offs_m, offs_n, M, N, rank, stride_ym,
                     n_tiles, seg1, seg2, RANK_P, HAS_BRANCH, HAS_BIAS, INTERP_BF16, FUSED_BRANCH, N_SEG)


@triton.jit
def _finish_tile(acc, y_ptr, t_ptr, b_ptr, bias_ptr, cnt_ptr, offs_m, offs_n, M, N, rank, stride_ym, n_tiles,
                 seg1, seg2, RANK_P: tl.constexpr, HAS_BRANCH: tl.constexpr, HAS_BIAS: tl.constexpr,
                 INTERP_BF16: tl.constexpr, FUSED_BRANCH: tl.constexpr, N_SEG: tl.constexpr):
    """A column tile's epilogue (branch on CUDA cores, bias, store); with the fused branch it first waits
    for t and then counts the tile done."""
    if FUSED_BRANCH:
        _wait_for_t(cnt_ptr + n_tiles)
    _epilogue(acc, y_ptr, t_ptr, b_ptr, bias_ptr, offs_m, offs_n, M, N, rank, stride_ym, seg1, seg2,
              RANK_P, HAS_BRANCH, HAS_BIAS, False, INTERP_BF16, BRANCH_DOT=False, T_CG=FUSED_BRANCH, N_SEG=N_SEG)
    if FUSED_BRANCH:
        _tile_done(cnt_ptr + n_tiles, n_tiles)


# The fused branch's four counters, after the split-K tile counters (cnt + n_tiles): tickets handed out,
# branch parts written, t ready (0/1), column tiles finished.  All four are 0 between launches.
@triton.jit
def _branch_part(x_ptr, a_ptr, tws_ptr, t_ptr, c_ptr, part, n_parts, K, rank,
                 RANK_P: tl.constexpr, BLOCK_KA: tl.constexpr, PARTS_P: tl.constexpr):
    """Branch part `part` of n_parts: tws[part] = A[:, K slice] @ x[0, K slice] (fp32); the last part to
    finish sums every part in order into t (deterministic) and raises the t-ready flag."""
    rr = tl.arange(0, RANK_P)
    kk = tl.arange(0, BLOCK_KA)
    span = tl.cdiv(tl.cdiv(K, n_parts), BLOCK_KA) * BLOCK_KA
    k0 = part * span
    k1 = tl.minimum(k0 + span, K)
    acc = tl.zeros((RANK_P, BLOCK_KA), dtype=tl.float32)
    for kb in range(k0, k1, BLOCK_KA):
        kv = kb + kk
        km = kv < k1
        xv = tl.load(x_ptr + kv, mask=km, other=0.0).to(tl.float32)
        av = tl.load(a_ptr + rr[:, None] * K + kv[None, :], mask=(rr < rank)[:, None] & km[None, :], other=0.0,
                     eviction_policy="evict_first")
        acc += av.to(tl.float32) * xv[None, :]
    tl.store(tws_ptr + part * RANK_P + rr, tl.sum(acc, axis=1))
    tl.debug_barrier()  # every thread's part is written before the release below
    if tl.atomic_add(c_ptr + 1, 1, sem="acq_rel", scope="gpu") == n_parts - 1:
        pp = tl.arange(0, PARTS_P)
        parts = tl.load(tws_ptr + pp[:, None] * RANK_P + rr[None, :], mask=(pp < n_parts)[:, None], other=0.0,
                        cache_modifier=".cg")
        tl.store(t_ptr + rr, tl.sum(parts, axis=0), mask=rr < rank)
        tl.debug_barrier()
        tl.atomic_xchg(c_ptr + 2, 1, sem="release", scope="gpu")


@triton.jit
def _wait_for_t(c_ptr):
    """Spin until the last branch part has written t.  Branch parts hold lower tickets than any tile's
    programs and wait for nothing, so they run to completion whatever the GPU schedules."""
    ready = tl.atomic_add(c_ptr + 2, 0, sem="acquire", scope="gpu")
    while ready == 0:
        ready = tl.atomic_add(c_ptr + 2, 0, sem="acquire", scope="gpu")


@triton.jit
def _tile_done(c_ptr, n_tiles):
    """Count a finished column tile; the last one resets the four counters for the next launch (every
    ticket is taken by then: each tile's last split arrived, and branch parts hold the lowest tickets)."""
    if tl.atomic_add(c_ptr + 3, 1, sem="acq_rel", scope="gpu") == n_tiles - 1:
        tl.atomic_xchg(c_ptr, 0)
        tl.atomic_xchg(c_ptr + 1, 0)
        tl.atomic_xchg(c_ptr + 2, 0)
        tl.atomic_xchg(c_ptr + 3, 0)


@triton.jit
def gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr, t_ptr, b_ptr, bias_ptr,
                M, N, Np, K, G, n_full, n_blocks, rank, stride_xm, stride_ym, magic,
                a_ptr, tws_ptr, n_tiles, n_split, n_parts, seg1, seg2,
                BITS: tl.constexpr, GROUP: tl.constexpr, MR: tl.constexpr, BLOCK_N: tl.constexpr,
                TAIL_ROWS: tl.constexpr, RANK_P: tl.constexpr, USE_WS: tl.constexpr,
                HAS_BRANCH: tl.constexpr, HAS_BIAS: tl.constexpr, INTERP_BF16: tl.constexpr,
                HALF2: tl.constexpr = False, FUSED_BRANCH: tl.constexpr = False, BLOCK_KA: tl.constexpr = 128,
                PARTS_P: tl.constexpr = 32, N_SEG: tl.constexpr = 1, T_RANK_P: tl.constexpr = 128):
    """y (M, N) = x (M, K) @ dequant(qweight)^T (+ t @ B^T) (+ bias) for M <= MR rows on CUDA cores.
    HALF2 (one fp16 row, MR = 1): the packed half2 math of _gemv_block_h2, else fp32 (_gemv_block).

    Without FUSED_BRANCH: grid (n_tiles, 1, n_split), t computed before by branch_down, and the same
    split-K protocol as qgemm_kernel.  FUSED_BRANCH (one row): the branch's t = x @ A^T is made inside
    this launch, no branch_down: a 1-D grid of n_parts + n_tiles * n_split programs, each taking a
    ticket (an atomic counter) as it starts; tickets below n_parts compute a K slice of t
    (_branch_part), the others a tile's split as usual, and a tile's epilogue waits for t.  Taking
    roles by ticket, not by program id, is what makes the wait safe: a program that holds a ticket is
    running, so every branch part is running or done by the time any tile waits.
    N_SEG > 1: a merged layer whose columns [0, seg1), [seg1, seg2), [seg2, N) each take their own slice of
    t (fp32 (M, N_SEG * rank); A: (N_SEG * rank, K); B: (N, rank); _epilogue); T_RANK_P pads t's width
    for the fused branch's parts.
    The tail block's row count is a compile-time constant (TAIL_ROWS, 0 = none), so every field
    position, group start and shift is resolved at compile time."""
    if FUSED_BRANCH:
        ticket = tl.atomic_add(cnt_ptr + n_tiles, 1, sem="relaxed", scope="gpu")
        if ticket < n_parts:
            _branch_part(x_ptr, a_ptr, tws_ptr, t_ptr, cnt_ptr + n_tiles, ticket, n_parts, K, rank * N_SEG,
                         T_RANK_P, BLOCK_KA, PARTS_P)
        else:
            w = ticket - n_parts
            _gemv_tile(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr, t_ptr, b_ptr, bias_ptr,
                       M, N, Np, K, G, n_full, n_blocks, rank, stride_xm, stride_ym, magic, w % n_tiles,
                       w // n_tiles, n_split, n_tiles, seg1, seg2, BITS, GROUP, MR, BLOCK_N, TAIL_ROWS, RANK_P,
                       USE_WS, HAS_BRANCH, HAS_BIAS, INTERP_BF16, HALF2, True, N_SEG)
    else:
        _gemv_tile(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr, t_ptr, b_ptr, bias_ptr,
                   M, N, Np, K, G, n_full, n_blocks, rank, stride_xm, stride_ym, magic, tl.program_id(0),
                   tl.program_id(2), tl.num_programs(2), tl.num_programs(0), seg1, seg2, BITS, GROUP, MR, BLOCK_N,
                   TAIL_ROWS, RANK_P, USE_WS, HAS_BRANCH, HAS_BIAS, INTERP_BF16, HALF2, False, N_SEG)
