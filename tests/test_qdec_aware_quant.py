"""Quantizing for QDEC (`fbserve quantize --qdec-aware K`): the masked Gram matrix, its effect on a real
layer (less error left after QDEC's correction than the standard quantizer with or without it), the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cuda_ext.qdec_reference import exact_topk, selected_count
from quant.fbquant import FBQuantConfig, fbquant
from quant.qdec import qdec_gram, quantize_residual, salient_masked
from tests.test_quant_checkpoint import _quantize, tiny_model  # noqa: F401  (module fixture)


def test_salient_masked_zeroes_each_rows_top_k_per_chunk_and_nothing_else() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1536, generator=g) + 0.01  # no exact zeros
    m = salient_masked(x, 8)
    zeroed = m == 0
    assert (zeroed.sum(1) == selected_count(1536, 8)).all()  # 8 of the first 1024, 8 of the last 512
    assert torch.equal(m[~zeroed], x[~zeroed])
    for c0, c1 in ((0, 1024), (1024, 1536)):  # every zeroed channel outranks every kept one in its chunk
        a, z = x[:, c0:c1].abs(), zeroed[:, c0:c1]
        assert (a.masked_fill(~z, float("inf")).amin(1) > a.masked_fill(z, 0).amax(1)).all()
    assert torch.equal(zeroed, torch.zeros_like(zeroed).scatter(1, exact_topk(x, 8), True))


@pytest.fixture(scope="module")
def real_down_proj() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Layer 5's down_proj of the embedded default model: weight, calibration inputs (4 x 256 tokens of
    WikiText-2 valid) and held-out inputs (256 tokens of WikiText-2 test)."""
    from models.loader import load_model
    from quant.calibration import CalibrationDataError, calibration_tokens
    from quant.eval import token_windows, wikitext2_text

    try:
        lm = load_model("default")
        cal = calibration_tokens(lm.tokenizer, None, 4, 256, 0)
        held_out = token_windows(lm.tokenizer, wikitext2_text(), 256, 1)
    except (FileNotFoundError, CalibrationDataError) as e:
        pytest.skip(f"default model or WikiText-2 not available: {e}")
    lin = lm.model.get_submodule("model.layers.5.mlp.down_proj")
    seen: list[torch.Tensor] = []
    hook = lin.register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach().reshape(-1, a[0].shape[-1]).float()))
    with torch.inference_mode():
        lm.model(cal)
        lm.model(held_out)
    hook.remove()
    return lin.weight.detach().float().clone(), seen[0], seen[1]


def _error_energy(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor, k_chunk: int) -> float:
    """||X R^T - (X * M) R_q^T||^2 with M QDEC's exact top-k_chunk selection (k_chunk 0: no correction)."""
    r = w - w_hat
    e = x @ r.T
    if k_chunk:
        codes, scales = quantize_residual(r)
        x_sel = x - salient_masked(x, k_chunk)
        e = e - x_sel @ (codes.float() * scales.float()[:, None]).T
    return float((e ** 2).sum())


def test_qdec_aware_fbquant_leaves_less_error_after_the_correction_on_a_real_layer(real_down_proj) -> None:
    """Measured here (held-out tokens, relative to the standard quantizer uncorrected): standard 0.70 after
    an exact top-8 correction, QDEC-aware (mix 1.0) 0.55 after it and 0.81 without it."""
    w, x_cal, x_test = real_down_proj
    h = x_cal.T @ x_cal / x_cal.shape[0]
    h_aware = qdec_gram(x_cal, 8, 1.0) / x_cal.shape[0]  # --qdec-aware 8 with the default mix
    cfg = FBQuantConfig(rounds=1)
    std = fbquant(w, h, 3, 128, 32, cfg).weight()
    aware = fbquant(w, h_aware, 3, 128, 32, cfg).weight()
    base = _error_energy(x_test, w, std, 0)
    std8, aware0, aware8 = (_error_energy(x_test, w, std, 8), _error_energy(x_test, w, aware, 0),
                            _error_energy(x_test, w, aware, 8))
    assert aware8 < 0.93 * std8 and aware8 < 0.8 * base, (std8 / base, aware8 / base)
    assert aware0 < 1.3 * base, aware0 / base  # still a sound quantizer without QDEC


def test_quantize_cli_records_the_qdec_objective_and_refuses_what_it_cannot_apply(tiny_model, tmp_path) -> None:  # noqa: F811
    from quant.cli import main as quantize_main
    from safetensors.torch import load_file

    std = _quantize(tiny_model, tmp_path / "std", "--method", "fbquant", "--bits", "3")
    aware = _quantize(tiny_model, tmp_path / "aware", "--method", "fbquant", "--bits", "3", "--qdec-aware", "8")
    m_std = json.loads((std / "quantization.json").read_text())
    m_aware = json.loads((aware / "quantization.json").read_text())
    assert "qdec_aware" not in m_std["options"]
    assert m_aware["options"]["qdec_aware"] == {"k_chunk": 8, "mix": 1.0}
    t_std, t_aware = load_file(str(std / "model.safetensors")), load_file(str(aware / "model.safetensors"))
    changed = [k for k in t_std if k.endswith(".A") and not torch.equal(t_std[k], t_aware[k])]
    assert changed, "the QDEC objective changed no branch"
    rc = quantize_main(["--model", str(tiny_model), "--out", str(tmp_path / "bad"), "--qdec-aware", "8",
                        "--qdec-mix", "0", "--calib", str(Path(tiny_model) / "calib.txt")])
    assert rc == 2 and not (tmp_path / "bad").exists()
    rc = quantize_main(["--model", str(tiny_model), "--out", str(tmp_path / "rtn"), "--method", "rtn",
                        "--qdec-aware", "8", "--calib", str(Path(tiny_model) / "calib.txt")])
    assert rc == 2 and not (tmp_path / "rtn").exists()  # RTN ignores the Gram matrix: refused, not a no-op
