"""`fbserve eval` end to end on the default model (few windows, few examples) and its reports."""
from __future__ import annotations

import json

import pytest

from quant.eval import data_dir
from quant.eval_cli import main
from quant.eval_report import load_results, markdown_table, plot_results

needs_data = pytest.mark.skipif(not (data_dir() / "wikitext-2-raw" / "wiki.test.raw").is_file(),
                                reason="evaluation data not found (FBSERVE_DATA or ../shared/data)")


@needs_data
def test_cli_writes_perplexity_and_bits_per_weight(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("The cat sat on the mat. " * 40)
    out = tmp_path / "r.json"
    rc = main(["--model", "default", "--ctx", "128", "--max-windows", "2", "--tasks", "piqa,boolq", "--limit", "3",
               "--text", str(text), "--reference", "default", "--json", str(out),
               "--markdown", str(tmp_path / "r.md"), "--plot", str(tmp_path / "r.png")])
    assert rc == 0
    r = json.loads(out.read_text())
    assert set(r["perplexity"]) == {"wikitext2", "notes.txt"}
    assert 1.0 < r["perplexity"]["wikitext2"] < 1000 and r["perplexity"]["notes.txt"] < r["perplexity"]["wikitext2"]
    assert r["bits_per_weight"] == 16.0 and r["method"] == "fp"
    assert r["windows"]["wikitext2"] == {"count": 2, "ctx": 128, "positions": 254}
    assert r["kl_divergence"] == pytest.approx(0.0, abs=1e-6) and r["top1_agreement"] == 1.0  # the model vs itself
    assert set(r["tasks"]) == {"piqa", "boolq"} and r["tasks"]["piqa"]["n"] == 3
    assert "| fp |" in (tmp_path / "r.md").read_text() and "| fp |" in capsys.readouterr().out
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_fails_clearly_without_data(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FBSERVE_DATA", str(tmp_path))
    assert main(["--max-windows", "1", "--tasks", "piqa", "--json", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert "evaluation data missing" in err and str(tmp_path / "piqa" / "valid.jsonl") in err and "FBSERVE_DATA" in err
    assert not (tmp_path / "r.json").exists()


def test_cli_rejects_unknown_tasks():
    with pytest.raises(SystemExit):
        main(["--tasks", "piqa,hellaswag"])


def _result(method, bits, rank, bpw, ppl):
    return {"method": method, "bits": bits, "group_size": 128 if bits else None, "rank": rank,
            "bits_per_weight": bpw, "perplexity": {"wikitext2": ppl}, "kl_divergence": None,
            "top1_agreement": None, "tasks": {"piqa": {"acc": 0.6, "acc_norm": 0.62}}, "zero_shot_mean": 0.62}


def test_table_and_plot_from_several_results(tmp_path):
    results = [_result("fp", None, 0, 16.0, 20.0), _result("rtn", 4, 0, 4.25, 24.0), _result("rtn", 3, 0, 3.25, 60.0),
               _result("lqer", 3, 32, 3.9, 30.0), _result("lqer", 4, 32, 4.9, 21.0)]
    for i, r in enumerate(results):
        (tmp_path / f"{i}.json").write_text(json.dumps(r))
    loaded = load_results([tmp_path])
    table = markdown_table(loaded).splitlines()
    assert len(table) == 2 + 5 and table[2].startswith("| fp |")  # fp first
    assert "PIQA acc_norm" in table[0] and "| 62.0 |" in table[3]
    png = plot_results(loaded, tmp_path / "plot.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
