"""`make serve`'s model: `fbserve serve --model default-fbquant` quantizes the embedded model with the FBQuant
preset on first start (cached in $FBSERVE_HOME), answers through the OpenAI SDK, reports its quantization and
measured quality in /v1/models, and on a restart reuses the cached checkpoint instead of rebuilding it.
The first start takes ~2 min on 2 quiet cores when the cache is empty (quant.preset; bench/RESULTS.md).
"""
from __future__ import annotations

import math
import re

import httpx
from openai import OpenAI

from quant.preset import PRESET
from tests.server_process import running_server

FIRST_START_TIMEOUT_S = 1200  # builds the preset when $FBSERVE_HOME has none; a cached start takes seconds
ARGS = ["--model", "default-fbquant", "--device", "cpu", "--max-seq-len", "256"]


def _ask_capital(url: str) -> str:
    client = OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
    reply = client.chat.completions.create(model="default", temperature=0, max_tokens=16, messages=[
        {"role": "user", "content": "What is the capital of France?"}])
    return reply.choices[0].message.content


def test_quantized_preset_is_built_served_and_reused(tmp_path_factory) -> None:
    logs = tmp_path_factory.mktemp("preset")
    with running_server(ARGS, logs / "first.log", startup_timeout_s=FIRST_START_TIMEOUT_S) as srv:
        assert "Paris" in _ask_capital(srv.url), srv.log()
        card = httpx.get(f"{srv.url}/v1/models", timeout=30).json()["data"][0]
        health = httpx.get(f"{srv.url}/health", timeout=30).json()
        metrics = httpx.get(f"{srv.url}/metrics", timeout=30).text
    q = card["quantization"]
    assert card["id"] == "SmolLM2-135M-Instruct-fbquant"
    assert (q["method"], q["bits"], q["group_size"], q["rank"]) == (PRESET.method, PRESET.bits,
                                                                    PRESET.group_size, PRESET.rank)
    assert PRESET.bits < q["bits_per_weight"] < PRESET.bits + 1.5  # codes + fp16 scales/zeros + rank-16 factors
    wikitext = {c["dataset"]: c for c in q["quality"]}["wikitext2"]
    assert math.isfinite(wikitext["perplexity"]) and wikitext["kl_divergence"] > 0
    assert 1.0 < wikitext["perplexity"] < 2 * wikitext["reference_perplexity"]  # near the unquantized model
    assert health["quantization"]["method"] == "fbquant"
    gauge = re.search(r'^fbserve_model_bits_per_weight\{method="fbquant",model="SmolLM2-135M-Instruct-fbquant"\} (\S+)$',
                      metrics, re.MULTILINE)
    assert gauge and float(gauge.group(1)) == q["bits_per_weight"], metrics[-2000:]
    paths = health["kernel_paths"]
    assert paths and all(p["path"] == "cpu_int4" and p["bits"] == PRESET.bits and not p.get("fallback")
                         for p in paths), paths

    with running_server(ARGS, logs / "second.log") as again:
        assert "building the default quantized checkpoint" not in again.log()
        assert "Paris" in _ask_capital(again.url)
