"""Triton kernels against cuda_ext.reference, on CPU under TRITON_INTERPRET=1 (or on CUDA).

Error bounds (relative error = mean |y - ref| / mean |ref|, ref in fp32):
  fp16: 2e-3  (the dequantized weight and y are rounded to fp16; measured ~3e-4; gemv's half2 path
              for one fp16 row, fp16 products and group sums: measured 2-6e-4)
  bf16: 1e-2  (the same in bf16; measured ~2e-3)
The interpreter computes bf16 through fp32 dots on the same bf16 operand values (its bf16 tl.dot
is wrong), see cuda_ext/README.md for what only a GPU run confirms.
"""
import os

import torch

if not torch.cuda.is_available():  # before anything imports triton (see cuda_ext/README.md)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from cuda_ext import branch_down, branch_down_ref, pack, quant_matmul, quant_matmul_ref  # noqa: E402
from cuda_ext import launch  # noqa: E402
from cuda_ext.configs import GemmConfig  # noqa: E402
from cuda_ext.testing import random_codes, random_layer, rel_err  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BOUND = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
# (N, K): a 2-row tail block and N = one 64-column tile; two whole blocks and N = 80 (a partial
# column tile); a 1-row tail with a partial group and N < one tile
SHAPES = [(64, 576), (80, 1024), (48, 520)]
DECODE_M = [1, 2, 7, 16]


