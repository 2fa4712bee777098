"""cuda_ext/cpu_q8.py: ggml's Q8_0, the test that a weight is Q8_0 already, and the int8 matmul on each build of
fbserve's CPU kernel against an fp64 reference (fresh random inputs, shapes with and without a last partial
tile of 16 rows). Error bound: x is quantized to int16 per block of 32 (half a step: 2^-16 of the block's
largest |x|) and everything after it is exact in int32 or rounded once in fp32, so |y - y_ref| <= 1e-4 * max |y_ref|."""
from __future__ import annotations

import pytest
import torch

from cuda_ext.cpu_q8 import RELATIVE_TOLERANCE, Q8Linear, q8_0, q8_0_error


def q8_weight(n: int, k: int, seed: int, fp16: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A weight that is Q8_0 by construction (as a GGUF's): codes in [-127, 127] with +-127 in every block,
    fp16 scales; (weight fp32, codes, scales). `fp16`: the weight as a checkpoint storing it in fp16 holds it."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-127, 128, (n, k // 32, 32), generator=g, dtype=torch.int8)
    codes[:, :, 0] = 127 * (1 - 2 * torch.randint(0, 2, (n, k // 32), generator=g, dtype=torch.int8))
    scales = (torch.rand(n, k // 32, generator=g) * 0.01 + 1e-4).half().float()
    w = (codes.float() * scales[..., None]).reshape(n, k)
    return (w.half().float() if fp16 else w), codes.reshape(n, k), scales


def test_q8_0_recovers_a_q8_0_weight_exactly_and_from_fp16_within_the_tolerance():
    w, codes, scales = q8_weight(40, 96, 0)
    got_codes, got_scales = q8_0(w)
    assert torch.equal(got_codes, codes) and torch.equal(got_scales, scales)
    assert q8_0_error(w, got_codes, got_scales) == 0.0
    w16, _, _ = q8_weight(40, 96, 0, fp16=True)
    assert 0 < q8_0_error(w16, *q8_0(w16)) <= RELATIVE_TOLERANCE


def test_other_weights_are_refused_with_the_reason(native_kernel):
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(1)).half().float()
    head, why = Q8Linear.from_weight(w)
    assert head is None and "not Q8_0" in why
    head, why = Q8Linear.from_weight(torch.zeros(16, 40))
    assert head is None and "multiple of 32" in why
    zeros, _ = Q8Linear.from_weight(torch.zeros(16, 64))  # all-zero blocks: scale 0, exact
    assert zeros is not None and torch.equal(zeros(torch.randn(2, 64)), torch.zeros(2, 16))


@pytest.mark.parametrize("n,k", [(100, 64), (48, 576), (4099, 96)])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8])
def test_int8_matmul_matches_fp64(n, k, m, native_kernel):
    w, _, _ = q8_weight(n, k, seed=n + k + m)
    head, path = Q8Linear.from_weight(w)
    assert head is not None and path.endswith("-q8_0"), path
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * torch.logspace(-2, 1, k)  # uneven blocks
    ref = x.double() @ w.double().t()
    y = head(x)
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert float((y.double() - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
    assert head.nbytes() == (n + 15) // 16 * 16 * (k + k // 32 * 4)


def test_bad_input_raises_an_error_that_names_it(native_kernel):
    head, _ = Q8Linear.from_weight(q8_weight(32, 64, 3)[0])
    with pytest.raises(ValueError, match="expected fp32"):
        head(torch.randn(2, 32))
    with pytest.raises(ValueError, match="expected fp32"):
        head(torch.randn(2, 64, dtype=torch.float64))
