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