def _check(m, n, k, bits, group, dtype, rank, seed, bias=False, config=None):
    packed, a, b = random_layer(n, k, bits, group, rank=rank, seed=seed, device=DEV)
    bvec = torch.randn(n, device=DEV).to(dtype) if bias else None
    x = torch.randn(m, k, device=DEV).to(dtype)
    y = quant_matmul(x, packed, a, b, bvec, config=config)
    ref = quant_matmul_ref(x, packed, a, b, bvec)
    assert y.dtype == dtype and y.shape == (m, n)
    err = rel_err(y, ref)
    assert err < BOUND[dtype], f"rel err {err:.2e} (m={m} N={n} K={k} {bits}b g{group} {dtype} r={rank})"
    return y


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_decode_matches_reference(bits, group, dtype):
    """Every bits x group x dtype once; m, shape and the branch rotate across the grid."""
    i = bits * 3 + group // 32 + (dtype == torch.bfloat16)
    n, k = SHAPES[(i // 2) % len(SHAPES)]
    rank = (0, 8, 32)[i % 3]
    _check(DECODE_M[i % 4], n, k, bits, group, dtype, rank, seed=i)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", DECODE_M + [33])
def test_every_m_with_branch(m, dtype):
    _check(m, 64, 576, 3, 128, dtype, rank=16, seed=m)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_prefill_matches_reference(bits, dtype):
    _check(40, 80, 1024 if bits != 3 else 520, bits, 64, dtype, rank=(0 if bits == 2 else 24), seed=bits,
           bias=bits == 4)


def test_split_k_is_deterministic_and_matches_unsplit():
    packed, a, b = random_layer(64, 1536, 4, 128, rank=16, seed=11, device=DEV)
    x = torch.randn(3, 1536, device=DEV).half()
    one = GemmConfig(block_m=16, block_n=64, num_warps=4, num_stages=1, waves=1, max_split_k=1)
    three = GemmConfig(block_m=16, block_n=64, num_warps=4, num_stages=1, waves=64, max_split_k=3)
    y1 = quant_matmul(x, packed, a, b, config=one)
    y3 = quant_matmul(x, packed, a, b, config=three)
    assert torch.equal(y3, quant_matmul(x, packed, a, b, config=three))  # fixed summation order
    assert rel_err(y3, y1) < 1e-3


def test_bias_and_batched_input():
    packed, a, b = random_layer(64, 576, 2, 32, rank=8, seed=3, device=DEV)
    bias = torch.randn(64, device=DEV).half()
    x = torch.randn(2, 3, 576, device=DEV).half()
    y = quant_matmul(x, packed, a, b, bias)
    assert y.shape == (2, 3, 64)
    assert rel_err(y, quant_matmul_ref(x, packed, a, b, bias)) < BOUND[torch.float16]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,rank", [(1, 8), (1, 64), (1, 128), (1, 256), (5, 64), (5, 192), (40, 128), (40, 256)])
def test_branch_down_matches_reference(m, rank, dtype):
    a = (torch.randn(rank, 576) * 0.05).half().to(DEV)
    x = torch.randn(m, 576, device=DEV).to(dtype)
    t = branch_down(x, a)
    assert t.dtype == torch.float32 and t.shape == (m, rank)
    assert rel_err(t, branch_down_ref(x, a)) < BOUND[dtype]


def test_unsupported_shapes_raise_with_names():
    packed, a, b = random_layer(64, 576, 4, 128, rank=8, device=DEV)
    with pytest.raises(ValueError, match="512 input features.*K=576"):
        quant_matmul(torch.randn(1, 512, device=DEV).half(), packed)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        quant_matmul(torch.randn(1, 576, device=DEV), packed)
    with pytest.raises(ValueError, match=r"rank r=129"):
        big_a = torch.zeros(129, 576, device=DEV).half()
        quant_matmul(torch.randn(1, 576, device=DEV).half(), packed, big_a, torch.zeros(64, 129, device=DEV).half())
    with pytest.raises(ValueError, match=r"B must be float16 \(N=64, r=8\)"):
        quant_matmul(torch.randn(1, 576, device=DEV).half(), packed, a, b[:32])
    with pytest.raises(ValueError, match="A must be float16"):
        quant_matmul(torch.randn(1, 576, device=DEV).half(), packed, a.float(), b)
    with pytest.raises(ValueError, match="both A and B"):
        quant_matmul(torch.randn(1, 576, device=DEV).half(), packed, a, None)


@pytest.mark.parametrize("n,k,bits,group,dtype", [(64, 256, 4, 32, torch.float16), (32, 96, 2, 128, torch.bfloat16)])
def test_k_smaller_than_one_block(n, k, bits, group, dtype):
    """Only a tail block (K=96: one partial group, 32 padded values)."""
    _check(3, n, k, bits, group, dtype, rank=8, seed=k)


# gemv_kernel (CUDA cores, m <= block_m in 1/2/4): every bits x group, tails, split-K, branch, bias
GEMV_CASES = [  # (block_m, m, N, K, bits, group, rank, bias, split)
    (1, 1, 64, 576, 3, 128, 0, False, 1),
    (1, 1, 80, 1024, 4, 32, 8, True, 2),
    (1, 1, 48, 520, 2, 64, 32, False, 3),
    (2, 2, 64, 1536, 3, 32, 16, True, 3),
    (2, 1, 80, 576, 4, 128, 0, False, 1),
    (4, 3, 48, 1024, 2, 128, 8, False, 2),
    (4, 4, 64, 520, 3, 64, 64, True, 1),
    (1, 1, 64, 2560, 3, 128, 0, False, 5),  # 5 full blocks, one per split
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", GEMV_CASES, ids=lambda c: f"mr{c[0]}-m{c[1]}-{c[2]}x{c[3]}-{c[4]}b-g{c[5]}-r{c[6]}")
def test_gemv_matches_reference(case, dtype):
    block_m, m, n, k, bits, group, rank, bias, split = case
    cfg = GemmConfig(block_m=block_m, block_n=32, num_warps=4, num_stages=1, waves=64, max_split_k=split)
    _check(m, n, k, bits, group, dtype, rank, seed=sum(case[:6]), bias=bias, config=cfg)


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gemv_half2_every_bits_and_group(bits, group):
    """One fp16 row runs gemv_kernel's packed half2 path (code - zero exact, fp16 products and group
    sums, fp32 across groups): every bits x group, with a tail block of 1, 2 or 8 rows."""
    k = (1056, 576, 11008 // 4 + 8)[(bits + group // 32) % 3]  # tail blocks of 1, 2 and 8 rows (200 of 256 values)
    cfg = GemmConfig(block_m=1, block_n=32, num_warps=4, num_stages=1, waves=64, max_split_k=2)
    _check(1, 48, k, bits, group, torch.float16, rank=8 * (bits - 2), seed=bits * group, config=cfg)


def test_gemv_half2_large_activations_stay_finite():
    """|x| = 2000 over a whole group (an LLM outlier run) against codes 7 and zero 0: the group's fp16
    partial sum would be 8 x 2000 x 7 = 112,000 > 65,504 (inf); the fp16 products are x * (code - zero) / 16
    (the half2 magic's unit is 1/16, exact), so it stays 7,000 and exact enough."""
    codes, scales, zeros = random_codes(64, 1024, 3, 128, seed=11)
    codes[:, :128] = 7
    zeros[:, 0] = 0
    packed = pack(codes, scales, zeros, 3, 128).to(DEV)
    x = torch.randn(1, 1024)
    x[0, :128] = 2000.0
    x = x.half().to(DEV)
    cfg = GemmConfig(block_m=1, block_n=32, num_warps=4, num_stages=1, waves=64, max_split_k=1)
    y = quant_matmul(x, packed, config=cfg)
    assert torch.isfinite(y).all()
    assert rel_err(y, quant_matmul_ref(x, packed)) < BOUND[torch.float16]


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("m", [2, 16])
def test_decode_half2_tiles_match_the_fp16_form(m, bits):
    """fp16 decode tiles (2..16 rows) dequantize in packed half2 math and take K = 32 dots; the weights are
    the same fp16 values as the chunk-by-chunk form's (config half2=False), so both meet the reference."""
    packed, a, b = random_layer(80, 1056, bits, 64, rank=16, seed=bits + m, device=DEV)
    x = torch.randn(m, 1056, device=DEV).half()
    ref = quant_matmul_ref(x, packed, a, b)
    cfg = GemmConfig(block_m=16, block_n=32, num_warps=4, num_stages=1, waves=64, max_split_k=2)
    y_h2 = quant_matmul(x, packed, a, b, config=cfg)
    y_old = quant_matmul(x, packed, a, b, config=GemmConfig(**{**cfg.__dict__, "half2": False}))
    assert rel_err(y_h2, ref) < BOUND[torch.float16] and rel_err(y_old, ref) < BOUND[torch.float16]
    assert rel_err(y_h2, y_old) < 1e-3


FUSED_CASES = [  # (N, K, bits, group, rank, split): t made inside gemv_kernel's launch (no branch_down)
    (64, 576, 3, 128, 8, 1),  # one branch part of 576 k with a tail, no split-K
    (80, 1024, 4, 32, 64, 2),
    (48, 1056, 2, 64, 128, 3),
    (64, 11008 // 4, 3, 64, 32, 5),  # 11 parts, a partial last one
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda c: f"{c[0]}x{c[1]}-{c[2]}b-g{c[3]}-r{c[4]}-split{c[5]}")
def test_gemv_fused_branch_matches_reference_and_leaves_counters_at_zero(case, dtype):
    """The fused branch is right, deterministic, equal in value to the two-launch path, and leaves every
    counter at 0 (the next launch, or a CUDA graph replay, starts clean)."""
    n, k, bits, group, rank, split = case
    cfg = GemmConfig(block_m=1, block_n=32, num_warps=4, num_stages=1, waves=64, max_split_k=split,
                     fused_branch=True)
    y = _check(1, n, k, bits, group, dtype, rank, seed=n + k + rank, config=cfg)
    packed, a, b = random_layer(n, k, bits, group, rank=rank, seed=n + k + rank, device=DEV)
    x = torch.randn(1, k, device=DEV).to(dtype)
    y1 = quant_matmul(x, packed, a, b, config=cfg)
    assert torch.equal(y1, quant_matmul(x, packed, a, b, config=cfg))
    two_launch = quant_matmul(x, packed, a, b, config=GemmConfig(**{**cfg.__dict__, "fused_branch": False}))
    assert rel_err(y1, two_launch) < 1e-3
    if DEV == "cuda":
        torch.cuda.synchronize()
    assert all(int(c.abs().sum()) == 0 for c in launch._COUNTERS.values())
    assert y.shape == (1, n)


def test_gemv_split_k_is_deterministic():
    packed, a, b = random_layer(64, 1536, 3, 64, rank=16, seed=5, device=DEV)
    x = torch.randn(1, 1536, device=DEV).half()
    cfg = GemmConfig(block_m=1, block_n=32, num_warps=4, num_stages=1, waves=64, max_split_k=3)
    y = quant_matmul(x, packed, a, b, config=cfg)
    assert torch.equal(y, quant_matmul(x, packed, a, b, config=cfg))


def test_gemv_refuses_more_rows_than_its_tile():
    packed, _, _ = random_layer(64, 576, 4, 128, device=DEV)
    cfg = GemmConfig(block_m=2, block_n=32, num_warps=4, num_stages=1)
    with pytest.raises(ValueError, match="block_m=2 cannot take m=3"):
        quant_matmul(torch.randn(3, 576, device=DEV).half(), packed, config=cfg)


# Merged layers (engine.merge): segments of output columns, each with its own block of A's rows. Boundaries
# inside a column tile (the interpreter's tiles are 32/64 wide), 2 and 3 segments, t 256 wide (2 x rank 128).
SEGMENT_CASES = [  # (segments, rank, K, bits, group, config (None: the table's), m)
    ((48, 16, 96), 16, 576, 3, 64, GemmConfig(block_m=1, block_n=32, num_warps=4, num_stages=1, waves=64,
                                              max_split_k=2), 1),
    ((48, 16, 96), 16, 576, 3, 64, GemmConfig(block_m=1, block_n=32, num_warps=4, num_stages=1, waves=64,
                                              max_split_k=3, fused_branch=True), 1),
    ((96, 32), 128, 520, 4, 128, GemmConfig(block_m=1, block_n=32, num_warps=4, num_stages=1, waves=64,
                                            max_split_k=2, fused_branch=True), 1),
    ((96, 32), 128, 520, 4, 128, None, 1),
    ((64, 32, 32), 32, 1024, 2, 32, None, 2),
    ((64, 32, 32), 32, 1024, 3, 128, None, 7),
    ((16, 112), 8, 576, 3, 64, None, 16),
    ((64, 64), 128, 576, 3, 64, None, 7),  # t 256 wide: branch_down_kernel in two column tiles
    ((48, 16, 96), 24, 520, 3, 64, None, 33),  # prefill tiles
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", SEGMENT_CASES, ids=lambda c: f"seg{'-'.join(map(str, c[0]))}-r{c[1]}-m{c[6]}"
                         + ("-fused" if c[5] is not None and c[5].fused_branch else ""))
def test_segmented_branch_matches_the_block_diagonal_reference(case, dtype):
    """Each column adds only its own segment's t @ B^T: the reference with B expanded block-diagonal;
    ignoring the segments (every column on segment 0's t) is far off."""
    segments, rank, k, bits, group, cfg, m = case
    n = sum(segments)
    packed, _, _ = random_layer(n, k, bits, group, seed=n + rank, device=DEV)
    g = torch.Generator().manual_seed(rank + m)
    a = (torch.randn(len(segments) * rank, k, generator=g) * 0.05).half().to(DEV)
    b = (torch.randn(n, rank, generator=g) * 0.5).half().to(DEV)
    x = torch.randn(m, k, generator=g).to(dtype).to(DEV)
    y = quant_matmul(x, packed, a, b, config=cfg, segments=segments)
    ref = quant_matmul_ref(x, packed, a, b, segments=segments)
    err = rel_err(y, ref)
    assert y.shape == (m, n) and err < BOUND[dtype], f"rel err {err:.2e}"
    assert rel_err(y, quant_matmul_ref(x, packed, a[:rank], b)) > 0.05
    if cfg is not None and cfg.fused_branch:
        assert all(int(c.abs().sum()) == 0 for c in launch._COUNTERS.values())


def test_segments_that_do_not_fit_raise_with_names():
    packed, _, _ = random_layer(64, 256, 3, 64, device=DEV)
    x = torch.randn(1, 256, device=DEV).half()
    a, b = torch.zeros(32, 256, device=DEV).half(), torch.zeros(64, 16, device=DEV).half()
    with pytest.raises(ValueError, match="adding up to N=64"):
        quant_matmul(x, packed, a, b, segments=(32, 16))
    with pytest.raises(ValueError, match=r"A must be float16 \(3 x r=16 rows"):
        quant_matmul(x, packed, a, b, segments=(32, 16, 16))
    big_a, big_b = torch.zeros(384, 256, device=DEV).half(), torch.zeros(64, 128, device=DEV).half()
    with pytest.raises(ValueError, match="r x segments <= 256"):
        quant_matmul(x, packed, big_a, big_b, segments=(32, 16, 16))
