"""QDEC in the served model: live on decode steps only, counted; damaged residuals -> disabled with the
reason, outputs identical to a model without QDEC."""
from __future__ import annotations

import json
import shutil

import torch

from engine import qdec
from engine.qdec_tuning import TUNING_FILE, QdecTuning, choose_k
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


def test_correction_is_selected_before_the_base_kernel_runs(with_residuals) -> None:  # noqa: F811
    """The pre-hook selects the channels and starts the correction from the layer's input before the
    layer's own forward (on CUDA that is what lets the gather overlap the base kernel); the hook adds it."""
    served = load_model(str(with_residuals), dtype=torch.float32).model
    q = qdec.attach(served, with_residuals, mode="cpu", k_chunk=8)
    name = next(iter(q.layers))
    mod = served.get_submodule(name)
    base_forward, seen = mod.forward, []

    def spy(*args, **kwargs):
        seen.append(q.counters.channels)  # channels already selected when the base kernel starts
        return base_forward(*args, **kwargs)

    mod.forward = spy
    x = torch.randn(1, 1, mod.in_features)
    with torch.inference_mode():
        y = mod(x)
        mod.forward = base_forward
        y_plain = mod.forward(x)
    assert seen == [q.counters.channels] and seen[0] == 8  # 96 input channels: one chunk, k_chunk 8
    r = q.layers[name]
    idx = qdec.select_channels(x.reshape(1, -1), r, 8, "exact")
    torch.testing.assert_close(y, y_plain + qdec.correction(x.reshape(1, -1), idx, r).view(1, 1, -1))


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


def _tuning(device: str = "cpu", chosen: dict | None = None, **timings: list[float]) -> dict:
    """A qdec_tuning.json body: base step 1 s, k_chunk 0/8/16 for each layer type given."""
    return {"device": device, "device_name": device, "torch_threads": 1, "selection": "exact", "steps": 2,
            "base_step_s": 1.0, "layer_types": {t: {"k_chunk": [0, 8, 16], "added_s": a} for t, a in timings.items()},
            **({"chosen": chosen} if chosen else {})}


def test_budget_picks_k_per_layer_type_from_tuning() -> None:
    tuning = QdecTuning.model_validate(_tuning(qkv=[0.0, 0.01, 0.05], down=[0.0, 0.005, 0.012]))
    assert choose_k(tuning, 2.5) == {"qkv": 8, "down": 16}
    assert choose_k(tuning, 0.1) == {"qkv": 0, "down": 0}


def test_tuning_file_is_validated_and_device_bound(tmp_path) -> None:
    from engine.qdec_tuning import load

    f = tmp_path / TUNING_FILE
    assert load(tmp_path, "cpu") == (None, None)  # no file
    bad = {"not json": "{", "lengths": json.dumps(_tuning(qkv=[0.0, 0.1])),
           "unmeasured choice": json.dumps(_tuning(chosen={"budget_pct": 2.5, "k_chunk": {"qkv": 32}}, qkv=[0, 0, 0])),
           "k not from 0": json.dumps({**_tuning(qkv=[0, 0, 0]), "layer_types": {
               "qkv": {"k_chunk": [8, 16], "added_s": [0, 0]}}})}
    for what, text in bad.items():
        f.write_text(text)
        t, note = load(tmp_path, "cpu")
        assert t is None and "invalid" in note, what
    f.write_text(json.dumps(_tuning("cuda", qkv=[0, 0.01, 0.02])))
    t, note = load(tmp_path, "cpu")
    assert t is None and "measured on cuda" in note
    assert load(tmp_path, "cuda")[0].device == "cuda"


def _serve(d, *flags: str):
    """The model at d loaded and QDEC attached as `fbserve serve FLAGS` would."""
    import argparse

    from engine import qdec_tune

    p = argparse.ArgumentParser()
    qdec_tune.add_serve_arguments(p)
    loaded = load_model(str(d), dtype=torch.float32)
    return qdec_tune.attach_for_serving(loaded, p.parse_args(list(flags))), loaded.model


