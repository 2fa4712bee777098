"""QDEC correction kernels: select the salient channels, gather their residual rows, dequantize,
accumulate (reference: cuda_ext.qdec_reference.approx_topk and qdec_correction_ref).

    acc (M, N) fp32 += sum_j x[m, idx[m, j]] * dequant(rcodes[idx[m, j]])

rcodes uint8 (K, ceil(N/2)) and rscales fp16 (N,) live in host memory on a GPU: pinned (and, with
unified addressing, device-addressable), so the kernel reads only the selected rows over PCIe
(zero-copy; a cudaMemcpy would need ~256 KB blocks to use the link, a row is ceil(N/2) bytes).
Under TRITON_INTERPRET=1 everything is a plain CPU tensor.

Grid (M, cdiv(S, BLOCK_S), cdiv(ceil(N/2), BLOCK_B)): a program owns BLOCK_S selected channels of one
row and BLOCK_B bytes of their residual rows (2 * BLOCK_B output columns: the low nibbles are the even
outputs, the high ones the odd); it sums its channels in registers (fp32) and adds the partial into
`acc` with fp32 atomics (tl.atomic_add on bf16 raises in the interpreter, and fp32 keeps the sum exact
enough). Contiguous 256-byte row pieces read 16 bytes per thread: zero-copy reads over PCIe go as
wide requests (the first form read 64 bytes per row per program, each byte twice, and reached 8.6 GB/s
of the H100 host's 55 GB/s link, bench/RESULTS.md). Few programs, so it runs on its own stream
beside the base GEMV.

qdec_select_kernel is the selection in one launch (no sort, no host sync): approx_topk's buckets. Its
first form (a 1024 x 32 compare matrix, two scans, 4 warps: 1768 SASS instructions per thread on sm_90)
took ~18 us per layer on an H100, as long as the base kernel; this one (a histogram, one packed scan, 16
warps: 416 per thread, compiled here with Triton 3.9) is not yet timed on a GPU.

qdec_fused_kernel is what the served model runs (qdec_select_gather): the selection and the gather in ONE
launch, each (row, chunk, byte block) program selecting its chunk's channels itself and writing its own
slice of per-chunk fp32 partials (no atomics, so no zeroed accumulator), and qdec_add_kernel adds the
partials into the layer's output after the join. Per corrected linear that is 2 kernels instead of 4
(selection, memset, gather, add). Written 2026-11-27 after the GPU sessions; not yet timed on a GPU
(bench/qdec.py times both forms in one run).

GPU status: tests/test_gpu_qdec.py passed compiled on an H100 (2026-11-27, two sessions): the zero-copy
gather from pinned rows and scales, the SideStream launch/join, qdec_select equal to approx_topk, and the
side stream captured in a CUDA graph. Timed (bench/RESULTS.md "QDEC" -> "On a GPU"): qdec_select takes
~18 us per layer and the gather reaches 12-13.5 GB/s of the 55 GB/s link, so QDEC costs more than the
base step on an H100; both kernels are the next things to make cheaper.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from .launch import interpreting
from .qdec_reference import BUCKETS, CHUNK, selected_count


# Launch parameters, the same on every arch (`fbserve kernels check` compiles them for each)
GATHER_CONFIG = {"block_s": 8, "block_b": 256, "num_warps": 4, "num_stages": 1}
SELECT_CONFIG = {"num_warps": 16, "num_stages": 1}
FUSED_CONFIG = {"block_s": 8, "block_b": 256, "num_warps": 4, "num_stages": 1}  # 16 B per thread per load
ADD_BLOCK = 1024
ADD_WARPS = 4


@triton.jit
def _row_sums(x_row, idx_row, offs_s, smask, rc_ptr, NB, offs_b, bmask):
    """(even, odd) fp32 (BLOCK_B,): sum over the channels idx_row[offs_s] of x_row[channel] times the
    residual codes (code - 8) in bytes offs_b of their rows (low nibbles: outputs 2b, high: 2b + 1)."""
    ch = tl.load(idx_row + offs_s, mask=smask, other=0)  # (BLOCK_S,) channels
    xs = tl.load(x_row + ch, mask=smask, other=0.0).to(tl.float32)
    # the selected rows' bytes, streamed once (evict_first); masked bytes are 0x88: codes 0
    byte = tl.load(rc_ptr + ch.to(tl.int64)[:, None] * NB + offs_b[None, :],
                   mask=smask[:, None] & bmask[None, :], other=0x88, eviction_policy="evict_first").to(tl.int32)
    even = tl.sum(((byte & 0xF) - 8).to(tl.float32) * xs[:, None], axis=0)
    odd = tl.sum(((byte >> 4) - 8).to(tl.float32) * xs[:, None], axis=0)
    return even, odd


@triton.jit
def _column_scales(rs_ptr, offs_b, N):
    """The output columns of bytes offs_b (even n0, odd n1) and their residual scales in fp32 (0 past N)."""
    n0 = 2 * offs_b
    n1 = n0 + 1
    s0 = tl.load(rs_ptr + n0, mask=n0 < N, other=0.0).to(tl.float32)
    s1 = tl.load(rs_ptr + n1, mask=n1 < N, other=0.0).to(tl.float32)
    return n0, n1, s0, s1


@triton.jit
def qdec_gather_kernel(x_ptr, idx_ptr, rc_ptr, rs_ptr, acc_ptr, S, N, NB, stride_xm, stride_im, stride_am,
                       BLOCK_S: tl.constexpr, BLOCK_B: tl.constexpr):
    """x: fp16/bf16/fp32 (M, K); idx: int32 (M, S); rc: uint8 (K, NB) with NB = ceil(N/2);
    rs: fp16 (N,); acc: fp32 (M, N), added into atomically.  A program reads BLOCK_B contiguous bytes
    (2 * BLOCK_B outputs) of each of BLOCK_S selected rows: 16-byte loads, each byte once."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_b = tl.program_id(2)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    smask = offs_s < S
    bmask = offs_b < NB
    even, odd = _row_sums(x_ptr + pid_m * stride_xm, idx_ptr + pid_m * stride_im, offs_s, smask, rc_ptr, NB,
                          offs_b, bmask)
    n0, n1, s0, s1 = _column_scales(rs_ptr, offs_b, N)
    tl.atomic_add(acc_ptr + pid_m * stride_am + n0, even * s0, mask=n0 < N)
    tl.atomic_add(acc_ptr + pid_m * stride_am + n1, odd * s1, mask=n1 < N)


