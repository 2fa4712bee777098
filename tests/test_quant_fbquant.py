"""FBQuant: the straight-through trap, and the optimisation that does move A and B (on a real layer)."""
from __future__ import annotations

import pytest
import torch

from quant.fbquant import FBQuantConfig, fbquant, refit_scales, ste_gradient
from quant.gptq import gptq, small_op_threads
from quant.lowrank import Whitener, branch_product, relative_output_error, whitened_branch
from quant.quantizer import quantize_rtn


def _layer(n: int = 64, k: int = 192, tokens: int = 1024, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    x = torch.randn(tokens, 16, generator=g) @ torch.randn(16, k, generator=g) + 0.2 * torch.randn(tokens, k, generator=g)
    return w, x.T @ x / tokens


def test_naive_straight_through_estimator_never_moves() -> None:
    """d W_F / d(BA) = -I + I = 0 wherever nothing clips: A and B get an exactly zero gradient and a
    naive optimiser leaves them (and the error) where they started."""
    w, h = _layer()
    a0, b0 = whitened_branch(w - quantize_rtn(w, 3, 64).dequantize(), 8, Whitener(h))
    da, db, clipped = ste_gradient(w, h, a0, b0, 3, 64, clip_search=False)
    assert not clipped.any()
    assert torch.count_nonzero(da) == 0 and torch.count_nonzero(db) == 0
    a, b = a0.float(), b0.float()
    for _ in range(5):  # plain gradient descent with a large step: nothing happens
        da, db, _ = ste_gradient(w, h, a, b, 3, 64)
        a, b = a - 10.0 * da, b - 10.0 * db
    assert torch.equal(a, a0.float()) and torch.equal(b, b0.float())
    # only clipped entries pass a gradient (there clamp blocks the quantizer's path, leaving +I)
    da, db, clipped = ste_gradient(w, h, a0, b0, 2, 64, clip_search=True)
    assert clipped.any() and torch.count_nonzero(da) > 0


def test_scale_refit_never_increases_the_output_error() -> None:
    w, h = _layer(seed=1)
    for bits in (2, 3):
        q = gptq(w, h, bits, 64)
        r = refit_scales(q, w, h)
        assert torch.equal(r.codes, q.codes) and torch.equal(r.zeros, q.zeros) and r.scales.dtype == torch.float16
        assert relative_output_error(r.dequantize(), w, h) <= relative_output_error(q.dequantize(), w, h)
    assert relative_output_error(refit_scales(gptq(w, h, 2, 64), w, h).dequantize(), w, h) \
        < 0.95 * relative_output_error(gptq(w, h, 2, 64).dequantize(), w, h)


def test_fbquant_is_deterministic_and_reports_what_it_stores() -> None:
    w, h = _layer(seed=2)
    cfg = FBQuantConfig(rounds=2)
    r1 = fbquant(w, h, 3, 64, 8, cfg)
    r2 = fbquant(w, h, 3, 64, 8, cfg)
    assert torch.equal(r1.qweight.codes, r2.qweight.codes) and torch.equal(r1.a, r2.a)
    assert r1.a.dtype == r1.b.dtype == torch.float16
    assert r1.error == pytest.approx(relative_output_error(r1.weight(), w, h), rel=1e-5)
    assert r1.error == min(r1.history) and len(r1.history) == 3


@pytest.fixture(scope="module")
def real_layer() -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and input Gram matrix of layer 3's o_proj of the embedded default model (4 x 256 tokens)."""
    from models.loader import load_model
    from quant.ablation import linear_input_grams
    from quant.calibration import CalibrationDataError, calibration_tokens

    try:
        lm = load_model("default")
        tokens = calibration_tokens(lm.tokenizer, None, 4, 256, 0)
    except (FileNotFoundError, CalibrationDataError) as e:
        pytest.skip(f"default model or WikiText-2 not available: {e}")
    name = "model.layers.3.self_attn.o_proj"
    h = linear_input_grams(lm.model, tokens, [name])[name]
    return lm.model.get_submodule(name).weight.detach().clone(), h


def test_fbquant_beats_its_whitened_svd_start_on_a_real_layer(real_layer) -> None:
    w, h = real_layer
    bits, g, rank = 3, 128, 16
    with small_op_threads(w.device):  # the thread count FBQuant runs with: same float rounding
        q = gptq(w, h, bits, g)
        a, b = whitened_branch(w - q.dequantize(), rank, Whitener(h))
    qera = relative_output_error(q.dequantize() + branch_product(a, b), w, h)  # GPTQ + QERA
    r = fbquant(w, h, bits, g, rank, FBQuantConfig(rounds=2))
    assert r.history[0] == pytest.approx(qera, rel=1e-6)  # FBQuant starts from GPTQ + QERA
    assert r.error == pytest.approx(relative_output_error(r.weight(), w, h), rel=1e-5)
    assert r.error < 0.95 * qera, (r.history, qera)
    # and the branch really moved away from its start
    assert (branch_product(r.a, r.b) - branch_product(a, b)).norm() > 0.05 * branch_product(a, b).norm()
