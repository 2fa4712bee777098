"""cuda_ext.cpu_native: fbserve's CPU kernel (AVX-512 BF16 and AVX2 builds). The tile layout round-trips everywhere; the
kernel, each build (where this CPU and a compiler can run it; skipped with the reason elsewhere), matches the fp32
reference within the bound of its one rounding (x to bf16), runs several layers in one call exactly as
separately, gives the same result on 1 and 2 threads; and every reason it is not used is reported.

Error bound: the kernel rounds x to bf16 (relative error <= 2^-9) and computes exactly otherwise up to
fp32 sums, so |y - ref| <= 2^-8 * (|x| @ |W|^T) + 1e-5 * max|ref| elementwise (W the dequantized weight;
the fp32 branch and bias add only fp32 rounding).
"""
import os

import torch

if not torch.cuda.is_available():  # before anything imports triton (see cuda_ext/README.md)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from cuda_ext import cpu_native  # noqa: E402
from cuda_ext.cpu_native import NativeGroup, native_reason, prepare_native, tile_codes, tile_words  # noqa: E402
from cuda_ext.reference import dequantize_packed, quant_matmul_ref  # noqa: E402
from cuda_ext.testing import random_codes, random_layer  # noqa: E402

SHAPES = [(64, 576), (40, 100), (130, 1536), (16, 32), (48, 520)]


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("n,k", SHAPES)
def test_tile_layout_round_trips(bits, group, n, k):
    codes, _, _ = random_codes(n, k, bits, group, seed=n + k)
    words = tile_words(codes, bits, group)
    assert words.dtype == torch.int32 and words.shape[0] == -(-n // 16) and words.shape[2] == 16
    k_pad, slots = -(-k // 32) * 32, cpu_native.SLOTS[bits]
    want = sum(-(-(min(g0 + group, k_pad) - g0) // 2 // slots) for g0 in range(0, k, group))
    assert words.shape[1] == want  # per group ceil(pairs / slots) words: 3-bit g128 is 3.25 bits per weight
    assert torch.equal(tile_codes(words, bits, group, k, n), codes.long())


def test_three_bit_tiles_cost_three_and_a_quarter_bits_at_g128():
    words = tile_words(random_codes(16, 512, 3, 128)[0], 3, 128)
    assert words.numel() * 32 / (16 * 512) == 3.25  # 13 words of 5 pairs per 128 values


def test_tile_word_bits_follow_the_header():
    """Column 0, one group of 32 at 3 bits: word q holds pair j = 5q + s with code[2j] at bit 3s and
    code[2j+1] at bit 16 + 3s; 16 pairs make 4 words, the last holding one pair (cpu_native.c)."""
    codes = torch.zeros(16, 32, dtype=torch.uint8)
    codes[0] = torch.arange(32) % 8
    w = tile_words(codes, 3, 32)[0, :, 0].long() & 0xFFFFFFFF
    c = codes[0].long()
    want = [sum(int(c[2 * j]) << 3 * (j - 5 * q) | int(c[2 * j + 1]) << (16 + 3 * (j - 5 * q))
                for j in range(5 * q, min(5 * q + 5, 16))) for q in range(4)]
    assert w.tolist() == want


def _bound(x: torch.Tensor, packed) -> torch.Tensor:
    return 2.0 ** -8 * (x.abs() @ dequantize_packed(packed).abs().t())


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("n,k", SHAPES)
def test_kernel_matches_reference_within_the_bf16_bound(bits, group, n, k, native_kernel):
    packed, a, b = random_layer(n, k, bits, group, rank=8, seed=bits * group + n)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(3))
    for branch in (False, True):
        w = prepare_native(packed, *(a, b) if branch else (None, None), bias=None if branch else bias)
        for m in (1, 2, 3, 7, 16):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
            ref = quant_matmul_ref(x, packed, *(a, b) if branch else (None, None), None if branch else bias)
            y = NativeGroup([w])(x)
            err = (y - ref).abs()
            assert bool((err <= _bound(x, packed) + 1e-5 * ref.abs().max()).all()), (branch, m, float(err.max()))


def test_several_layers_in_one_call_equal_separate_calls(native_kernel):
    layers = [prepare_native(*random_layer(n, 576, 3, 128, rank=r, seed=n)) for n, r in ((576, 32), (192, 16), (200, 0))]
    x = torch.randn(5, 576)
    group = NativeGroup(layers)
    assert group.offsets == [0, 576, 768] and group.out_features == 968
    assert torch.equal(group(x), torch.cat([NativeGroup([w])(x) for w in layers], dim=1))


def test_threads_do_not_change_the_result(native_kernel):
    w = NativeGroup([prepare_native(*random_layer(1536, 576, 3, 128, rank=32, seed=7))])
    x = torch.randn(3, 576)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = w(x)
        torch.set_num_threads(2)
        assert torch.equal(w(x), one)
    finally:
        torch.set_num_threads(before)


def test_rank_zero_branch_is_no_branch(native_kernel):
    packed, _, _ = random_layer(64, 576, 3, 128)
    empty = prepare_native(packed, torch.zeros(0, 576).half(), torch.zeros(64, 0).half())
    assert empty.rank == 0 and empty.bt is None
    x = torch.randn(2, 576)
    assert torch.equal(NativeGroup([empty])(x), NativeGroup([prepare_native(packed)])(x))


def test_bad_input_names_the_problem(native_kernel):
    group = NativeGroup([prepare_native(random_layer(64, 576, 3, 128)[0])])
    with pytest.raises(ValueError, match=r"expected \(M, 576\)"):
        group(torch.randn(2, 512))
    with pytest.raises(ValueError, match="one input width"):
        NativeGroup([prepare_native(random_layer(64, 576, 3, 128)[0]), prepare_native(random_layer(64, 512, 3, 128)[0])])
    assert group(torch.randn(0, 576)).shape == (0, 64)
    assert group(torch.randn(2, 576).half()).dtype == torch.float32  # any float x, fp32 out


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A cleared cache and an empty FBSERVE_HOME, so the build really runs."""
    monkeypatch.setenv("FBSERVE_HOME", str(tmp_path))
    monkeypatch.delenv(cpu_native.ENV, raising=False)
    cpu_native._load.cache_clear()
    yield monkeypatch
    cpu_native._load.cache_clear()


def test_every_reason_to_stay_on_torch_int4_is_reported(fresh):
    fresh.setenv(cpu_native.ENV, "0")
    assert native_reason() == "disabled (FBSERVE_CPU_NATIVE=0)"
    fresh.delenv(cpu_native.ENV)
    machine = cpu_native.platform.machine
    avx2_only = {"avx", "avx2", "fma", "f16c"}
    for patch, expected in (
            (lambda: fresh.setattr(cpu_native.platform, "machine", lambda: "aarch64"), "needs Linux x86-64"),
            (lambda: fresh.setattr(cpu_native, "_cpu_flags", lambda: {"sse4_2", "fma"}),
             "this CPU lacks avx2, f16c (and AVX-512 BF16)"),
            (lambda: (fresh.setattr(cpu_native, "_cpu_flags", lambda: avx2_only),
                      fresh.setenv(cpu_native.ISA_ENV, "avx512bf16")), "this CPU lacks avx512f, avx512bw"),
            (lambda: fresh.setenv(cpu_native.ISA_ENV, "neon"), "FBSERVE_CPU_NATIVE_ISA=neon is not one of")):
        fresh.setattr(cpu_native.platform, "machine", machine)
        fresh.delenv(cpu_native.ISA_ENV, raising=False)
        cpu_native._load.cache_clear()
        patch()
        assert native_reason().startswith(expected), native_reason()


def test_a_cpu_without_avx512_gets_the_avx2_build(fresh):
    if "avx2" not in cpu_native._cpu_flags():
        pytest.skip("this CPU lacks AVX2")
    fresh.delenv(cpu_native.ISA_ENV, raising=False)
    fresh.setattr(cpu_native, "_cpu_flags", lambda: {"avx", "avx2", "fma", "f16c"})
    assert native_reason() is None and cpu_native.kernel_name() == "fbserve-avx2"
    packed, a, b = random_layer(48, 520, 3, 64, rank=8)
    x = torch.randn(3, 520)
    ref = quant_matmul_ref(x, packed, a, b)
    assert bool(((NativeGroup([prepare_native(packed, a, b)])(x) - ref).abs()
                 <= _bound(x, packed) + 1e-5 * ref.abs().max()).all())


def test_missing_compiler_and_failed_build_are_reported(fresh, tmp_path):
    fresh.delenv(cpu_native.ISA_ENV, raising=False)
    fresh.setattr(cpu_native, "_cpu_flags", lambda: set(cpu_native.CPU_FLAGS))
    fresh.delenv("CC", raising=False)
    fresh.setattr(cpu_native.shutil, "which", lambda name: None)
    assert native_reason() == "no C compiler (cc) to build cuda_ext/cpu_native.c"
    cpu_native._load.cache_clear()
    broken = tmp_path / "broken-cc"
    broken.write_text("#!/bin/sh\necho 'cc: internal error' >&2\nexit 1\n")
    broken.chmod(0o755)
    fresh.setenv("CC", str(broken))
    why = native_reason()
    assert why.startswith("build failed:") and "internal error" in why
    assert not list(tmp_path.glob("native/*/*.so"))  # no half-written library left behind


def test_quant_linear_reports_torch_int4_with_the_reason(fresh):
    import engine.quant_linear as ql

    fresh.setenv(cpu_native.ENV, "0")
    layer = ql.QuantLinear(*random_layer(64, 576, 3, 128, rank=8))
    assert layer._native is None and layer._cpu is not None
    assert ql.cpu_decode_kernel() == "torch-int4 (disabled (FBSERVE_CPU_NATIVE=0))"


def test_reason_is_none_where_the_kernel_runs(native_kernel):
    assert native_reason() is None