@triton.jit
def _select_chunk(x_ptr, pid_m, pid_c, K, stride_xm, k_chunk, lo, width, CHUNK: tl.constexpr,
                  BUCKETS: tl.constexpr):
    """approx_topk for one (row, 1024-channel chunk): (channels (CHUNK,), taken mask, rank among the
    taken).  One histogram and one scan (the counts above and inside the threshold bucket packed in one
    int32)."""
    offs = pid_c * CHUNK + tl.arange(0, CHUNK)
    inside = offs < K
    a = tl.abs(tl.load(x_ptr + pid_m * stride_xm + offs, mask=inside, other=0.0).to(tl.float32))
    b = tl.math.div_rn(a - lo, width)  # IEEE division, as torch's
    b = tl.minimum(tl.maximum(tl.floor(b), 0.0), BUCKETS - 1).to(tl.int32)
    b = tl.where(inside, b, 0)  # channels past K counted in bucket 0, taken off below
    c = tl.minimum(K - pid_c * CHUNK, CHUNK)  # channels in this chunk
    kk = tl.minimum(k_chunk, c)
    j = tl.arange(0, BUCKETS)
    hist = tl.histogram(b, BUCKETS) - tl.where(j == 0, CHUNK - c, 0)
    above = tl.cumsum(hist, axis=0, reverse=True)  # channels in buckets >= j
    t = tl.max(tl.where(above >= kk, j, 0), axis=0)  # the threshold bucket
    need = kk - tl.sum(tl.where(j == t + 1, above, 0), axis=0)  # taken from bucket t, in channel order
    gt = ((b > t) & inside).to(tl.int32)
    in_t = ((b == t) & inside).to(tl.int32)
    both = tl.cumsum(gt * 65536 + in_t, axis=0)  # inclusive counts (<= 1024 each) in one scan
    before_gt = (both >> 16) - gt
    before_in = (both & 65535) - in_t
    take = (gt == 1) | ((in_t == 1) & (before_in < need))
    pos = before_gt + tl.minimum(before_in, need)  # taken channels before this one
    return offs, take, pos


