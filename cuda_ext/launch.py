"""Launchers of the Triton kernels: validate tensors, pick the config of this GPU, size the grid.

Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (tests).
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from types import ModuleType

import torch
import triton

from . import configs, gemv, kernels
from .packing import PackedWeight

MAX_RANK = 128  # a branch's rank: the B columns one output column reads
MAX_SEGMENTS = 3  # a merged layer's parts (q, k, v)
MAX_T = 256  # t = x @ A^T's width: rank x segments (branch_down's and the fused branch's tiles)


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _kernels(module: ModuleType = kernels) -> ModuleType:
    """A kernel module (kernels.py, gemv.py), checked against the mode: triton.jit (and triton.language's
    own jit helpers) choose compiled vs interpreted when triton is first imported, so TRITON_INTERPRET=1
    set later cannot take effect; say so instead of failing inside the interpreter."""
    if interpreting() and isinstance(kernels.qgemm_kernel, triton.runtime.JITFunction):
        raise RuntimeError("TRITON_INTERPRET=1 was set after triton was imported; set it before the "
                           "first `import triton` (e.g. at the top of tests/conftest.py)")
    return module


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2_at_least(v: int, lo: int) -> int:
    p = lo
    while p < v:
        p *= 2
    return p


@dataclass(frozen=True)
class Target:
    """Where a launch runs: config table key, SM count, tf32 support, and whether Triton emits
    tensor-core dots there (not for sm_75 with Triton 3.3-3.9)."""
    arch: str
    num_sms: int
    tf32: bool
    tensor_cores: bool = True


_TARGETS: dict[str, Target] = {}
_COUNTERS: dict[tuple, torch.Tensor] = {}


def target_for(device: torch.device) -> Target:
    """The Target of `device` (cached): the interpreter table on CPU, else the GPU's arch."""
    if interpreting() and device.type == "cpu":
        return Target(configs.INTERPRETER, int(configs.load_table(configs.INTERPRETER)["num_sms"]), False, True)
    if device.type != "cuda":
        raise ValueError(f"Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1); got device {device}")
    key = str(device)
    if key not in _TARGETS:
        props = torch.cuda.get_device_properties(device)
        cap = (props.major, props.minor)
        _TARGETS[key] = Target(configs.arch_of(cap), props.multi_processor_count, cap >= (8, 0), cap >= (8, 0))
    return _TARGETS[key]


def _counters(device: torch.device, need: int) -> torch.Tensor:
    """Zeroed int32 arrival counters for split-K, one buffer per (device, stream).

    Kernels leave them at zero, so launches on one stream can share them; two streams must not."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < need:
        buf = torch.zeros(max(need, 4096), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


def choose_split(n_tiles: int, n_blocks: int, num_sms: int, waves: float, max_split: int) -> int:
    """Split-K factor: enough programs for `waves` per SM, no split left without a K block."""
    want = max(1, _cdiv(int(waves * num_sms), max(n_tiles, 1)))
    split = max(1, min(want, max_split, n_blocks))
    return _cdiv(n_blocks, _cdiv(n_blocks, split))


def gemm_grid(m: int, n: int, n_blocks: int, cfg: configs.GemmConfig, num_sms: int) -> tuple[int, int, int]:
    """qgemm_kernel's grid (column tiles, row tiles, split-K)."""
    grid_n, grid_m = _cdiv(n, cfg.block_n), _cdiv(m, cfg.block_m)
    return grid_n, grid_m, choose_split(grid_n * grid_m, n_blocks, num_sms, cfg.waves, cfg.max_split_k)


def branch_grid(m: int, k: int, cfg: configs.BranchConfig, num_sms: int) -> tuple[int, int]:
    """branch_down_kernel's grid (K splits, row tiles)."""
    grid_m = _cdiv(m, cfg.block_m)
    return max(1, min(_cdiv(k, cfg.block_k), cfg.max_split, _cdiv(num_sms, grid_m))), grid_m


