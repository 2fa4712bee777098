"""Triton kernels of the quantized linear layer (launchers in cuda_ext/launch.py).

qgemm_kernel   y = x @ dequant(Wq)^T (+ t @ B^T) (+ bias).  Decode (m <= 16): BLOCK_M = 16, split-K
               over the 512-wide K blocks; the last program of a column tile to finish (an atomic
               counter) sums the partials in a fixed order (deterministic, no memset, no second
               launch) and runs the epilogue.  Prefill (m > 16): BLOCK_M 32..128 tiles, split-K
               only where the config table allows it.
               fp16 decode tiles dequantize in packed half2 pairs (_block_dot_h2).  gemv.py has the
               CUDA-core kernel for 1-4 rows.
branch_down_kernel  t = x @ A^T (fp32), split over K the same way; the one small extra launch of
               the low-rank branch.  qgemm's epilogue then adds t @ B^T for its column tile, so B is
               read once and the (m, N) result never makes a round trip.
branch_gemv_kernel  the same t for one row (decode at batch 1) on CUDA cores; its last program sums
               every split-K partial from one tile load.

Weights are dequantized in registers chunk by chunk (16 k x BLOCK_N) and fed to tl.dot, so tensor
cores do the math at every m.  Weight loads are 16 bytes wide (4 neighbouring columns, see
packing.py) and marked evict_first (streamed); x is marked evict_last (re-read by every column tile).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .dequant import _bf16_rne, _h2_planes, _h2_scales, _h2_word, _half_pairs, _load_sz


@triton.jit
def _block_dot(acc, x_ptr, qw_ptr, s_ptr, z_ptr, offs_m, offs_n, kb, rb, rr, M, K, Np, G, stride_xm,
               BITS: tl.constexpr, GROUP: tl.constexpr, INTERP_BF16: tl.constexpr, FP32_DOT: tl.constexpr):
    """acc (BLOCK_M, BLOCK_N) fp32 += x[:, block] @ dequant(block)^T for one K block.

    kb: first k of the block; rb: its first qweight row; rr: rows per plane tile (16, or the
    tail block's tail_rows; rows past rr are masked)."""
    DT = x_ptr.dtype.element_ty
    FB: tl.constexpr = 4 if BITS == 4 else 2  # field width of the planes walked chunk by chunk
    F: tl.constexpr = 32 // FB  # chunks per word of such a plane
    r = tl.arange(0, 16)
    rmask = r < rr
    wmask = rmask[:, None] & (offs_n < Np)[None, :]
    xmask = (offs_m < M)[:, None] & rmask[None, :]
    # all plane tiles (int32 (16, BLOCK_N), 16-byte loads along n) are issued before any math
    wp = qw_ptr + (rb + r)[:, None] * Np + offs_n[None, :]
    w0 = tl.load(wp, mask=wmask, other=0, eviction_policy="evict_first")
    w1 = tl.load(wp + rr * Np, mask=wmask, other=0, eviction_policy="evict_first")
    w2 = w0
    w3 = w0
    if BITS >= 3:
        w2 = tl.load(wp + 2 * rr * Np, mask=wmask, other=0, eviction_policy="evict_first")
    if BITS == 4:
        w3 = tl.load(wp + 3 * rr * Np, mask=wmask, other=0, eviction_policy="evict_first")
    for p in tl.static_range(32 // F):
        if p == 0:
            wpl = w0
        elif p == 1:
            wpl = w1
        elif p == 2:
            wpl = w2
        else:
            wpl = w3
        # chunks g0 .. g0 + cpg - 1 share one quantization group (GROUP // 16 of them in a full
        # block, more in a tail block with fewer rows), so scales and zeros load once per group
        cpg = GROUP // rr
        for g0 in range(0, F, cpg):
            s, z = _load_sz(s_ptr, z_ptr, (kb + (p * F + g0) * rr) // GROUP, offs_n, r, Np, G, DT)
            for f in range(g0, tl.minimum(g0 + cpg, F)):
                c = p * F + f  # chunk: k = kb + c * rr + r
                q = (wpl >> (f * FB)) & ((1 << FB) - 1)
                if BITS == 3:
                    q = q | (((w2 >> c) & 0x1) << 2)
                k = kb + c * rr + r
                xc = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=xmask & (k < K)[None, :],
                             other=0.0, eviction_policy="evict_last")
                # (q - zero) * s without an int->float conversion instruction: OR-ing q into the
                # mantissa of 1024.0 (fp16) or 2**23 (fp32) gives 1024 + q exactly; the offset zero
                # (see _load_sz) is subtracted exactly, and the multiply is the one rounding.
                if DT == tl.float16:
                    w = ((q | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - z) * s
                elif INTERP_BF16:
                    w = _bf16_rne(((q | 0x4B000000).to(tl.float32, bitcast=True) - z) * s)
                else:
                    w = (((q | 0x4B000000).to(tl.float32, bitcast=True) - z) * s).to(DT)
                # fp32 operands (same values): the interpreter's bf16 tl.dot is wrong, and on sm_75
                # Triton has no tensor-core dot (and 3.3 cannot lower an fp16 FMA dot)
                if INTERP_BF16 or FP32_DOT:
                    acc = tl.dot(xc.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
                else:
                    acc = tl.dot(xc, w, acc)
    return acc


@triton.jit
def _block_dot_h2(acc, x_ptr, qw_ptr, s_ptr, z_ptr, offs_m, offs_n, kb, rb, M, K, Np, G, stride_xm,
                  BITS: tl.constexpr, GROUP: tl.constexpr, RR: tl.constexpr, FP32_DOT: tl.constexpr):
    """_block_dot for fp16 x in packed half2 math (the pairs of _gemv_block_h2): per pair of chunks
    (c0, c0 + D) one AND-OR, one HADD2 of -(1024 + zero) and one HMUL2 by the scale give both chunks'
    weights, the same fp16 values as _block_dot's; each chunk then takes a K = 16 tl.dot.  All in one
    unrolled loop (no run-time group or chunk loops).  RR: rows per plane tile, a compile-time constant
    (16, or the tail's).  Scales and zeros load as (1, BLOCK_N) rows: in the weight tile's shape the
    3-bit kernel spills at 256 columns x 8 warps."""
    D: tl.constexpr = 4 if BITS == 4 else (8 if BITS == 2 else 16)
    r, rmask, wmask, wp, w, w_odd, h = _h2_planes(qw_ptr, offs_n, rb, Np, BITS, RR)
    r0 = tl.arange(0, 1)
    s = tl.zeros((1, offs_n.shape[0], 2), dtype=tl.float16)
    zz = s
    for i in tl.static_range(16):
        if i == 0 or (((2 * D * (i // D) + i % D) * RR) // GROUP
                      != ((2 * D * ((i - 1) // D) + (i - 1) % D) * RR) // GROUP):
            s, zz = _h2_scales(s_ptr, z_ptr, kb // GROUP + ((2 * D * (i // D) + i % D) * RR) // GROUP,
                               kb // GROUP + ((2 * D * (i // D) + i % D + D) * RR) // GROUP, offs_n, r0, Np, G, 1.0)
        if BITS != 3 and i % D == 0:  # a new plane word
            w = tl.load(wp + (i // D) * RR * Np, mask=wmask, other=0, eviction_policy="evict_first")
        v = _h2_word(w, w_odd, h, 0x64006400, i, BITS)
        w_lo, w_hi = tl.split((_half_pairs(v) + zz) * s)  # (16, BLOCK_N) each: chunk c0, chunk c0 + D
        k0 = kb + (2 * D * (i // D) + i % D) * RR + r
        xmask = (offs_m < M)[:, None] & rmask[None, :]
        x0 = tl.load(x_ptr + offs_m[:, None] * stride_xm + k0[None, :], mask=xmask & (k0 < K)[None, :], other=0.0,
                     eviction_policy="evict_last")
        x1 = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + D * RR)[None, :],
                     mask=xmask & (k0 + D * RR < K)[None, :], other=0.0, eviction_policy="evict_last")
        if FP32_DOT:
            acc = tl.dot(x0.to(tl.float32), w_lo.to(tl.float32), acc, input_precision="ieee")
            acc = tl.dot(x1.to(tl.float32), w_hi.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x0, w_lo, acc)
            acc = tl.dot(x1, w_hi, acc)
    return acc


@triton.jit
def _load_t(ptrs, mask, T_CG: tl.constexpr):
    """Load t (fp32); T_CG: from L2 (t was written during this launch), never a stale L1 line."""
    if T_CG:
        return tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg")
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _epilogue(acc, y_ptr, t_ptr, b_ptr, bias_ptr, offs_m, offs_n, M, N, rank, stride_ym, seg1, seg2,
              RANK_P: tl.constexpr, HAS_BRANCH: tl.constexpr, HAS_BIAS: tl.constexpr,
              BRANCH_TF32: tl.constexpr, INTERP_BF16: tl.constexpr, BRANCH_DOT: tl.constexpr = True,
              T_CG: tl.constexpr = False, N_SEG: tl.constexpr = 1):
    """y tile = acc (+ t @ B^T) (+ bias), stored in y's dtype.  t: fp32 (M, N_SEG * rank); B: fp16 (N, rank).
    N_SEG > 1 (merged layers, engine.merge): columns [0, seg1), [seg1, seg2), [seg2, N) are segments
    0, 1, 2, and column n takes its segment's slice of t: y[:, n] += t[:, s * rank:(s + 1) * rank] @ B[n]
    (B = the layers' B stacked, no block-diagonal zeros read).
    BRANCH_DOT: t @ B^T with tl.dot (qgemm, 16+ rows), one dot per segment on B loaded masked to it (decode
    tiles; quant_matmul adds a merged layer's branch after prefill tiles); else on
    CUDA cores in fp32 (gemv, 1-4 rows), each column's t slice gathered (t is a few hundred bytes: L1).
    T_CG: t was written during this launch (gemv's fused branch): read it from L2, never a stale L1 line."""
    mmask = offs_m < M
    nmask = offs_n < N
    if HAS_BRANCH:
        RC: tl.constexpr = min(RANK_P, 32 if BRANCH_DOT and N_SEG == 1 else 16)
        t_stride = rank * N_SEG
        seg = (offs_n >= seg1).to(tl.int32)
        if N_SEG > 2:
            seg += (offs_n >= seg2).to(tl.int32)
        if N_SEG > 1 and BRANCH_DOT:
            # per segment that meets this tile (a run-time branch: one B tile live at a time, and most
            # tiles meet one segment), t's slice @ B loaded masked to the segment's columns
            seg_lo = tl.min(tl.where(nmask, seg, N_SEG), axis=0)
            seg_hi = tl.max(tl.where(nmask, seg, 0), axis=0)
            for s in tl.static_range(N_SEG):
                if (seg_lo <= s) & (s <= seg_hi):
                    for r0 in tl.static_range(0, RANK_P, RC):
                        rr = r0 + tl.arange(0, RC)
                        rmask = rr < rank
                        t = _load_t(t_ptr + offs_m[:, None] * t_stride + s * rank + rr[None, :],
                                    mmask[:, None] & rmask[None, :], T_CG)
                        bs = tl.load(b_ptr + offs_n[None, :] * rank + rr[:, None],
                                     mask=rmask[:, None] & (nmask & (seg == s))[None, :], other=0.0).to(tl.float32)
                        if BRANCH_TF32:
                            acc = tl.dot(t, bs, acc, input_precision="tf32")
                        else:
                            acc = tl.dot(t, bs, acc, input_precision="ieee")
        else:
            for r0 in tl.static_range(0, RANK_P, RC):
                rr = r0 + tl.arange(0, RC)
                rmask = rr < rank
                bt = tl.load(b_ptr + offs_n[None, :] * rank + rr[:, None], mask=rmask[:, None] & nmask[None, :],
                             other=0.0).to(tl.float32)
                if N_SEG > 1:  # CUDA cores: each column's own slice of t, gathered
                    t3 = _load_t(t_ptr + offs_m[:, None, None] * t_stride + (seg * rank)[None, None, :]
                                 + rr[None, :, None], mmask[:, None, None] & rmask[None, :, None], T_CG)
                    acc += tl.sum(t3 * bt[None, :, :], axis=1)
                else:
                    t = _load_t(t_ptr + offs_m[:, None] * t_stride + rr[None, :], mmask[:, None] & rmask[None, :],
                                T_CG)
                    if not BRANCH_DOT:
                        acc += tl.sum(t[:, :, None] * bt[None, :, :], axis=1)
                    elif BRANCH_TF32:  # fp16 B is exact in tf32; only t is rounded (to 10 mantissa bits)
                        acc = tl.dot(t, bt, acc, input_precision="tf32")
                    else:
                        acc = tl.dot(t, bt, acc, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    if INTERP_BF16:
        out = _bf16_rne(acc)
    else:
        out = acc.to(y_ptr.dtype.element_ty)
    tl.store(y, out, mask=mmask[:, None] & nmask[None, :])


@triton.jit
def _last_of_split(acc, ws_ptr, cnt_ptr, tile, pid_k, n_split, offs_m, offs_n, M, ld_m, ld_n):
    """Publish this program's partial acc; return (is_last, sum of all partials in split order).

    ws: fp32 (n_split, ld_m, ld_n) scratch, rows >= M never touched; cnt: int32 per tile, 0 on
    entry and reset to 0 by the last program, so it needs no memset between launches (launches on
    one stream run one after another).  Partials are summed in split order (deterministic)."""
    rows = (offs_m < M)[:, None] & (offs_n >= 0)[None, :]
    ws = ws_ptr + (pid_k * ld_m + offs_m[:, None]) * ld_n + offs_n[None, :]
    tl.store(ws, acc, mask=rows)
    tl.debug_barrier()  # every thread's partial is written before the release below
    done = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
    is_last = done == n_split - 1
    total = tl.zeros_like(acc)
    # partials loaded back to back: one L2 round trip per group of UNROLL, not per partial; small tiles
    # (decode) take 4 at once, large ones fewer (their registers would spill)
    UNROLL: tl.constexpr = max(1, min(4, 4096 // (offs_m.shape[0] * offs_n.shape[0])))
    if is_last:
        for s0 in range(0, n_split, UNROLL):
            for i in tl.static_range(UNROLL):
                part = ws_ptr + ((s0 + i) * ld_m + offs_m[:, None]) * ld_n + offs_n[None, :]
                live = (offs_m * 0 + (s0 + i)) < n_split  # (rows,): this partial exists
                total += tl.load(part, mask=rows & live[:, None], other=0.0, cache_modifier=".cg")
        tl.atomic_xchg(cnt_ptr + tile, 0)
    return is_last, total


@triton.jit
def qgemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr, t_ptr, b_ptr, bias_ptr,
                 M, N, Np, K, G, n_full, tail_rows, n_blocks, rank, stride_xm, stride_ym, seg1, seg2,
                 BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 RANK_P: tl.constexpr, USE_WS: tl.constexpr, HAS_BRANCH: tl.constexpr,
                 HAS_BIAS: tl.constexpr, INTERP_BF16: tl.constexpr, BRANCH_TF32: tl.constexpr,
                 FP32_DOT: tl.constexpr, HALF2: tl.constexpr = False, TAIL_ROWS: tl.constexpr = 0,
                 N_SEG: tl.constexpr = 1):
    """y (M, N) = x (M, K) @ dequant(qweight)^T (+ t @ B^T) (+ bias).

    x: fp16/bf16 (M, K), row stride stride_xm, unit column stride.  qweight: int32 fbq1 layout
    (bits * (16 * n_full + tail_rows), Np); n_blocks = n_full + (tail_rows > 0).  scales, zeros:
    fp16 (G, Np).  y: x's dtype (M, N), row stride stride_ym.  t: fp32 (M, rank); B: fp16
    (N, rank), t then (M, N_SEG * rank) for N_SEG segments starting at columns 0, seg1, seg2 (_epilogue);
    bias: (N,).  FP32_DOT: dot on fp32 operands (sm_75: Triton has no tensor-core dot).
    Grid: (cdiv(N, BLOCK_N), cdiv(M, BLOCK_M), split_k); with split_k > 1 USE_WS must be set and
    ws be fp32 (split_k, grid_m * BLOCK_M, grid_n * BLOCK_N), cnt int32 (grid_m * grid_n,) zeros.
    """
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    n_split = tl.num_programs(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    per = tl.cdiv(n_blocks, n_split)
    b0 = pid_k * per
    b1 = tl.minimum(b0 + per, n_blocks)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HALF2:  # fp16 x: packed half2 dequantization, K = 32 dots (_block_dot_h2)
        for b in range(b0, tl.minimum(b1, n_full)):
            acc = _block_dot_h2(acc, x_ptr, qw_ptr, s_ptr, z_ptr, offs_m, offs_n, b * 512, b * (BITS * 16),
                                M, K, Np, G, stride_xm, BITS, GROUP, 16, FP32_DOT)
        if TAIL_ROWS > 0:
            if b1 > n_full:
                acc = _block_dot_h2(acc, x_ptr, qw_ptr, s_ptr, z_ptr, offs_m, offs_n, n_full * 512,
                                    n_full * (BITS * 16), M, K, Np, G, stride_xm, BITS, GROUP, TAIL_ROWS, FP32_DOT)
    else:
        for b in range(b0, b1):
            rr = tl.where(b < n_full, 16, tail_rows)
            acc = _block_dot(acc, x_ptr, qw_ptr, s_ptr, z_ptr, offs_m, offs_n, b * 512, b * (BITS * 16), rr,
                             M, K, Np, G, stride_xm, BITS, GROUP, INTERP_BF16, FP32_DOT)
    if USE_WS:
        tile = pid_m * tl.num_programs(0) + pid_n
        ld_m = tl.num_programs(1) * BLOCK_M
        ld_n = tl.num_programs(0) * BLOCK_N
        is_last, total = _last_of_split(acc, ws_ptr, cnt_ptr, tile, pid_k, n_split, offs_m, offs_n, M,
                                        ld_m, ld_n)
        if is_last:
            _epilogue(total, y_ptr, t_ptr, b_ptr, bias_ptr, offs_m, offs_n, M, N, rank, stride_ym, seg1, seg2,
                      RANK_P, HAS_BRANCH, HAS_BIAS, BRANCH_TF32, INTERP_BF16, N_SEG=N_SEG)
    else:
        _epilogue(acc, y_ptr, t_ptr, b_ptr, bias_ptr, offs_m, offs_n, M, N, rank, stride_ym, seg1, seg2,
                  RANK_P, HAS_BRANCH, HAS_BIAS, BRANCH_TF32, INTERP_BF16, N_SEG=N_SEG)


@triton.jit
def branch_down_kernel(x_ptr, a_ptr, t_ptr, ws_ptr, cnt_ptr, M, K, rank, stride_xm,
                       BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, RANK_P: tl.constexpr,
                       USE_WS: tl.constexpr, INTERP_BF16: tl.constexpr, FP32_DOT: tl.constexpr):
    """t (M, rank) fp32 = x (M, K) @ A^T.  x: fp16/bf16, row stride stride_xm; A: fp16 (rank, K).

    Grid: (split, cdiv(M, BLOCK_M), cdiv(rank, RANK_P)); program (s, i, j) covers one K slice of rows
    tile i and t's columns j * RANK_P.. (a merged layer's t is up to 2 tiles wide).  With split > 1
    USE_WS must be set, ws fp32 (split, grid_m * BLOCK_M, grid_r * RANK_P), cnt int32 (grid_m * grid_r,)
    zeros.
    """
    pid_k = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_r = tl.program_id(2)
    n_split = tl.num_programs(0)
    DT = x_ptr.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = pid_r * RANK_P + tl.arange(0, RANK_P)
    kps = tl.cdiv(tl.cdiv(K, n_split), BLOCK_K) * BLOCK_K
    k0 = pid_k * kps
    k1 = tl.minimum(k0 + kps, K)
    mmask = (offs_m < M)[:, None]
    rmask = (rr < rank)[None, :]
    acc = tl.zeros((BLOCK_M, RANK_P), dtype=tl.float32)
    for kk in range(k0, k1, BLOCK_K):
        k = kk + tl.arange(0, BLOCK_K)
        kmask = k < k1
        xk = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=mmask & kmask[None, :],
                     other=0.0, eviction_policy="evict_last")
        ak = tl.load(a_ptr + rr[None, :] * K + k[:, None], mask=kmask[:, None] & rmask, other=0.0,
                     eviction_policy="evict_first")
        if INTERP_BF16:  # A rounded to bf16 as on the GPU, fp32 math (see _block_dot)
            acc = tl.dot(xk.to(tl.float32), _bf16_rne(ak.to(tl.float32)).to(tl.float32), acc,
                         input_precision="ieee")
        elif FP32_DOT:  # sm_75, see _block_dot
            acc = tl.dot(xk.to(tl.float32), ak.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(xk, ak.to(DT), acc)
    tp = t_ptr + offs_m[:, None] * rank + rr[None, :]
    if USE_WS:
        is_last, total = _last_of_split(acc, ws_ptr, cnt_ptr, pid_r * tl.num_programs(1) + pid_m, pid_k, n_split,
                                        offs_m, rr, M, tl.num_programs(1) * BLOCK_M, tl.num_programs(2) * RANK_P)
        if is_last:
            tl.store(tp, total, mask=mmask & rmask)
    else:
        tl.store(tp, acc, mask=mmask & rmask)


@triton.jit
def branch_gemv_kernel(x_ptr, a_ptr, t_ptr, ws_ptr, cnt_ptr, K, rank,
                       BLOCK_K: tl.constexpr, RANK_P: tl.constexpr, SPLIT_P: tl.constexpr, USE_WS: tl.constexpr):
    """t (1, rank) fp32 = x (1, K) @ A^T on CUDA cores: branch_down for one row (decode at batch 1).

    Grid: (split,), split <= SPLIT_P; program s covers one K slice.  With split > 1 USE_WS must be set,
    ws fp32 (split, RANK_P) and cnt int32 (1,) zero: the last program to finish loads every partial in
    one (SPLIT_P, RANK_P) tile and sums it (one L2 round trip; branch_down_kernel's 16-row tiles took one
    per 4 partials, 6-9.5 us a call on an H100).  fp32 products of fp16 A and x in fp32: no tl.dot."""
    pid = tl.program_id(0)
    n_split = tl.num_programs(0)
    rr = tl.arange(0, RANK_P)
    rmask = rr < rank
    kps = tl.cdiv(tl.cdiv(K, n_split), BLOCK_K) * BLOCK_K
    k0 = pid * kps
    k1 = tl.minimum(k0 + kps, K)
    acc = tl.zeros((RANK_P,), dtype=tl.float32)
    for kk in range(k0, k1, BLOCK_K):
        k = kk + tl.arange(0, BLOCK_K)
        kmask = k < k1
        xk = tl.load(x_ptr + k, mask=kmask, other=0.0).to(tl.float32)
        ak = tl.load(a_ptr + rr[:, None] * K + k[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0,
                     eviction_policy="evict_first").to(tl.float32)
        acc += tl.sum(ak * xk[None, :], axis=1)
    if USE_WS:
        tl.store(ws_ptr + pid * RANK_P + rr, acc)
        tl.debug_barrier()  # every thread's partial is written before the release below
        done = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu")
        if done == n_split - 1:
            ss = tl.arange(0, SPLIT_P)
            parts = tl.load(ws_ptr + ss[:, None] * RANK_P + rr[None, :], mask=(ss < n_split)[:, None], other=0.0,
                            cache_modifier=".cg")
            tl.store(t_ptr + rr, tl.sum(parts, axis=0), mask=rmask)
            tl.atomic_xchg(cnt_ptr, 0)
    else:
        tl.store(t_ptr + rr, acc, mask=rmask)
