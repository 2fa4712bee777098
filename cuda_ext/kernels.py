"""Triton kernels of the quantized linear layer (launchers in cuda_ext/launch.py).

qgemm_kernel   y = x @ dequant(Wq)^T (+ t @ B^T) (+ bias).  Decode (m <= 16): BLOCK_M = 16, split-K
               over the 512-wide K blocks; the last program of a column tile to finish (an atomic
               counter) sums the partials in a fixed order (deterministic, no memset, no second
               launch) and runs the epilogue.  Prefill (m > 16): BLOCK_M 32..128 tiles, split-K
               only where the config table allows it.
gemv_kernel    the same for 1-4 rows on CUDA cores (decode at batch 1): (code - zero) exactly from the
               packed words, fp32 sums; one fp16 row in packed half2 math (_gemv_block_h2).
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


@triton.jit
def _bf16_rne(v):
    """fp32 -> bf16 rounded to nearest even, as the GPU's cvt.rn does.  Only for the interpreter
    (INTERP_BF16), whose fp32 -> bf16 cast truncates."""
    b = v.to(tl.int32, bitcast=True)
    b = b + 0x7FFF + ((b >> 16) & 1)
    return (b & -65536).to(tl.float32, bitcast=True).to(tl.bfloat16)


@triton.jit
def _load_sz(s_ptr, z_ptr, grp, offs_n, r, Np, G, DT: tl.constexpr):
    """Scale and offset zero of group `grp` for the column tile, broadcast to the weight tile's
    shape (16, BLOCK_N): loading them in that shape gives them the weight tile's register layout
    (16-byte loads, L1 hits for the repeated rows) instead of a shared-memory layout conversion.

    fp16: (s, zero + 1024) in fp16; otherwise (s, zero + 2**23) in fp32 (see _block_dot)."""
    cols = offs_n[None, :] + 0 * r[:, None]
    # (cols * 0 + grp): the interpreter cannot AND a scalar mask into a block mask
    mask = (cols < Np) & ((cols * 0 + grp) < G)
    s = tl.load(s_ptr + grp * Np + cols, mask=mask, other=0.0)
    z = tl.load(z_ptr + grp * Np + cols, mask=mask, other=0.0)
    if DT == tl.float16:
        return s, z + 1024.0
    else:
        return s.to(tl.float32), z.to(tl.float32) + 8388608.0


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
                               kb // GROUP + ((2 * D * (i // D) + i % D + D) * RR) // GROUP, offs_n, r0, Np, G)
        if BITS != 3 and i % D == 0:  # a new plane word
            w = tl.load(wp + (i // D) * RR * Np, mask=wmask, other=0, eviction_policy="evict_first")
        v = _h2_word(w, w_odd, h, i, BITS)
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
def _epilogue(acc, y_ptr, t_ptr, b_ptr, bias_ptr, offs_m, offs_n, M, N, rank, stride_ym,
              RANK_P: tl.constexpr, HAS_BRANCH: tl.constexpr, HAS_BIAS: tl.constexpr,
              BRANCH_TF32: tl.constexpr, INTERP_BF16: tl.constexpr, BRANCH_DOT: tl.constexpr = True,
              T_CG: tl.constexpr = False):
    """y tile = acc (+ t @ B^T) (+ bias), stored in y's dtype.  t: fp32 (M, rank); B: fp16 (N, rank).
    BRANCH_DOT: t @ B^T with tl.dot (qgemm, 16+ rows); else on CUDA cores in fp32 (gemv, 1-4 rows).
    T_CG: t was written during this launch (gemv's fused branch): read it from L2, never a stale L1 line."""
    mmask = offs_m < M
    nmask = offs_n < N
    if HAS_BRANCH:
        RC: tl.constexpr = min(RANK_P, 32 if BRANCH_DOT else 16)
        for r0 in tl.static_range(0, RANK_P, RC):
            rr = r0 + tl.arange(0, RC)
            rmask = rr < rank
            if T_CG:
                t = tl.load(t_ptr + offs_m[:, None] * rank + rr[None, :], mask=mmask[:, None] & rmask[None, :],
                            other=0.0, cache_modifier=".cg")
            else:
                t = tl.load(t_ptr + offs_m[:, None] * rank + rr[None, :], mask=mmask[:, None] & rmask[None, :],
                            other=0.0)
            bt = tl.load(b_ptr + offs_n[None, :] * rank + rr[:, None], mask=rmask[:, None] & nmask[None, :],
                         other=0.0).to(tl.float32)
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
                 M, N, Np, K, G, n_full, tail_rows, n_blocks, rank, stride_xm, stride_ym,
                 BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 RANK_P: tl.constexpr, USE_WS: tl.constexpr, HAS_BRANCH: tl.constexpr,
                 HAS_BIAS: tl.constexpr, INTERP_BF16: tl.constexpr, BRANCH_TF32: tl.constexpr,
                 FP32_DOT: tl.constexpr, HALF2: tl.constexpr = False, TAIL_ROWS: tl.constexpr = 0):
    """y (M, N) = x (M, K) @ dequant(qweight)^T (+ t @ B^T) (+ bias).

    x: fp16/bf16 (M, K), row stride stride_xm, unit column stride.  qweight: int32 fbq1 layout
    (bits * (16 * n_full + tail_rows), Np); n_blocks = n_full + (tail_rows > 0).  scales, zeros:
    fp16 (G, Np).  y: x's dtype (M, N), row stride stride_ym.  t: fp32 (M, rank); B: fp16
    (N, rank); bias: (N,).  FP32_DOT: dot on fp32 operands (sm_75: Triton has no tensor-core dot).
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
            _epilogue(total, y_ptr, t_ptr, b_ptr, bias_ptr, offs_m, offs_n, M, N, rank, stride_ym,
                      RANK_P, HAS_BRANCH, HAS_BIAS, BRANCH_TF32, INTERP_BF16)
    else:
        _epilogue(acc, y_ptr, t_ptr, b_ptr, bias_ptr, offs_m, offs_n, M, N, rank, stride_ym,
                  RANK_P, HAS_BRANCH, HAS_BIAS, BRANCH_TF32, INTERP_BF16)


@triton.jit
def branch_down_kernel(x_ptr, a_ptr, t_ptr, ws_ptr, cnt_ptr, M, K, rank, stride_xm,
                       BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, RANK_P: tl.constexpr,
                       USE_WS: tl.constexpr, INTERP_BF16: tl.constexpr, FP32_DOT: tl.constexpr):
    """t (M, rank) fp32 = x (M, K) @ A^T.  x: fp16/bf16, row stride stride_xm; A: fp16 (rank, K).

    Grid: (split, cdiv(M, BLOCK_M)); program (s, i) covers one K slice of rows tile i.  With
    split > 1 USE_WS must be set, ws fp32 (split, grid_m * BLOCK_M, RANK_P), cnt int32 (grid_m,) zeros.
    """
    pid_k = tl.program_id(0)
    pid_m = tl.program_id(1)
    n_split = tl.num_programs(0)
    DT = x_ptr.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, RANK_P)
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
        is_last, total = _last_of_split(acc, ws_ptr, cnt_ptr, pid_m, pid_k, n_split, offs_m, rr, M,
                                        tl.num_programs(1) * BLOCK_M, RANK_P)
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


def gemv_magic(bits: int) -> int:
    """gemv_kernel's `magic` argument: the fp32 bits of 2**(23 - B0), B0 = 4 at 3 bits, else 0.
    A run-time argument, not a constant, so the compiler keeps it in one register and each field's
    AND-OR takes its mask as the immediate (a constant OR would cost a move per field)."""
    return (150 - gemv_b0(bits)) << 23


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
def _h2_word(w, w_odd, h, I: tl.constexpr, BITS: tl.constexpr):
    """Pair I's two codes on the mantissas of two fp16 1024s (one int32: fp16 bit patterns in both halves).
    w: the plane word holding pair I (4/2 bits: fields I % D and I % D + D; 3 bits: see _h2_planes)."""
    if BITS == 3:
        src = w if I < 8 else w_odd
        if I >= 2:
            hb = (h >> (I - 2)) & 0x00040004  # high bits of chunks I and I + 16 to bit 2 of each half
        else:
            hb = (h << (2 - I)) & 0x00040004
        return ((src >> (2 * (I % 8))) & 0x00030003) | hb | 0x64006400
    elif BITS == 4:
        return ((w >> (4 * (I % 4))) & 0x000F000F) | 0x64006400
    else:
        return ((w >> (2 * (I % 8))) & 0x00030003) | 0x64006400


@triton.jit
def _h2_scales(s_ptr, z_ptr, grp0, grp1, offs_n, rows, Np, G):
    """Scales and -(1024 + zero) of groups grp0 (half 0) and grp1 (half 1) as fp16 pairs (rows, BLOCK_N, 2);
    `rows` sets the shape they load in (see _load_sz)."""
    s0, z0 = _load_sz(s_ptr, z_ptr, grp0, offs_n, rows, Np, G, tl.float16)
    s1, z1 = _load_sz(s_ptr, z_ptr, grp1, offs_n, rows, Np, G, tl.float16)
    return tl.join(s0, s1), -tl.join(z0, z1)  # _load_sz gave zero + 1024


@triton.jit
def _half_pairs(v):
    """(16, BLOCK_N) int32 words whose two 16-bit halves are fp16 bit patterns -> (16, BLOCK_N, 2) fp16."""
    return tl.join(v.to(tl.int16), (v >> 16).to(tl.int16)).to(tl.float16, bitcast=True)


@triton.jit
def _h2_x(x_ptr, kv, kmask, MASKED: tl.constexpr):
    """x[0, kv] as fp16 times 1/16 (exact): the scale that keeps a group's fp16 partial sums far
    from overflow (|x| up to ~1.8e4 at 3 bits g128); gemv_kernel multiplies the sum back by 16."""
    if MASKED:
        x = tl.load(x_ptr + kv, mask=kmask, other=0.0, eviction_policy="evict_last")
    else:
        x = tl.load(x_ptr + kv, eviction_policy="evict_last")
    return x * 0.0625


@triton.jit
def _gemv_block_h2(acc, x_ptr, qw_ptr, s_ptr, z_ptr, offs_n, kb, rb, K, Np, G,
                   BITS: tl.constexpr, GROUP: tl.constexpr, RR: tl.constexpr):
    """acc (16, BLOCK_N, 2) fp32 += one fp16 row of x times dequant(W) over one K block, in packed
    half2 math: one AND-OR puts two chunks' codes on the mantissas of two fp16 1024s, one add of
    -(1024 + zero) per half gives (code - zero) exactly (zeros are integers), one half2 FMA adds
    x * (code - zero) into an fp16 partial sum of the group, and the group's end adds that partial,
    scaled, into fp32.  Pair i holds chunks c0 = 2D * (i // D) + i % D and c0 + D in a word's two
    halves: D = 4 at 4 bits and 8 at 2 bits (a plane word's fields f and f + 16 / FB); at 3 bits
    D = 16, the two low planes' words rearranged once per block so that chunk c's and c + 16's fields
    share bit positions, and the high-bit plane's bits c and c + 16 moved to bit 2 of each half."""
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
                               kb // GROUP + ((2 * D * (i // D) + i % D + D) * RR) // GROUP, offs_n, r, Np, G)
            s = s.to(tl.float32)
        if BITS != 3 and i % D == 0:  # a new plane word
            w = tl.load(wp + (i // D) * RR * Np, mask=wmask, other=0, eviction_policy="evict_first")
        v = _h2_word(w, w_odd, h, i, BITS)
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
               BITS: tl.constexpr, GROUP: tl.constexpr, MR: tl.constexpr, BLOCK_N: tl.constexpr,
               TAIL_ROWS: tl.constexpr, RANK_P: tl.constexpr, USE_WS: tl.constexpr, HAS_BRANCH: tl.constexpr,
               HAS_BIAS: tl.constexpr, INTERP_BF16: tl.constexpr, HALF2: tl.constexpr, FUSED_BRANCH: tl.constexpr):
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
        acc = tl.zeros((16, BLOCK_N, 2), dtype=tl.float32)
        for b in range(b0, tl.minimum(b1, n_full)):
            acc = _gemv_block_h2(acc, x_ptr, qw_ptr, s_ptr, z_ptr, offs_n, b * 512, b * (BITS * 16), K, Np, G,
                                 BITS, GROUP, 16)
        if TAIL_ROWS > 0:
            if b1 > n_full:
                acc = _gemv_block_h2(acc, x_ptr, qw_ptr, s_ptr, z_ptr, offs_n, n_full * 512, n_full * (BITS * 16),
                                     K, Np, G, BITS, GROUP, TAIL_ROWS)
        part = tl.where(sel == 0, tl.sum(tl.sum(acc, axis=2), axis=0)[None, :] * 16.0, 0.0)  # undoes x / 16
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
            if FUSED_BRANCH:
                _wait_for_t(cnt_ptr + n_tiles)
            _epilogue(total, y_ptr, t_ptr, b_ptr, bias_ptr, offs_m, offs_n, M, N, rank, stride_ym,
                      RANK_P, HAS_BRANCH, HAS_BIAS, False, INTERP_BF16, BRANCH_DOT=False, T_CG=FUSED_BRANCH)
            if FUSED_BRANCH:
                _tile_done(cnt_ptr + n_tiles, n_tiles)
    else:
        if FUSED_BRANCH:
            _wait_for_t(cnt_ptr + n_tiles)
        _epilogue(part, y_ptr, t_ptr, b_ptr, bias_ptr, offs_m, offs_n, M, N, rank, stride_ym,
                  RANK_P, HAS_BRANCH, HAS_BIAS, False, INTERP_BF16, BRANCH_DOT=False, T_CG=FUSED_BRANCH)
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
                a_ptr, tws_ptr, n_tiles, n_split, n_parts,
                BITS: tl.constexpr, GROUP: tl.constexpr, MR: tl.constexpr, BLOCK_N: tl.constexpr,
                TAIL_ROWS: tl.constexpr, RANK_P: tl.constexpr, USE_WS: tl.constexpr,
                HAS_BRANCH: tl.constexpr, HAS_BIAS: tl.constexpr, INTERP_BF16: tl.constexpr,
                HALF2: tl.constexpr = False, FUSED_BRANCH: tl.constexpr = False, BLOCK_KA: tl.constexpr = 128,
                PARTS_P: tl.constexpr = 32):
    """y (M, N) = x (M, K) @ dequant(qweight)^T (+ t @ B^T) (+ bias) for M <= MR rows on CUDA cores.
    HALF2 (one fp16 row, MR = 1): the packed half2 math of _gemv_block_h2, else fp32 (_gemv_block).

    Without FUSED_BRANCH: grid (n_tiles, 1, n_split), t computed before by branch_down, and the same
    split-K protocol as qgemm_kernel.  FUSED_BRANCH (one row): the branch's t = x @ A^T is made inside
    this launch, no branch_down: a 1-D grid of n_parts + n_tiles * n_split programs, each taking a
    ticket (an atomic counter) as it starts; tickets below n_parts compute a K slice of t
    (_branch_part), the others a tile's split as usual, and a tile's epilogue waits for t.  Taking
    roles by ticket, not by program id, is what makes the wait safe: a program that holds a ticket is
    running, so every branch part is running or done by the time any tile waits.
    The tail block's row count is a compile-time constant (TAIL_ROWS, 0 = none), so every field
    position, group start and shift is resolved at compile time."""
    if FUSED_BRANCH:
        ticket = tl.atomic_add(cnt_ptr + n_tiles, 1, sem="relaxed", scope="gpu")
        if ticket < n_parts:
            _branch_part(x_ptr, a_ptr, tws_ptr, t_ptr, cnt_ptr + n_tiles, ticket, n_parts, K, rank,
                         RANK_P, BLOCK_KA, PARTS_P)
        else:
            w = ticket - n_parts
            _gemv_tile(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr, t_ptr, b_ptr, bias_ptr,
                       M, N, Np, K, G, n_full, n_blocks, rank, stride_xm, stride_ym, magic, w % n_tiles,
                       w // n_tiles, n_split, n_tiles, BITS, GROUP, MR, BLOCK_N, TAIL_ROWS, RANK_P, USE_WS,
                       HAS_BRANCH, HAS_BIAS, INTERP_BF16, HALF2, True)
    else:
        _gemv_tile(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr, t_ptr, b_ptr, bias_ptr,
                   M, N, Np, K, G, n_full, n_blocks, rank, stride_xm, stride_ym, magic, tl.program_id(0),
                   tl.program_id(2), tl.num_programs(2), tl.num_programs(0), BITS, GROUP, MR, BLOCK_N, TAIL_ROWS,
                   RANK_P, USE_WS, HAS_BRANCH, HAS_BIAS, INTERP_BF16, HALF2, False)
