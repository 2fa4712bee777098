"""The group-wise quantizer: format, round trip, error bounds, the FBQuant bound, bits per weight."""
from __future__ import annotations

import pytest
import torch

from cuda_ext import pack, unpack
from quant.lowrank import branch_product
from quant.quantizer import (SUPPORTED_BITS, bits_per_weight, dequantize, expand_groups, pad_groups,
                             quantize_rtn)


def _weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w[:, 5] *= 8  # an outlier column, as real layers have
    return w


def _clipped(w: torch.Tensor, q) -> torch.Tensor:
    """Entries outside the representable range [(0 - z) s, (maxq - z) s] of their group."""
    k = w.shape[1]
    s = expand_groups(q.scales.float(), k, q.group_size)
    z = expand_groups(q.zeros.float(), k, q.group_size)
    maxq = 2 ** q.bits - 1
    return (w < (0 - z) * s - s / 2) | (w > (maxq - z) * s + s / 2)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("group_size,k", [(32, 96), (64, 576), (128, 576), (128, 1536)])
def test_format_and_round_trip(bits: int, group_size: int, k: int) -> None:
    w = _weight(40, k)
    q = quantize_rtn(w, bits, group_size)
    groups = -(-k // group_size)  # 576 at g128: 4 full groups and a partial one of 64
    assert q.codes.dtype == torch.uint8 and q.codes.shape == (40, k)
    assert q.scales.dtype == torch.float16 and q.scales.shape == (40, groups)
    assert q.zeros.dtype == torch.float16 and q.zeros.shape == (40, groups)
    assert int(q.codes.max()) <= 2 ** bits - 1
    z = q.zeros.float()
    assert torch.equal(z, z.round()) and z.min() >= 0 and z.max() <= 2 ** bits - 1
    assert (q.scales.float() > 0).all()
    # the documented dequant formula, with the stored fp16 tensors, element by element
    n_idx, k_idx = 3, k - 1
    want = (q.codes[n_idx, k_idx].float() - q.zeros[n_idx, k_idx // group_size].float()) \
        * q.scales[n_idx, k_idx // group_size].float()
    assert q.dequantize()[n_idx, k_idx] == want
    # quantizing the dequantized weight again reproduces it (a fixed point of the quantizer)
    again = quantize_rtn(q.dequantize(), bits, group_size, clip_search=False)
    assert torch.allclose(again.dequantize(), q.dequantize(), atol=1e-6)
    # cuda_ext's packing carries the tensors unchanged
    codes, scales, zeros = unpack(pack(q.codes, q.scales, q.zeros, bits, group_size))
    assert torch.equal(codes, q.codes) and torch.equal(scales, q.scales) and torch.equal(zeros, q.zeros)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("clip_search", [False, True])
def test_error_within_half_a_step_except_clipped(bits: int, clip_search: bool) -> None:
    w = _weight(64, 576, seed=1)
    q = quantize_rtn(w, bits, 128, clip_search=clip_search)
    step = expand_groups(q.scales.float(), 576, 128)
    err = (q.dequantize() - w).abs()
    clipped = _clipped(w, q)
    assert (err[~clipped] <= step[~clipped] / 2 * (1 + 1e-5)).all()
    if not clip_search:
        assert clipped.sum() == 0  # min-max: nothing clips
    else:
        # the search clips something at low bits, and never does worse than min-max per group
        minmax = quantize_rtn(w, bits, 128, clip_search=False)
        e_search = pad_groups((q.dequantize() - w) ** 2, 128).sum(-1)
        e_minmax = pad_groups((minmax.dequantize() - w) ** 2, 128).sum(-1)
        assert (e_search <= e_minmax * (1 + 1e-5)).all()
        assert e_search.sum() < e_minmax.sum()


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_fbquant_bound_whatever_the_branch(bits: int) -> None:
    """W_F = Q(W - BA) + BA stays within half a step of W (except clipped entries), even for a large
    branch unrelated to W: the feedback form cannot drag the weights away."""
    w = _weight(64, 576, seed=2)
    g = torch.Generator().manual_seed(3)
    a = (torch.randn(16, 576, generator=g) * 0.1).half()
    b = (torch.randn(64, 16, generator=g) * 0.1).half()
    s = branch_product(a, b)  # entries ~0.04, twice the weights
    q = quantize_rtn(w - s, bits, 128, clip_search=False)
    w_f = q.dequantize() + s
    step = expand_groups(q.scales.float(), 576, 128)
    clipped = _clipped(w - s, q)
    assert clipped.sum() == 0
    assert ((w_f - w).abs() <= step / 2 * (1 + 1e-4) + 1e-6).all()


def test_dequantize_partial_group_and_padding() -> None:
    codes = torch.tensor([[1, 2, 3]], dtype=torch.uint8)
    scales = torch.tensor([[0.5, 2.0]], dtype=torch.float16)
    zeros = torch.tensor([[1.0, 3.0]], dtype=torch.float16)
    assert dequantize(codes, scales, zeros, 2).tolist() == [[0.0, 0.5, 0.0]]


def test_bits_per_weight_counts_everything() -> None:
    # design.md's figures: g128 scale+zero add 0.25, rank 32 on 4096x4096 adds 0.25
    assert bits_per_weight(4096, 4096, 3, 128) == pytest.approx(3.25)
    assert bits_per_weight(4096, 4096, 3, 128, rank=32) == pytest.approx(3.5)
    # partial last group: 576 = 4 * 128 + 64 has 5 groups
    assert bits_per_weight(576, 576, 4, 128) == pytest.approx(4 + 32 * 5 / 576)


def test_unsupported_format_is_refused() -> None:
    with pytest.raises(ValueError, match="bits=5"):
        quantize_rtn(torch.zeros(4, 64), 5, 64)
    with pytest.raises(ValueError, match="group_size=96"):
        quantize_rtn(torch.zeros(4, 96), 3, 96)
