"""bench/decode.py: the command starts, runs our engine end to end, and says why a row is skipped."""
from __future__ import annotations

import json
import sys
from functools import partial

import pytest

from tests.bench_runner import ROOT, run_bench

bench = partial(run_bench, "decode.py")


def test_help_lists_the_flags():
    proc = bench("--help", timeout=120)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--tokens", "--only", "--json", "--threads", "--checkpoint", "--quantize"):
        assert flag in proc.stdout


def test_unknown_engine_is_refused():
    proc = bench("--only", "ours,vllm", timeout=120)
    assert proc.returncode == 2 and "vllm" in proc.stderr


def test_missing_prompt_data_fails_clearly(tmp_path):
    sys.path.insert(0, str(ROOT))
    from bench.decode import prompt_text

    with pytest.raises(SystemExit, match="prompt data missing"):
        prompt_text(tmp_path / "wiki.test.raw")


def test_four_tokens_of_our_engine_and_a_skipped_checkpoint(tmp_path):
    out = tmp_path / "decode.json"
    missing = tmp_path / "no-such-checkpoint"
    proc = bench("--only", "ours", "--tokens", "4", "--prompt-tokens", "16", "--repeats", "1", "--threads", "1",
                 "--checkpoint", str(missing), "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["rows"]
    fp32, ckpt = rows
    assert fp32["status"] == "ok" and fp32["result"]["decode_tok_s"] > 0
    assert len(fp32["result"]["token_ids"]) == 4 and fp32["result"]["peak_rss_mb"] > 0
    assert ckpt["status"] == "skipped" and str(missing) in ckpt["reason"]
    assert "skipped: no quantized checkpoint" in proc.stdout  # said, not filled with a number
