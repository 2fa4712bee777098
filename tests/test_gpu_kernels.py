"""The Triton kernels COMPILED on a real CUDA GPU against cuda_ext.reference (issue 8).

Skipped without CUDA (CI has none), so CI stays green; `bash bench/gpu_session.sh` runs this on a lent
GPU.  What only a GPU confirms (cuda_ext/README.md): the bf16 tensor-core dots (no INTERP_BF16
emulation), the tf32 branch epilogue, the split-K counter protocol under real concurrency, pipelining
with num_stages > 1, CUDA-graph capture, and the per-arch config tables (configs/sm_XX.json).

FBSERVE_GPU_DRYRUN=1 without CUDA runs a small subset of the same code under TRITON_INTERPRET=1 on CPU
(catches typos before a device call; proves nothing about the GPU).  FBSERVE_GPU_RECORD=<file> appends
one JSON line per check (measured errors) for bench/gpu_summary.py.

Error bounds (rel_err = mean |y - ref| / mean |ref|, ref in fp32), as in test_cuda_ext_kernels.py:
fp16 2e-3, bf16 1e-2; and every element: |y - ref| <= MAXB * max |ref| (catches unwritten tiles).
"""
from __future__ import annotations

import os

import pytest
import torch

from tests.gpu_support import CUDA, DEV, GPU_MARKS, cuda_only_mark, record  # first: it sets TRITON_INTERPRET without CUDA
from cuda_ext import branch_down, branch_down_ref, interpreting, pack, quant_matmul, quant_matmul_ref  # noqa: E402
from cuda_ext.configs import GemmConfig, gemm_config  # noqa: E402
from cuda_ext.launch import gemm_grid, target_for  # noqa: E402
from cuda_ext.testing import random_codes, random_layer, rel_err  # noqa: E402

pytestmark = GPU_MARKS
cuda_only = cuda_only_mark("not part of the CPU dry run")

BOUND = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
MAXB = {torch.float16: 2e-2, torch.bfloat16: 6e-2}
DTYPES = [torch.float16, torch.bfloat16]


def pick(gpu, dry):
    """The GPU parameter grid, or the small CPU dry-run one."""
    return gpu if CUDA else dry


# (N, K): block multiples (N % 256 == 0, K % 512 == 0, K % every group == 0); not multiples (N not a
# multiple of 16 or of a column tile, K with a tail block and a partial last group)
SHAPE_MULT = pick((1024, 2048), (64, 512))
SHAPE_ODD = pick((1000, 1000), (48, 520))
DECODE_M = pick([1, 2, 7, 16], [1, 7])
BITS = pick([2, 3, 4], [3])
RANKS = pick([0, 64], [0, 8])


def layer(n: int, k: int, bits: int, group: int, rank: int = 0, seed: int = 0):
    """cuda_ext.testing.random_layer's layer, packed on DEV (test_pack_on_gpu_matches_cpu checks that the
    GPU packs the same words as the CPU)."""
    return random_layer(n, k, bits, group, rank=rank, seed=seed, device=DEV)