def branch_gemv_tiles(cfg: configs.BranchConfig, rank_p: int) -> dict[str, int]:
    """branch_gemv_kernel's constexpr tiles: BLOCK_K (the config's, capped so the (RANK_P, BLOCK_K) fp32
    tile stays 8192 values) and SPLIT_P (the partials tile: max_split rounded up to a power of two)."""
    return {"BLOCK_K": max(16, min(cfg.block_k, 8192 // rank_p)), "SPLIT_P": _pow2_at_least(cfg.max_split, 1)}


def fused_branch_parts(k: int) -> int:
    """gemv_kernel's fused branch: how many programs share t = x @ A^T (about 256 k each, 1..32)."""
    return max(1, min(32, _cdiv(k, 256)))


def fused_branch_block_k(rank_p: int) -> int:
    """The fused branch's K step: a (RANK_P, BLOCK_KA) fp32 tile of 4096 values (32 registers per thread
    at 4 warps), so the branch parts need no more registers than the weight tiles."""
    return max(16, 4096 // rank_p)


def rank_pad(r: int) -> int:
    """RANK_P: the rank rounded up to a power of two >= 16 (tl.dot's minimum)."""
    return _pow2_at_least(r, 16)


def _check_x(x: torch.Tensor, k: int, what: str) -> None:
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"{what}: x must be float16 or bfloat16, got {x.dtype}")
    if x.shape[-1] != k:
        raise ValueError(f"{what}: x has {x.shape[-1]} input features, the layer expects K={k}")


def check_segments(segments: tuple[int, ...] | None, n: int) -> tuple[int, ...]:
    """A merged layer's output sizes (each layer's out_features, in column order); None = one layer."""
    if segments is None:
        return (n,)
    segments = tuple(int(v) for v in segments)
    if not 1 <= len(segments) <= MAX_SEGMENTS or min(segments) < 1 or sum(segments) != n:
        raise ValueError(f"segments {segments} must be 1..{MAX_SEGMENTS} positive sizes adding up to N={n}")
    return segments


def _check_branch(a: torch.Tensor, b: torch.Tensor, k: int, n: int, n_seg: int, device: torch.device) -> int:
    """The branch's rank r (B's columns); A holds n_seg * r rows (one block of r per segment)."""
    r = b.shape[-1]
    if b.dim() != 2 or b.shape[0] != n or b.dtype != torch.float16:
        raise ValueError(f"B must be float16 (N={n}, r={r}); got {b.dtype} {tuple(b.shape)}")
    if a.dim() != 2 or tuple(a.shape) != (n_seg * r, k) or a.dtype != torch.float16:
        raise ValueError(f"A must be float16 ({n_seg} x r={r} rows, K={k}); got {a.dtype} {tuple(a.shape)}")
    if not 1 <= r <= MAX_RANK or n_seg * r > MAX_T:
        raise ValueError(f"branch rank r={r} x {n_seg} segments unsupported; supported r 1..{MAX_RANK}, "
                         f"r x segments <= {MAX_T}")
    if a.device != device or b.device != device:
        raise ValueError(f"A, B must be on {device}; got {a.device}, {b.device}")
    return r


def branch_down(x2: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """t = x2 @ A^T in fp32.  x2: fp16/bf16 (M, K), unit column stride; A: fp16 (r, K) contiguous.
    Returns fp32 (M, r)."""
    m, k = x2.shape
    r = a.shape[0]
    tgt = target_for(x2.device)
    cfg = configs.branch_config(tgt.arch, m)
    rank_p = rank_pad(r)
    split, grid_m = branch_grid(m, k, cfg, tgt.num_sms)
    t = torch.empty((m, r), dtype=torch.float32, device=x2.device)
    ws = cnt = t
    if cfg.block_m == 1:  # one row (configs.branch_config checks m): branch_gemv_kernel, CUDA cores
        if split > 1:
            ws = torch.empty((split, rank_p), dtype=torch.float32, device=x2.device)
            cnt = _counters(x2.device, 1)
        _kernels().branch_gemv_kernel[(split,)](
            x2, a, t, ws, cnt, k, r, RANK_P=rank_p, USE_WS=split > 1, **branch_gemv_tiles(cfg, rank_p),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return t
    rank_p = min(rank_p, MAX_RANK)  # tl.dot tiles of t's columns: a merged layer's 256 take two
    grid_r = _cdiv(r, rank_p)
    if split > 1:
        ws = torch.empty((split, grid_m * cfg.block_m, grid_r * rank_p), dtype=torch.float32, device=x2.device)
        cnt = _counters(x2.device, grid_m * grid_r)
    _kernels().branch_down_kernel[(split, grid_m, grid_r)](
        x2, a, t, ws, cnt, m, k, r, x2.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, RANK_P=rank_p, USE_WS=split > 1,
        INTERP_BF16=interpreting() and x2.dtype == torch.bfloat16, FP32_DOT=not tgt.tensor_cores,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return t


def quant_matmul(x: torch.Tensor, packed: PackedWeight, a: torch.Tensor | None = None,
                 b: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                 config: configs.GemmConfig | None = None,
                 segments: tuple[int, ...] | None = None) -> torch.Tensor:
    """y = x @ dequant(packed)^T (+ (x @ A^T) @ B^T) (+ bias) with the Triton kernels.

    x: fp16/bf16 (..., K), last dim contiguous, on the packed weight's device.  A: fp16 (r, K).
    B: fp16 (N, r), 1 <= r <= 128.  bias: (N,) any float dtype.  Returns (..., N) in x.dtype.
    segments (a merged layer, engine.merge): the layers' output sizes, 1..3 adding up to N; A then stacks
    one (r, K) block per layer (r x segments <= 256) and each output column uses its own layer's block,
    i.e. the branch is blockdiag(B_1, B_2, ...) with B = [B_1; B_2; ...] stored (N, r), no zeros.
    m = prod(x.shape[:-1]) <= 16 runs the split-K decode config, larger m the prefill config;
    `config` overrides the table (tests, autotune).
    """
    k, n = packed.in_features, packed.out_features
    _check_x(x, k, "quant_matmul")
    if x.device != packed.device:
        raise ValueError(f"x is on {x.device}, the packed weight on {packed.device}")
    if (a is None) != (b is None):
        raise ValueError("the low-rank branch needs both A and B")
    tgt = target_for(x.device)
    if x.dtype == torch.bfloat16 and tgt.arch == "sm_75":
        raise ValueError("bfloat16 activations need sm_80 or newer (this GPU is sm_75); use float16")
    segments = check_segments(segments, n)
    n_seg = len(segments)
    r = _check_branch(a, b, k, n, n_seg, x.device) if a is not None else 0
    seg1, seg2 = (list(itertools.accumulate(segments))[:-1] + [n, n])[:2]  # segment 1 and 2's first columns
    if bias is not None and (bias.shape != (n,) or bias.device != x.device):
        raise ValueError(f"bias must be ({n},) on {x.device}; got {tuple(bias.shape)} on {bias.device}")
    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*x.shape[:-1], n)
    if config is None:
        _, config = configs.gemm_config(tgt.arch, m, packed.bits)
    if m > config.block_m and config.block_m < 16:
        raise ValueError(f"gemv config block_m={config.block_m} cannot take m={m} rows")
    d = packed.dims
    n_blocks = d["n_full"] + (1 if d["tail_rows"] else 0)
    grid_n, grid_m, split = gemm_grid(m, n, n_blocks, config, tgt.num_sms)
    fused = config.fused_branch and r > 0 and config.block_m == 1  # t made inside gemv_kernel's launch
    if fused:
        t = torch.empty((1, n_seg * r), dtype=torch.float32, device=x.device)
    else:
        t = branch_down(x2, a.contiguous()) if r else y
    ws = cnt = y
    if split > 1:
        ws = torch.empty((split, grid_m * config.block_m, grid_n * config.block_n), dtype=torch.float32,
                         device=x.device)
        cnt = _counters(x.device, grid_m * grid_n)
    if config.block_m < 16:  # the CUDA-core kernel for a few rows
        rank_p = rank_pad(r)
        grid, tws, n_parts, extra = (grid_n, 1, split), y, 0, {}
        if fused:
            n_parts, t_rank_p = fused_branch_parts(k), rank_pad(n_seg * r)
            tws = torch.empty((n_parts, t_rank_p), dtype=torch.float32, device=x.device)
            cnt = _counters(x.device, grid_n + 4)  # split-K tile counters, then the branch's four
            grid = (n_parts + grid_n * split, 1, 1)
            extra = {"BLOCK_KA": fused_branch_block_k(t_rank_p), "PARTS_P": _pow2_at_least(n_parts, 1),
                     "T_RANK_P": t_rank_p}
        half2 = config.half2 and config.block_m == 1 and x.dtype == torch.float16
        _kernels(gemv).gemv_kernel[grid](
            x2, packed.qweight, packed.scales, packed.zeros, y, ws, cnt, t,
            b.contiguous() if r else y, bias.contiguous() if bias is not None else y,
            m, n, d["n_pad"], k, packed.groups, d["n_full"], n_blocks, r, x2.stride(0), y.stride(0),
            gemv.gemv_magic(packed.bits, half2), a.contiguous() if fused else y, tws, grid_n, split, n_parts,
            seg1, seg2, BITS=packed.bits, GROUP=packed.group_size, MR=config.block_m,
            BLOCK_N=config.block_n, TAIL_ROWS=d["tail_rows"], RANK_P=rank_p, USE_WS=split > 1,
            HAS_BRANCH=r > 0, HAS_BIAS=bias is not None, INTERP_BF16=interpreting() and x.dtype == torch.bfloat16,
            HALF2=half2, FUSED_BRANCH=fused, N_SEG=n_seg, **extra,
            num_warps=config.num_warps, num_stages=config.num_stages)
        return y.reshape(*x.shape[:-1], n)
    # prefill tiles (more than 16 rows) of a merged layer: the branch as one small matmul per part after
    # the kernel (their segmented epilogue spilled on sm_120; prefill is compute-bound, B is tiny)
    apart = n_seg > 1 and r > 0 and config.block_m > 16
    in_kernel = r > 0 and not apart
    _kernels().qgemm_kernel[(grid_n, grid_m, split)](
        x2, packed.qweight, packed.scales, packed.zeros, y, ws, cnt, t,
        b.contiguous() if in_kernel else y, bias.contiguous() if bias is not None else y,
        m, n, d["n_pad"], k, packed.groups, d["n_full"], d["tail_rows"], n_blocks, r,
        x2.stride(0), y.stride(0), seg1, seg2,
        BITS=packed.bits, GROUP=packed.group_size, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        RANK_P=rank_pad(r), USE_WS=split > 1, HAS_BRANCH=in_kernel, HAS_BIAS=bias is not None,
        INTERP_BF16=interpreting() and x.dtype == torch.bfloat16, BRANCH_TF32=tgt.tf32,
        FP32_DOT=not tgt.tensor_cores, TAIL_ROWS=d["tail_rows"],
        HALF2=config.half2 and config.block_m <= 16 and x.dtype == torch.float16,  # decode tiles only
        N_SEG=n_seg if in_kernel else 1, num_warps=config.num_warps, num_stages=config.num_stages)
    if apart:
        _add_segment_branches(y, t, b, segments, r)
    return y.reshape(*x.shape[:-1], n)


def _add_segment_branches(y: torch.Tensor, t: torch.Tensor, b: torch.Tensor, segments: tuple[int, ...],
                          r: int) -> None:
    """y[:, part s] += t[:, s*r:(s+1)*r] @ B[part s]^T in fp32, rounded once to y's dtype."""
    col = 0
    for s, size in enumerate(segments):
        ys = y[:, col:col + size]
        ys.copy_(torch.addmm(ys.float(), t[:, s * r:(s + 1) * r], b[col:col + size].float().t()))
        col += size