@triton.jit
def qdec_select_kernel(x_ptr, out_ptr, K, stride_xm, stride_om, k_chunk, lo, width,
                       CHUNK: tl.constexpr, BUCKETS: tl.constexpr):
    """The approximate per-chunk top-k of |x| (cuda_ext.qdec_reference.approx_topk), one program per
    (row, 1024-channel chunk): no sort, no host sync. out: int32 (M, S), this chunk's channels written in
    channel order at columns chunk * min(k_chunk, CHUNK) onwards."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs, take, pos = _select_chunk(x_ptr, pid_m, pid_c, K, stride_xm, k_chunk, lo, width, CHUNK, BUCKETS)
    base = pid_c * tl.minimum(k_chunk, CHUNK)
    tl.store(out_ptr + pid_m * stride_om + base + pos, offs, mask=take)


@triton.jit
def qdec_fused_kernel(x_ptr, idx_ptr, rc_ptr, rs_ptr, part_ptr, K, N, NB, stride_xm, stride_im, k_chunk, lo,
                      width, CHUNK: tl.constexpr, BUCKETS: tl.constexpr, BLOCK_S: tl.constexpr,
                      BLOCK_B: tl.constexpr):
    """Selection and gather of one (row, 1024-channel chunk, BLOCK_B bytes of the residual rows) in one
    launch: the program selects its chunk's channels (_select_chunk, the same in every program of the
    chunk), writes them to idx (M, S) as qdec_select does (programs of one chunk write the same values),
    reads them back after a barrier, and sums its chunk's rows x dequant into its own slice of part
    (M, chunks, N) fp32: no atomics, so no zeroed accumulator; qdec_add_kernel sums the chunks."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_b = tl.program_id(2)
    offs, take, pos = _select_chunk(x_ptr, pid_m, pid_c, K, stride_xm, k_chunk, lo, width, CHUNK, BUCKETS)
    base = pid_c * tl.minimum(k_chunk, CHUNK)
    tl.store(idx_ptr + pid_m * stride_im + base + pos, offs, mask=take)
    tl.debug_barrier()  # the chunk's channels, written by this program's threads, are visible to all of them
    kk = tl.minimum(k_chunk, tl.minimum(K - pid_c * CHUNK, CHUNK))
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    bmask = offs_b < NB
    even = tl.zeros((BLOCK_B,), dtype=tl.float32)
    odd = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for s0 in range(0, kk, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        smask = offs_s < kk
        e, o = _row_sums(x_ptr + pid_m * stride_xm, idx_ptr + pid_m * stride_im + base, offs_s, smask, rc_ptr,
                         NB, offs_b, bmask)
        even += e
        odd += o
    n0, n1, sc0, sc1 = _column_scales(rs_ptr, offs_b, N)
    out = part_ptr + (pid_m * tl.num_programs(1) + pid_c) * N
    tl.store(out + n0, even * sc0, mask=n0 < N)
    tl.store(out + n1, odd * sc1, mask=n1 < N)


@triton.jit
def qdec_add_kernel(y_ptr, part_ptr, N, C, stride_ym, BLOCK: tl.constexpr):
    """y (M, N) += sum over c of part (M, C, N) fp32, summed in chunk order, rounded once to y's dtype."""
    pid_m = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    y = y_ptr + pid_m * stride_ym + offs
    acc = tl.load(y, mask=mask, other=0.0).to(tl.float32)
    for c in range(0, C):
        acc += tl.load(part_ptr + (pid_m * C + c) * N + offs, mask=mask, other=0.0)
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask)


def qdec_select(x: torch.Tensor, k_chunk: int, lo: float, hi: float) -> torch.Tensor:
    """int32 (M, selected_count(K, k_chunk)): approx_topk's channels in one launch (same buckets, same
    order). x: (M, K) on CUDA (or CPU under TRITON_INTERPRET=1)."""
    if x.dim() != 2:
        raise ValueError(f"x must be (M, K), got {tuple(x.shape)}")
    if not hi > lo:
        raise ValueError(f"approx top-k needs thresholds lo < hi, got {lo}, {hi}")
    if x.device.type != "cuda" and not interpreting():
        raise ValueError(f"qdec_select needs CUDA tensors (or TRITON_INTERPRET=1); x is on {x.device}")
    m, k = x.shape
    out = torch.empty((m, selected_count(k, k_chunk)), dtype=torch.int32, device=x.device)
    if out.numel() == 0:
        return out
    x = x if x.stride(1) == 1 else x.contiguous()
    qdec_select_kernel[(m, triton.cdiv(k, CHUNK))](x, out, k, x.stride(0), out.stride(0), k_chunk, float(lo),
                                                   (hi - lo) / BUCKETS, CHUNK=CHUNK, BUCKETS=BUCKETS,
                                                   num_warps=SELECT_CONFIG["num_warps"])
    return out