def poison(nbytes: int) -> None:
    """Best effort: leave a NaN-filled block of this size in the caching allocator, so an output the
    kernel leaves unwritten shows as NaN (the element-wise check catches it either way)."""
    if CUDA:
        torch.full((max(nbytes // 2, 1),), float("nan"), dtype=torch.float16, device=DEV)


def check(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str, **fields) -> float:
    assert y.dtype == dtype and y.shape == ref.shape, (y.dtype, y.shape, ref.shape)
    assert bool(torch.isfinite(y).all()), f"non-finite output ({what})"
    err = rel_err(y, ref)
    worst = float((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12))
    record(what, dtype=dtype, rel_err=err, max_err=worst, bound=BOUND[dtype], **fields)
    assert err < BOUND[dtype], f"rel err {err:.2e} >= {BOUND[dtype]} ({what} {fields})"
    assert worst < MAXB[dtype], f"worst element err {worst:.2e} of max|ref| ({what} {fields})"
    return err


def run_case(m, n, k, bits, group, dtype, rank, seed, bias=False, config=None, what="qgemm"):
    packed, a, b = layer(n, k, bits, group, rank=rank, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(m, k, generator=g).to(dtype).to(DEV)
    bvec = (torch.randn(n, generator=g) * 0.1).to(dtype).to(DEV) if bias else None
    poison(m * n * x.element_size())
    y = quant_matmul(x, packed, a, b, bvec, config=config)
    ref = quant_matmul_ref(x, packed, a, b, bvec)
    tgt = target_for(x.device)
    kind, cfg = gemm_config(tgt.arch, m, bits) if config is None else ("forced", config)
    d = packed.dims
    split = gemm_grid(m, n, d["n_full"] + (1 if d["tail_rows"] else 0), cfg, tgt.num_sms)[2]
    check(y, ref, dtype, what, m=m, n=n, k=k, bits=bits, group=group, rank=rank, bias=bias, arch=tgt.arch,
          kind=kind, split_k=split, block_m=cfg.block_m, block_n=cfg.block_n, stages=cfg.num_stages)
    return y, (x, packed, a, b, bvec)


@pytest.mark.parametrize("bits", BITS)
def test_pack_on_gpu_matches_cpu(bits):
    """The tests pack on DEV; the checkpoints are packed on the CPU: the same words either way."""
    n, k = SHAPE_ODD
    codes = random_codes(n, k, bits, 64, seed=bits)
    cpu = pack(*codes, bits, 64)
    dev = pack(*(t.to(DEV) for t in codes), bits, 64)
    for name in ("qweight", "scales", "zeros"):
        assert torch.equal(getattr(dev, name).cpu(), getattr(cpu, name)), name


def test_compiled_not_interpreted():
    """On CUDA the kernels are compiled (TRITON_INTERPRET unset/0) and the arch's own table is used."""
    import triton

    from cuda_ext import kernels
    if not CUDA:
        assert interpreting()
        pytest.skip("dry run: interpreter by design")
    assert not interpreting(), f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r} on a CUDA machine"
    assert isinstance(kernels.qgemm_kernel, triton.runtime.JITFunction), type(kernels.qgemm_kernel)
    tgt = target_for(torch.device("cuda"))
    props = torch.cuda.get_device_properties(0)
    record("target", arch=tgt.arch, num_sms=tgt.num_sms, tf32=tgt.tf32, tensor_cores=tgt.tensor_cores,
           gpu=props.name, triton=triton.__version__, torch=torch.__version__)
    assert tgt.tensor_cores and tgt.num_sms == props.multi_processor_count


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("shape", ["mult", "odd"])
@pytest.mark.parametrize("m", DECODE_M)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("bits", BITS)
def test_decode_grid(bits, dtype, m, shape, rank):
    """Decode (m <= 16, split-K from the arch table), with and without the fused branch."""
    n, k = SHAPE_MULT if shape == "mult" else SHAPE_ODD
    run_case(m, n, k, bits, 128, dtype, rank, seed=bits * 100 + m * 7 + rank + (shape == "odd"),
             what="decode")


@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_decode_other_groups(group, dtype):
    n, k = SHAPE_ODD
    run_case(7 if CUDA else 2, n, k, 3, group, dtype, rank=RANKS[-1], seed=group, bias=True, what="decode")


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("m", pick([33, 64, 300], [33]))
def test_prefill(m, bits, dtype):
    """Prefill (m > 16: tl.dot tiles of 64/128 rows, num_stages from the table), branch on 3/4-bit."""
    n, k = SHAPE_MULT if m == 64 else SHAPE_ODD
    run_case(m, n, k, bits, 64 if bits == 3 else 128, dtype, rank=0 if bits == 2 else RANKS[-1],
             seed=m + bits, bias=bits == 4, what="prefill")


LLAMA = pick([(4096, 4096), (4096, 11008)], [(64, 1536)])  # o_proj; down_proj (K with a tail block)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("nk", LLAMA, ids=lambda nk: f"{nk[0]}x{nk[1]}")
@pytest.mark.parametrize("m", pick([1, 16], [1]))
def test_llama_shapes_split_k_deterministic(m, nk, dtype):
    """Real layer sizes with the table's split-K and a forced deep split: right, and bitwise the same over
    repeated launches (the last-arriving program sums the partials in split order; counters reset)."""
    n, k = nk
    y, (x, packed, a, b, _) = run_case(m, n, k, 3, 128, dtype, rank=RANKS[-1], seed=n + k + m, what="llama")
    for _ in range(pick(20, 2)):
        assert torch.equal(quant_matmul(x, packed, a, b), y), "table split-K result changed between launches"
    deep = GemmConfig(block_m=16, block_n=64, num_warps=4, num_stages=1, waves=64, max_split_k=16)
    one = GemmConfig(block_m=16, block_n=64, num_warps=4, num_stages=1, waves=1, max_split_k=1)
    yd = quant_matmul(x, packed, a, b, config=deep)
    outs = [quant_matmul(x, packed, a, b, config=deep) for _ in range(pick(20, 2))]
    y1 = quant_matmul(x, packed, a, b, config=one)
    assert all(torch.equal(o, yd) for o in outs), "deep split-K result changed between launches"
    err = rel_err(yd, y1)
    record("split_vs_unsplit", dtype=dtype, m=m, n=n, k=k, rel_err=err)
    assert err < 1e-3 if dtype == torch.float16 else err < 5e-3


def test_back_to_back_launches_without_sync():
    """Many split-K launches of different layers queued on one stream (shared counters), checked at the end."""
    layers = [layer(n, k, bits, 128, rank=r, seed=i)
              for i, (n, k, bits, r) in enumerate(pick([(4096, 4096, 3, 64), (1024, 2048, 4, 0), (1000, 1000, 2, 64)],
                                                       [(64, 512, 3, 8), (48, 520, 2, 0)]))]
    xs = [torch.randn(1, p.in_features, device=DEV).half() for p, _, _ in layers]
    outs = [[] for _ in layers]
    for _ in range(pick(30, 2)):
        for i, (p, a, b) in enumerate(layers):
            outs[i].append(quant_matmul(xs[i], p, a, b))
    if CUDA:
        torch.cuda.synchronize()
    for i, (p, a, b) in enumerate(layers):
        ref = quant_matmul_ref(xs[i], p, a, b)
        assert all(torch.equal(o, outs[i][0]) for o in outs[i]), f"layer {i}: results differ between launches"
        check(outs[i][0], ref, torch.float16, "back_to_back", layer=i)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("m", pick([1, 16], [1]))
def test_fused_branch_equals_unfused(m, dtype):
    """quant_matmul(x, W, A, B) == quant_matmul(x, W) + (x A^T) B^T within the output rounding."""
    n, k = pick((4096, 4096), (64, 576))
    packed, a, b = layer(n, k, 3, 128, rank=RANKS[-1], seed=5)
    x = torch.randn(m, k, device=DEV).to(dtype)
    fused = quant_matmul(x, packed, a, b).float()
    plain = quant_matmul(x, packed).float() + (x.float() @ a.float().t()) @ b.float().t()
    err = rel_err(fused, plain)
    record("fused_vs_unfused", dtype=dtype, m=m, n=n, k=k, rel_err=err)
    assert err < BOUND[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("m,rank", pick([(1, 8), (1, 64), (1, 128), (16, 64), (40, 128), (300, 64)], [(1, 8), (40, 16)]))
def test_branch_down(m, rank, dtype):
    k = pick(4096, 576)
    a = (torch.randn(rank, k) * 0.05).half().to(DEV)
    x = torch.randn(m, k, device=DEV).to(dtype)
    t = branch_down(x, a)
    assert t.dtype == torch.float32 and t.shape == (m, rank)
    err = rel_err(t, branch_down_ref(x, a))
    record("branch_down", dtype=dtype, m=m, rank=rank, k=k, rel_err=err)
    assert err < BOUND[dtype]


@cuda_only
@pytest.mark.parametrize("m", [1, 16, 64])
def test_cuda_graph_capture_and_replay(m):
    """Decode (split-K + fused branch) and prefill captured in a CUDA graph: replays with new inputs equal
    eager launches bitwise (what bench/kernels.py and a graph-capturing engine rely on)."""
    packed, a, b = layer(4096, 4096, 3, 128, rank=64, seed=9)
    x = torch.randn(m, 4096, device=DEV).half()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            quant_matmul(x, packed, a, b)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = quant_matmul(x, packed, a, b)
    for i in range(3):
        x.copy_(torch.randn(m, 4096, device=DEV).half())
        g.replay()
        torch.cuda.synchronize()
        eager = quant_matmul(x, packed, a, b)
        assert torch.equal(y, eager), f"replay {i} differs from eager"
        check(y, quant_matmul_ref(x, packed, a, b), torch.float16, "cuda_graph", m=m, replay=i)


def test_quant_linear_dispatches_to_triton():
    """QuantLinear on CUDA picks the Triton path, reports it, never falls back, and matches the reference."""
    from engine.quant_linear import QuantLinear, kernel_paths

    packed, a, b = random_layer(pick(1024, 64), pick(4096, 576), 3, 128, rank=RANKS[-1], seed=3)  # CPU, as loaded
    bias = torch.randn(packed.out_features) * 0.1
    if CUDA:
        layer = QuantLinear(packed, a, b, bias).cuda()
        assert layer.path == "triton", layer.path
    else:  # dry run: the same calls through the interpreter
        layer = QuantLinear(packed, a, b, bias, path="triton")
    assert os.environ.get("FBSERVE_KERNEL_FALLBACK", "0") in ("", "0")
    rows = [r for r in kernel_paths() if r["path"] == "triton" and r["device"].startswith(DEV)]
    assert rows and all(r["fallback"] is None for r in rows), kernel_paths()
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.randn(2, 3, layer.in_features, device=DEV).to(dtype)
        y = layer(x)
        assert y.dtype == dtype and y.shape == (2, 3, layer.out_features)
        ref = quant_matmul_ref(x, layer.packed, layer.A, layer.B, layer.bias)
        err = rel_err(y, ref)
        record("quant_linear", dtype=str(dtype).replace("torch.", ""), rel_err=err, path=layer.path)
        assert err < 1e-2, (dtype, err)
    assert layer.path == "triton" and layer.fallback_reason is None
    layer16 = layer.to(torch.bfloat16)
    assert layer16.path == "triton" and layer16.scales.dtype == torch.float16