def test_tuner_saves_a_choice_that_serve_uses_and_flags_override(with_residuals, tmp_path) -> None:  # noqa: F811
    from engine import qdec_tune

    d = tmp_path / "t"
    shutil.copytree(with_residuals, d)
    q, model = _serve(d)  # no tuning yet, no flags: QDEC stays off and says why
    assert not q.enabled and "tune-qdec" in qdec.health(model)["reason"]
    out = qdec_tune.tune(str(d), "cpu", [0, 8, 64], steps=2, budget_pct=1000)
    saved = json.loads((d / TUNING_FILE).read_text())
    assert out.device == "cpu" and set(saved["layer_types"]) == {"qkv", "o", "gate_up", "down"}
    assert saved["chosen"]["budget_pct"] == 1000 and saved["chosen"]["k_chunk"] == choose_k(out, 1000)
    # a known tuning, so that every override gives a different k_chunk
    (d / TUNING_FILE).write_text(json.dumps(_tuning(
        chosen={"budget_pct": 2.5, "k_chunk": {"qkv": 8, "o": 8, "gate_up": 0, "down": 16}},
        qkv=[0, 0.01, 0.03], o=[0, 0.005, 0.02], gate_up=[0, 0.02, 0.04], down=[0, 0.002, 0.004])))
    q, model = _serve(d)
    h = qdec.health(model)
    assert q.enabled and h["tuned"] and q.k_chunk == {"qkv": 8, "o": 8, "gate_up": 0, "down": 16}
    assert "tune-qdec choice" in h["k_source"] and q.mode == "cpu"
    assert not _serve(d, "--residuals", "off")[0].enabled
    q, _ = _serve(d, "--qdec-k-chunk", "32")
    assert q.k_chunk == {"default": 32} and q.k_source == "--qdec-k-chunk"
    q, _ = _serve(d, "--qdec-budget", "8", "--qdec-k-chunk", "32")
    assert q.k_chunk == {"qkv": 16, "o": 16, "gate_up": 8, "down": 16} and "--qdec-budget" in q.k_source
    # measured on another device type: not used; --residuals cpu still runs QDEC at the default k_chunk
    (d / TUNING_FILE).write_text(json.dumps({**json.loads((d / TUNING_FILE).read_text()), "device": "cuda"}))
    q, model = _serve(d)
    assert not q.enabled and "measured on cuda" in qdec.health(model)["tuning_note"]
    q, model = _serve(d, "--residuals", "cpu", "--qdec-budget", "10")
    assert q.enabled and q.k_chunk == {"default": qdec.DEFAULT_K_CHUNK} and not qdec.health(model)["tuned"]
    # a budget that buys no channel: QDEC stays off, no hooks (they would only cost time)
    (d / TUNING_FILE).write_text(json.dumps(_tuning(
        chosen={"budget_pct": 2.5, "k_chunk": {"qkv": 0, "down": 0}}, qkv=[0, 0.1, 0.2], down=[0, 0.1, 0.2])))
    q, model = _serve(d)
    assert not q.enabled and "k_chunk is 0 for every layer type" in q.reason and not q.handles
    q, model = _serve(d, "--residuals", "cpu", "--qdec-budget", "1")
    assert not q.enabled and "--qdec-budget 1%" in q.reason


def test_tune_qdec_cli_refuses_bad_budget_and_k(with_residuals, capsys) -> None:  # noqa: F811
    import pytest

    from server.cli import main

    with pytest.raises(SystemExit) as e:
        main(["tune-qdec", "--model", str(with_residuals), "--budget", "0"])
    assert e.value.code == 2 and "must be > 0" in capsys.readouterr().err
    assert main(["tune-qdec", "--model", str(with_residuals), "--k", "8,16", "--device", "cpu"]) == 2
    assert "--k must start with 0" in capsys.readouterr().err


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


def test_tuner_stops_timing_graphs_when_a_capture_fails(with_residuals) -> None:  # noqa: F811
    """A graph decoder whose capture fails mid-way (as one did on an H100) makes _measure report why, so
    tune() re-times every configuration eagerly instead of mixing graphed and eager steps."""
    from engine import qdec_tune
    from engine.cuda_graph_decode import GraphDecoder

    lm = load_model(str(with_residuals), dtype=torch.float32)
    q = qdec.attach(lm.model, with_residuals, mode="cpu", k_chunk=0)
    graphs = GraphDecoder(lm.model, 1, 128, capture=False)  # the static step, eagerly (CPU)
    real_step = graphs.step

    def step(*args):
        if any(q.k_chunk.values()):
            graphs.failed = "capture failed for batch 1, length 128: RuntimeError('planted')"
        return real_step(*args)

    graphs.step = step
    base, timings, failed = qdec_tune._measure(lm.model, q, torch.device("cpu"), [0, 8], 2, graphs)
    assert base > 0 and failed == ("graph capture failed with k_chunk 8 on qkv: capture failed for batch 1, "
                                   "length 128: RuntimeError('planted')")
    base, timings, failed = qdec_tune._measure(lm.model, q, torch.device("cpu"), [0, 8], 2, None)
    assert failed is None and set(timings) == set(qdec_tune.TYPES)
