"""The CPU int4 path (torch's _weight_int4pack_mm_for_cpu + fp32 branch) against the reference.

Error bound: activations are rounded to bf16 and scales to bf16 on this path, so the relative
error (mean |y - ref| / mean |ref|) stays below 1e-2; the measured figure is ~3e-3.
"""
import os

import torch

if not torch.cuda.is_available():  # before anything imports triton (see cuda_ext/README.md)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from cuda_ext import cpu_matmul, dequantize, prepare_cpu, quant_matmul_ref, unpack  # noqa: E402
from cuda_ext.testing import random_layer, rel_err  # noqa: E402

CPU_BOUND = 1e-2


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_path_matches_reference(bits, group, dtype):
    n, k = (96, 576) if group != 64 else (100, 520)  # partial last group; N not a multiple of 16
    rank = 16 if dtype != torch.float16 else 0
    packed, a, b = random_layer(n, k, bits, group, rank=rank, seed=bits * 7 + group)
    bias = torch.randn(n) * 0.1
    w = prepare_cpu(packed)
    x = torch.randn(3, 5, k).to(dtype)
    a_t = None if a is None else a.float().t().contiguous()
    b_t = None if b is None else b.float().t().contiguous()
    y = cpu_matmul(x, w, a_t, b_t, bias)
    ref = quant_matmul_ref(x, packed, a, b, bias)
    assert y.dtype == dtype and y.shape == (3, 5, n)
    assert rel_err(y, ref) < CPU_BOUND


def test_cpu_2_3_bit_weights_are_exact_up_to_bf16_scales():
    """For <= 3 bits the zero point folds into the code, so only the bf16 scale rounds."""
    packed, _, _ = random_layer(32, 256, 3, 64, seed=3)
    w = prepare_cpu(packed)
    eye = torch.eye(256)
    got = cpu_matmul(eye, w).t()  # (N, K): the dequantized weight as the op sees it
    codes, scales, zeros = unpack(packed)
    want = dequantize(codes, scales.bfloat16().float(), zeros, 64).bfloat16().float()
    assert torch.equal(got.bfloat16().float(), want)


def test_reference_dequantize_matches_definition():
    packed, _, _ = random_layer(8, 96, 4, 32, seed=5)
    codes, scales, zeros = unpack(packed)
    w = dequantize(codes, scales, zeros, 32)
    n, k = 3, 70
    assert w[n, k] == (codes[n, k].float() - zeros[n, k // 32].float()) * scales[n, k // 32].float()


def test_cpu_path_rejects_wrong_width():
    packed, _, _ = random_layer(16, 128, 4, 32)
    with pytest.raises(ValueError, match="in_features 128"):
        cpu_matmul(torch.randn(2, 100), prepare_cpu(packed))


# --- prefill: dequantize to bf16 + oneDNN's bf16 GEMM for calls of many rows -----------------------

from cuda_ext import cpu as cpu_mod  # noqa: E402
from cuda_ext.reference import dequantize_packed  # noqa: E402


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("n,k,group", [(96, 576, 128), (100, 520, 64), (48, 1536, 32), (16, 100, 32)])
def test_bf16_dequantize_is_the_reference_rounded_once(bits, n, k, group):
    packed, _, _ = random_layer(n, k, bits, group, seed=bits + k)
    got = cpu_mod.dequantize_bf16_t(packed)
    assert got.dtype == torch.bfloat16 and got.shape == (k, n) and got.is_contiguous()
    assert torch.equal(got, dequantize_packed(packed).t().bfloat16())


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_prefill_rows_take_the_bf16_gemm_within_the_cpu_bound(bits, monkeypatch):
    monkeypatch.setattr(cpu_mod, "_native_bf16", lambda: True)
    monkeypatch.setenv(cpu_mod.BF16_PREFILL_ENV, "64")
    packed, a, b = random_layer(100, 576, bits, 128, rank=16, seed=11 + bits)
    w = prepare_cpu(packed)
    a_t, b_t = a.float().t().contiguous(), b.float().t().contiguous()
    x = torch.randn(80, 576)
    ref = quant_matmul_ref(x, packed, a, b)
    y = cpu_matmul(x, w, a_t, b_t, packed=packed)  # 80 >= 64 rows: bf16 GEMM
    int4 = cpu_matmul(x, w, a_t, b_t)  # no packed weight given: the int4 op
    assert rel_err(y, ref) < CPU_BOUND and rel_err(int4, ref) < CPU_BOUND
    assert not torch.equal(y, int4)  # a different kernel really ran
    # bf16 weights and activations, fp32 accumulation: the exact product of the rounded operands
    exact = x.bfloat16().float() @ dequantize_packed(packed).t().bfloat16().float()
    exact = exact + (x @ a_t) @ b_t
    assert rel_err(y, exact) < 5e-3
    assert torch.equal(cpu_matmul(x[:63], w, a_t, b_t, packed=packed), int4[:63])  # below the threshold


def test_prefill_bf16_gemm_can_be_turned_off_and_says_why(monkeypatch):
    monkeypatch.setenv(cpu_mod.BF16_PREFILL_ENV, "0")
    assert cpu_mod.bf16_prefill_rows() is None and "=0" in cpu_mod.bf16_prefill_reason()
    packed, _, _ = random_layer(32, 576, 3, 128, seed=2)
    w = prepare_cpu(packed)
    x = torch.randn(300, 576)
    assert torch.equal(cpu_matmul(x, w, packed=packed), cpu_matmul(x, w))
    monkeypatch.delenv(cpu_mod.BF16_PREFILL_ENV)
    monkeypatch.setattr(cpu_mod, "_native_bf16", lambda: False)  # e.g. an AVX2-only laptop CPU
    assert cpu_mod.bf16_prefill_rows() is None and "native bf16" in cpu_mod.bf16_prefill_reason()
    assert torch.equal(cpu_matmul(x, w, packed=packed), cpu_matmul(x, w))
    monkeypatch.setenv(cpu_mod.BF16_PREFILL_ENV, "many")
    monkeypatch.setattr(cpu_mod, "_native_bf16", lambda: True)
    with pytest.raises(ValueError, match="row count"):
        cpu_mod.bf16_prefill_rows()
