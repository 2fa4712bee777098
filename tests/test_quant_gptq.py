"""GPTQ against round-to-nearest on a small layer whose inputs are correlated (as real activations are)."""
from __future__ import annotations

import pytest
import torch

from quant.gptq import gptq
from quant.lowrank import Whitener, lqer_branch, relative_output_error, svd_branch, whitened_branch
from quant.quantizer import quantize_rtn


def _layer(n: int = 96, k: int = 320, tokens: int = 2048, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """W (n, k) and H = X^T X / tokens with X = Z M + noise: strongly correlated input channels."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    z = torch.randn(tokens, 24, generator=g)
    x = z @ torch.randn(24, k, generator=g) + 0.1 * torch.randn(tokens, k, generator=g)
    x[:, 7] *= 10  # an outlier channel
    return w, x.T @ x / tokens


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_in_output_error(bits: int, act_order: bool) -> None:
    w, h = _layer()  # k = 320 at g128: a partial last group of 64
    rtn = relative_output_error(quantize_rtn(w, bits, 128).dequantize(), w, h)
    q = gptq(w, h, bits, 128, act_order=act_order)
    assert q.codes.shape == w.shape and q.scales.shape == (96, 3)
    err = relative_output_error(q.dequantize(), w, h)
    assert err < 0.7 * rtn, (err, rtn)


def test_gptq_dead_input_and_group_sizes() -> None:
    w, h = _layer(k=192, seed=1)
    h[10, :] = 0
    h[:, 10] = 0  # an input channel that is always zero
    for g in (32, 64, 128):
        q = gptq(w, h, 3, g)
        assert q.dequantize()[:, 10].abs().max() == 0
        assert relative_output_error(q.dequantize(), w, h) < relative_output_error(
            quantize_rtn(w, 3, g).dequantize(), w, h)
    assert torch.equal(gptq(w, h, 3, 64).codes, gptq(w, h, 3, 64).codes)  # deterministic


def test_branch_baselines_order() -> None:
    """At equal rank the whitened branch (QERA-exact) has the least output error, as it is optimal in H."""
    w, h = _layer(seed=2)
    q = quantize_rtn(w, 3, 64)
    e = w - q.dequantize()
    act = h.diagonal().sqrt()
    errs = {}
    for name, (a, b) in {"svd": svd_branch(e, 8), "lqer": lqer_branch(e, 8, act),
                         "qera": whitened_branch(e, 8, Whitener(h))}.items():
        assert a.dtype == b.dtype == torch.float16 and a.shape == (8, 320) and b.shape == (96, 8)
        errs[name] = relative_output_error(q.dequantize() + b.float() @ a.float(), w, h)
    base = relative_output_error(q.dequantize(), w, h)
    assert errs["qera"] < min(errs["svd"], errs["lqer"]) and max(errs.values()) < base
