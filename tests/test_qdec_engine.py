"""QDEC in the served model: live on decode steps only, counted; damaged residuals -> disabled with the
reason, outputs identical to a model without QDEC."""
from __future__ import annotations

import shutil

import torch

from engine import qdec
from models.loader import load_model
from quant.qdec import RESIDUALS
from tests.test_qdec_residuals import with_residuals  # noqa: F401  (module fixture)
from tests.test_quant_checkpoint import tiny_model  # noqa: F401


def _decode_logits(model, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(prefill logits of all but the last token, logits of the last token as a decode step)."""
    model.setup_cache(1, 64)
    t = tokens.shape[1]
    slots = torch.tensor([0])
    pre = model(tokens[:, :-1], torch.arange(t - 1)[None], slots)
    dec = model(tokens[:, -1:], torch.tensor([[t - 1]]), slots)
    return pre, dec


def test_qdec_corrects_decode_steps_and_counts(tiny_model, with_residuals) -> None:  # noqa: F811
    tokens = torch.randint(3, 60, (1, 12), generator=torch.Generator().manual_seed(0))
    fp = load_model(str(tiny_model), dtype=torch.float32).model
    plain = load_model(str(with_residuals), dtype=torch.float32).model
    served = load_model(str(with_residuals), dtype=torch.float32).model
    q = qdec.attach(served, with_residuals, mode="cpu", k_chunk=1024)  # every channel: the full correction
    assert q.enabled and qdec.health(served)["enabled"] and q.select == "exact"
    with torch.inference_mode():
        pre_fp, dec_fp = _decode_logits(fp, tokens)
        pre_q, dec_q = _decode_logits(plain, tokens)
        pre_c, dec_c = _decode_logits(served, tokens)
    assert torch.equal(pre_c, pre_q)  # prefill is not corrected
    err_q, err_c = float((dec_q - dec_fp).norm()), float((dec_c - dec_fp).norm())
    # decode moves toward the unquantized model (its KV cache still holds the uncorrected prefill)
    assert err_c < 0.9 * err_q, (err_q, err_c)
    s = qdec.stats(served)
    n_linears = len(q.layers)
    assert s["qdec_channels_fetched"] == sum(
        served.get_submodule(n).in_features for n in q.layers) and n_linears == 14
    assert s["qdec_bytes_fetched"] > 0 and s["qdec_residual_bytes"] > 0
    q.all_positions = True  # the evaluation protocol: every position corrected, no cache
    with torch.inference_mode():
        full_fp, full_q, full_c = fp(tokens), plain(tokens), served(tokens)
    assert float((full_c - full_fp).norm()) < 0.3 * float((full_q - full_fp).norm())


def test_damaged_residuals_disable_qdec_and_change_nothing(with_residuals, tmp_path, caplog) -> None:  # noqa: F811
    d = tmp_path / "damaged"
    shutil.copytree(with_residuals, d)
    data = bytearray((d / RESIDUALS).read_bytes())
    data[len(data) // 2] ^= 0x01
    (d / RESIDUALS).write_bytes(bytes(data))
    tokens = torch.randint(3, 60, (1, 10), generator=torch.Generator().manual_seed(1))
    plain = load_model(str(d), dtype=torch.float32).model
    served = load_model(str(d), dtype=torch.float32).model
    q = qdec.attach(served, d, mode="cpu", k_chunk=64)
    h = qdec.health(served)
    assert not q.enabled and not h["enabled"] and "sha256" in h["reason"]
    assert "QDEC disabled" in caplog.text
    with torch.inference_mode():
        a, b = _decode_logits(plain, tokens), _decode_logits(served, tokens)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert qdec.stats(served) == {"qdec_residual_bytes": 0, "qdec_channels_fetched": 0, "qdec_bytes_fetched": 0}
    off = load_model(str(with_residuals), dtype=torch.float32).model
    assert qdec.health(off)["enabled"] is False  # never attached: "not configured"
    assert "off" in qdec.attach(off, with_residuals, mode="off").reason


def test_budget_picks_k_per_layer_type_from_tuning() -> None:
    tuning = {"base_step_s": 1.0, "layer_types": {
        "qkv": {"k_chunk": [0, 8, 16], "added_s": [0.0, 0.01, 0.05]},
        "down": {"k_chunk": [0, 8, 16], "added_s": [0.0, 0.005, 0.012]}}}
    assert qdec.choose_k(tuning, 2.5) == {"qkv": 8, "down": 16}
    assert qdec.choose_k(tuning, 0.1) == {"qkv": 0, "down": 0}


def test_tuner_writes_json_that_serve_budget_reads(with_residuals, tmp_path) -> None:  # noqa: F811
    import argparse

    from engine import qdec_tune

    d = tmp_path / "t"
    shutil.copytree(with_residuals, d)
    out = qdec_tune.tune(str(d), "cpu", [0, 8, 64], steps=2)
    assert out["device"] == "cpu" and set(out["layer_types"]) == {"qkv", "o", "gate_up", "down"}
    assert (d / qdec.TUNING_FILE).is_file()
    p = argparse.ArgumentParser()
    qdec_tune.add_serve_arguments(p)
    args = p.parse_args(["--residuals", "cpu", "--qdec-budget", "1000"])
    loaded = load_model(str(d), dtype=torch.float32)
    q = qdec_tune.attach_for_serving(loaded, args)
    assert q.enabled and q.tuning is not None and set(q.k_chunk) == {"qkv", "o", "gate_up", "down"}
    assert qdec.health(loaded.model)["tuned"] is True


def test_eval_cli_reports_qdec_perplexities(with_residuals, tmp_path) -> None:  # noqa: F811
    import json

    from quant.eval_cli import main as eval_main

    out = tmp_path / "q.json"
    rc = eval_main(["--model", str(with_residuals), "--tasks", "none", "--ctx", "64", "--max-windows", "2",
                    "--qdec-k-chunk", "0,8,96", "--qdec-select", "approx,static", "--json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    runs = {(x["select"], x["k_chunk"]): x for x in r["runs"]}
    assert set(runs) == {("none", 0), ("approx", 8), ("approx", 96), ("static", 8), ("static", 96)}
    # every channel corrected: far closer to the unquantized model than the quantized one
    assert runs[("approx", 96)]["gap_recovered"] > 0.5
    assert runs[("approx", 96)]["recall_vs_exact"] > 0.8  # all of the 96-wide inputs, 96 of 160 in down_proj