class HostPointer:
    """A host tensor handed to a Triton launch by address: pinned memory is device-addressable under
    unified addressing, but a launcher may refuse a CPU tensor, so it sees only data_ptr/dtype."""

    def __init__(self, t: torch.Tensor) -> None:
        self._t = t  # keeps the memory alive
        self.dtype = t.dtype

    def data_ptr(self) -> int:
        return self._t.data_ptr()


def _check_residuals(x: torch.Tensor, rcodes: torch.Tensor, rscales: torch.Tensor) -> tuple[object, object]:
    """The residual arguments of a launch on x's device: rcodes uint8 (K, ceil(N/2)), rscales fp16 (N,),
    pinned host tensors (passed by address, read zero-copy) or device tensors; CPU under the interpreter."""
    k = x.shape[1]
    n = rscales.shape[0]
    if rcodes.dtype != torch.uint8 or tuple(rcodes.shape) != (k, (n + 1) // 2):
        raise ValueError(f"rcodes must be uint8 ({k}, {(n + 1) // 2}); got {rcodes.dtype} {tuple(rcodes.shape)}")
    if rscales.dtype != torch.float16 or rscales.dim() != 1:
        raise ValueError(f"rscales must be float16 (N,); got {rscales.dtype} {tuple(rscales.shape)}")
    if x.device.type != "cuda" and not interpreting():
        raise ValueError(f"QDEC kernels need CUDA tensors (or TRITON_INTERPRET=1); x is on {x.device}")
    if not (rcodes.is_contiguous() and rscales.is_contiguous()):
        raise ValueError("rcodes and rscales must be contiguous")
    on_host = x.device.type == "cuda" and rcodes.device.type == "cpu"
    if on_host and not rcodes.is_pinned():
        raise ValueError("host residuals must be pinned (pin_memory()) to be read zero-copy")
    rc = HostPointer(rcodes) if on_host else rcodes
    if rscales.device == x.device:
        rs = rscales
    elif on_host and rscales.is_pinned():  # read zero-copy too: no GPU memory at all
        rs = HostPointer(rscales)
    else:
        rs = rscales.to(x.device)  # N fp16: tiny, copied per call
    return rc, rs


def qdec_correction(x: torch.Tensor, idx: torch.Tensor, rcodes: torch.Tensor, rscales: torch.Tensor,
                    acc: torch.Tensor | None = None) -> torch.Tensor:
    """acc (M, N) fp32 (+)= the residual correction of rows x (M, K) at channels idx (M, S).

    x: fp16/bf16/fp32 (M, K) on the compute device (CUDA, or CPU under TRITON_INTERPRET=1).
    idx: int32/int64 (M, S) on that device, values in [0, K).  rcodes uint8 (K, ceil(N/2)), rscales
    fp16 (N,): on a GPU, pinned host tensors (read zero-copy) or device tensors; on CPU, CPU tensors.
    acc: fp32 (M, N) contiguous to add into (zeroed and returned when None)."""
    if x.dim() != 2 or idx.dim() != 2 or idx.shape[0] != x.shape[0]:
        raise ValueError(f"x must be (M, K) and idx (M, S); got {tuple(x.shape)}, {tuple(idx.shape)}")
    rc, rs = _check_residuals(x, rcodes, rscales)
    m = x.shape[0]
    n = rscales.shape[0]
    if acc is None:
        acc = torch.zeros((m, n), dtype=torch.float32, device=x.device)
    elif acc.dtype != torch.float32 or tuple(acc.shape) != (m, n) or acc.stride(1) != 1:
        raise ValueError(f"acc must be float32 ({m}, {n}) with unit column stride")
    s = idx.shape[1]
    if m == 0 or s == 0:
        return acc
    idx32 = idx.to(torch.int32).contiguous()
    x = x if x.stride(1) == 1 else x.contiguous()
    nb = (n + 1) // 2
    cfg = GATHER_CONFIG
    grid = (m, triton.cdiv(s, cfg["block_s"]), triton.cdiv(nb, cfg["block_b"]))
    qdec_gather_kernel[grid](x, idx32, rc, rs, acc, s, n, nb, x.stride(0), idx32.stride(0), acc.stride(0),
                             BLOCK_S=cfg["block_s"], BLOCK_B=cfg["block_b"], num_warps=cfg["num_warps"])
    return acc


def qdec_select_gather(x: torch.Tensor, k_chunk: int, lo: float, hi: float, rcodes: torch.Tensor,
                       rscales: torch.Tensor) -> torch.Tensor:
    """The approx top-k selection and the correction in ONE launch (qdec_fused_kernel): fp32 partial sums
    (M, chunks, N), one per 1024-channel chunk, for qdec_add.  The same channels as qdec_select and the
    same products as qdec_correction; nothing to zero first."""
    if x.dim() != 2:
        raise ValueError(f"x must be (M, K), got {tuple(x.shape)}")
    if not hi > lo:
        raise ValueError(f"approx top-k needs thresholds lo < hi, got {lo}, {hi}")
    rc, rs = _check_residuals(x, rcodes, rscales)
    m, k = x.shape
    n = rscales.shape[0]
    chunks = triton.cdiv(k, CHUNK)
    part = torch.empty((m, chunks, n), dtype=torch.float32, device=x.device)
    idx = torch.empty((m, selected_count(k, k_chunk)), dtype=torch.int32, device=x.device)
    if m == 0 or idx.shape[1] == 0:
        return part.zero_()
    x = x if x.stride(1) == 1 else x.contiguous()
    nb = (n + 1) // 2
    cfg = FUSED_CONFIG
    qdec_fused_kernel[(m, chunks, triton.cdiv(nb, cfg["block_b"]))](
        x, idx, rc, rs, part, k, n, nb, x.stride(0), idx.stride(0), k_chunk, float(lo), (hi - lo) / BUCKETS,
        CHUNK=CHUNK, BUCKETS=BUCKETS, BLOCK_S=cfg["block_s"], BLOCK_B=cfg["block_b"], num_warps=cfg["num_warps"])
    return part


def qdec_add(y: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """y (M, N) += part (M, C, N) summed over C (fp32, in order), rounded once to y's dtype; in place."""
    m, c, n = part.shape
    if y.dim() != 2 or tuple(y.shape) != (m, n) or y.stride(1) != 1:
        raise ValueError(f"y must be ({m}, {n}) with unit column stride, got {tuple(y.shape)}")
    if part.dtype != torch.float32 or not part.is_contiguous():
        raise ValueError("part must be contiguous float32 (M, C, N)")
    if m and n:
        qdec_add_kernel[(m, triton.cdiv(n, ADD_BLOCK))](y, part, n, c, y.stride(0), BLOCK=ADD_BLOCK,
                                                         num_warps=ADD_WARPS)
    return y


class SideStream:
    """Runs QDEC's work on its own CUDA stream beside the base GEMV; also inside a CUDA graph capture
    (the side stream forks from and joins the capturing stream through events).

        side = SideStream(device)
        part = side.launch(x, lambda v: qdec_select_gather(v, k_chunk, lo, hi, rc, rs))  # after x exists
        y = base(x)                                   # the base kernel, current stream
        qdec_add(y, side.join(part))                  # current stream waits for the side stream

    `work(x)` runs on the side stream (selection and gather, off the base kernel's path) and returns the
    tensor the join hands back.
    """

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device)
        self.done = torch.cuda.Event()

    def launch(self, x: torch.Tensor, work: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        cur = torch.cuda.current_stream(x.device)
        self.stream.wait_stream(cur)  # x ready
        with torch.cuda.stream(self.stream):
            out = work(x)
            x.record_stream(self.stream)
            self.done.record(self.stream)
        return out

    def join(self, out: torch.Tensor) -> torch.Tensor:
        torch.cuda.current_stream(out.device).wait_event(self.done)
        out.record_stream(torch.cuda.current_stream(out.device))
        return out
