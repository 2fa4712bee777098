"""bench/quality.py: run names and the base quantizer each run passes to `fbserve quantize`."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _quality():
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_run_names_tag_the_base_quantizer_only_where_it_is_not_the_default():
    q = _quality()
    assert q.run_name("fp", None, 128, 0, "gptq") == "fp"
    assert q.run_name("gptq", 3, 128, 0, "rtn") == "gptq-w3g128"
    assert q.run_name("qera", 3, 128, 32, "gptq") == "qera-gptq-w3g128-r32"
    assert q.run_name("qera", 3, 128, 32, None) == "qera-w3g128-r32"
    # fbquant's default base is GPTQ: existing runs keep their names, an RTN base is its own run
    assert q.run_name("fbquant", 3, 128, 32, "gptq") == "fbquant-w3g128-r32"
    assert q.run_name("fbquant", 2, 128, 16, "rtn") == "fbquant-rtn-w2g128-r16"
    assert q.base_tag("fbquant", "rtn") == "rtn" and q.base_tag("fbquant", "gptq") is None
    assert q.base_tag("rtn", "gptq") is None
