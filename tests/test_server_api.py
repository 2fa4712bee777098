"""The HTTP API against the fake engine (tests/conftest.py): shapes, errors, streaming, cancellation."""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from contextlib import contextmanager

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.metrics import Metrics

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
COMPLETION = {"model": "fake-model", "prompt": "Hello", "max_tokens": 5}


def sse(response) -> list:
    """The SSE frames of a response body, JSON-decoded except the final [DONE]."""
    frames = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in response.text.split("\n\n") if line)
    assert frames[-1] == "[DONE]"
    return [json.loads(f) for f in frames[:-1]]


def assert_error(response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def test_chat_completion(client, fake_engine):
    r = client.post("/v1/chat/completions", json={**CHAT, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "fake-model" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "The c"}
    assert choice["finish_reason"] == "length" and choice["logprobs"] is None
    prompt = fake_engine.tokenizer.apply_chat_template(CHAT["messages"], add_generation_prompt=True)
    assert fake_engine.requests[0].prompt_token_ids == fake_engine.tokenizer.encode(prompt)
    assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 5, "total_tokens": len(prompt) + 5,
                             "prompt_tokens_details": {"cached_tokens": 0}}


def test_model_alias_and_absent_model(client):
    for model in ("default", None):
        payload = {**CHAT, "model": model} if model else {k: v for k, v in CHAT.items() if k != "model"}
        assert client.post("/v1/chat/completions", json=payload).status_code == 200


def test_completion_and_default_max_tokens(client, fake_engine):
    r = client.post("/v1/completions", json={"prompt": "Hello", "temperature": 0})
    body = r.json()
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == "The capital of F"
    assert fake_engine.requests[0].params.max_tokens == 16
    assert body["usage"]["completion_tokens"] == 16 and body["usage"]["prompt_tokens"] == 5


def test_chat_default_fills_the_context(client, fake_engine):
    client.post("/v1/chat/completions", json={"messages": CHAT["messages"]})
    req = fake_engine.requests[0]
    assert len(req.prompt_token_ids) + req.params.max_tokens == fake_engine.max_seq_len


def test_stop_strings(client):
    for stop in ("Paris", ["xyz", "capital"]):
        r = client.post("/v1/completions", json={**COMPLETION, "max_tokens": 40, "temperature": 0, "stop": stop})
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop"
        assert choice["text"] == ("The capital of France is " if stop == "Paris" else "The ")


def test_n_with_seed_is_reproducible(client, fake_engine):
    payload = {**COMPLETION, "n": 2, "seed": 7, "max_tokens": 8}
    first = [c["text"] for c in client.post("/v1/completions", json=payload).json()["choices"]]
    second = [c["text"] for c in client.post("/v1/completions", json=payload).json()["choices"]]
    assert first == second and first[0] != first[1]
    assert sorted(r.params.seed for r in fake_engine.requests[:2]) == [7, 8]
    chat = client.post("/v1/chat/completions", json={**CHAT, "n": 3, "seed": 1}).json()
    assert [c["index"] for c in chat["choices"]] == [0, 1, 2]


def test_multiple_prompts(client):
    r = client.post("/v1/completions", json={**COMPLETION, "prompt": ["a", "bc"], "n": 2}).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    assert r["usage"]["prompt_tokens"] == 3 and r["usage"]["completion_tokens"] == 20


def test_echo_logprobs(client):
    for max_tokens in (1, 0):
        r = client.post("/v1/completions", json={**COMPLETION, "prompt": "abc", "echo": True, "logprobs": 1,
                                                  "max_tokens": max_tokens, "temperature": 0})
        choice = r.json()["choices"][0]
        lp = choice["logprobs"]
        n = 3 + max_tokens
        assert choice["text"] == "abcT"[:n]
        assert lp["tokens"] == list("abcT"[:n]) and lp["text_offset"] == list(range(n))
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert all(isinstance(v, float) for v in lp["token_logprobs"][1:])
        assert all(len(top) == 1 for top in lp["top_logprobs"][1:])
        assert choice["finish_reason"] == "length"


def test_echo_with_token_prompt_and_zero_tokens(client, fake_engine):
    r = client.post("/v1/completions", json={**COMPLETION, "prompt": [104, 105], "echo": True, "max_tokens": 0})
    assert r.json()["choices"][0]["text"] == "hi"
    assert fake_engine.requests == []  # nothing to generate, nothing to score: the engine is not asked


def test_chat_logprobs(client):
    r = client.post("/v1/chat/completions", json={**CHAT, "logprobs": True, "top_logprobs": 2, "temperature": 0})
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 5
    assert content[0]["token"] == "T" and content[0]["bytes"] == [84] and content[0]["logprob"] == -0.5
    assert [t["token"] for t in content[0]["top_logprobs"]] == ["T", "U"]


def test_chat_stream(client):
    r = client.post("/v1/chat/completions", json={**CHAT, "stream": True, "temperature": 0})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = sse(r)
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "The c"
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert len({c["id"] for c in chunks}) == 1


def test_stream_include_usage(client):
    for path, payload in (("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)):
        r = client.post(path, json={**payload, "stream": True, "stream_options": {"include_usage": True}})
        chunks = sse(r)
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
        assert all("usage" not in c for c in chunks[:-1])


def test_completion_stream_echo_logprobs(client):
    r = client.post("/v1/completions", json={**COMPLETION, "prompt": "ab", "echo": True, "logprobs": 0,
                                              "stream": True, "temperature": 0, "max_tokens": 3})
    chunks = sse(r)
    assert "".join(c["choices"][0]["text"] for c in chunks) == "abThe"[:5]
    tokens = [t for c in chunks for t in c["choices"][0]["logprobs"]["tokens"]]
    offsets = [o for c in chunks for o in c["choices"][0]["logprobs"]["text_offset"]]
    assert tokens == list("abThe") and offsets == [0, 1, 2, 3, 4]
    assert chunks[0]["choices"][0]["logprobs"]["token_logprobs"][0] is None


def test_stream_n_choices(client):
    chunks = sse(client.post("/v1/completions", json={**COMPLETION, "n": 2, "seed": 3, "stream": True}))
    texts = {0: "", 1: ""}
    for c in chunks:
        texts[c["choices"][0]["index"]] += c["choices"][0]["text"]
    assert all(len(t) == 5 for t in texts.values()) and texts[0] != texts[1]


def test_error_mid_stream_is_in_band(client):
    r = client.post("/v1/completions", json={**COMPLETION, "prompt": "FAIL", "stream": True})
    assert r.status_code == 200
    chunks = sse(r)
    assert chunks[-1]["error"]["message"] == "generation failed: fake engine failure"
    r = client.post("/v1/completions", json={**COMPLETION, "prompt": "FAIL"})
    assert_error(r, 500)
    assert client.get("/health").status_code == 200  # still serving


@pytest.mark.parametrize("path, payload, param", [
    ("/v1/completions", {**COMPLETION, "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "temperature": -1}, "temperature"),
    ("/v1/completions", {**COMPLETION, "temperature": 2.1}, "temperature"),
    ("/v1/completions", {**COMPLETION, "top_p": 0}, "top_p"),
    ("/v1/completions", {**COMPLETION, "top_p": 1.1}, "top_p"),
    ("/v1/completions", {**COMPLETION, "n": 0}, "n"),
    ("/v1/completions", {**COMPLETION, "max_tokens": "many"}, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "prompt": "x" * 70}, "prompt"),
    ("/v1/completions", {**COMPLETION, "max_tokens": 60}, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "prompt": [300]}, "prompt"),
    ("/v1/completions", {"model": "fake-model"}, "prompt"),
    ("/v1/chat/completions", {**CHAT, "messages": "hi"}, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "tool", "content": "x"}]}, "messages"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 100}, "max_completion_tokens"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, None),
    ("/v1/chat/completions", {**CHAT, "stream": True, "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "seed": 2**70}, "seed"),  # beyond torch.Generator's 64 bits
    ("/v1/completions", {**COMPLETION, "best_of": 3}, None),  # not silently ignored
])
def test_invalid_requests(client, path, payload, param):
    assert_error(client.post(path, json=payload), 400, param)


@pytest.mark.parametrize("path, body, where", [  # JSON allows lone surrogate escapes; no tokenizer takes them
    ("/v1/completions", '{"prompt": "caf\\udcff"}', "prompt"),
    ("/v1/completions", '{"prompt": "hi", "stop": ["ok", "\\ud800"]}', "stop.1"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\udcff"}]}', "messages.0.content"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
     "messages.0.content.0.text"),
    ("/tokenize", '{"prompt": "\\udcff"}', "prompt"),
])
def test_lone_surrogates_get_a_400_naming_the_field(client, path, body, where):
    r = client.post(path, content=body.encode(), headers={"content-type": "application/json"})
    assert assert_error(r, 400)["message"].startswith(f"{where}: not valid Unicode text")
    assert client.get("/health").status_code == 200


def test_seed_takes_the_whole_signed_64_bit_range(client):
    for seed in (-(2**63), 2**63 - 1):
        assert client.post("/v1/completions", json={**COMPLETION, "seed": seed}).status_code == 200


def test_best_of_equal_to_n_is_plain_n(client):
    r = client.post("/v1/completions", json={**COMPLETION, "n": 2, "best_of": 2})
    assert r.status_code == 200 and len(r.json()["choices"]) == 2


def test_malformed_json_and_wrong_body(client):
    r = client.post("/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"})
    assert "JSON" in assert_error(r, 400)["message"]
    assert_error(client.post("/v1/completions", json=[1, 2]), 400)


def test_unknown_model_route_and_method(client):
    assert assert_error(client.post("/v1/chat/completions", json={**CHAT, "model": "gpt-9"}), 404, "model")["code"] \
        == "model_not_found"
    assert_error(client.get("/v1/nothing"), 404)
    assert_error(client.get("/v1/completions"), 405)


def test_models_and_health(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["fake-model"]
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model"] == "fake-model" and health["device"] == "cpu"
    assert health["kernel_paths"] and health["max_seq_len"] == 64


def test_retrieve_model(client):
    card = client.get("/v1/models/fake-model").json()
    assert card["object"] == "model" and card["id"] == "fake-model"
    assert client.get("/v1/models/default").json()["id"] == "fake-model"  # the alias names the served model
    assert assert_error(client.get("/v1/models/gpt-9"), 404, "model")["code"] == "model_not_found"


def test_tool_calls_get_a_400_naming_the_field(client):
    tools = [{"type": "function", "function": {"name": "f"}}]
    error = assert_error(client.post("/v1/chat/completions", json={**CHAT, "tools": tools}), 400, "tools")
    assert "tool calling is not supported" in error["message"]
    assert client.post("/v1/chat/completions", json={**CHAT, "tools": tools, "tool_choice": "none"}).status_code == 200


def test_response_format_and_logit_bias_reach_the_engine_or_get_a_400(client, fake_engine):
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object"}}}
    assert client.post("/v1/chat/completions", json={**CHAT, "response_format": fmt,
                                                     "logit_bias": {"65": 3}}).status_code == 200
    params = fake_engine.requests[-1].params
    assert params.structured.kind == "json_schema" and params.logit_bias == {65: 3.0}
    assert fake_engine.grammars.compiled == [params.structured]  # compiled before the request ran
    metrics = client.get("/metrics").text
    assert 'fbserve_structured_output_requests_total{format="json_schema"} 1.0' in metrics
    assert 'fbserve_structured_output_requests_total{format="json_object"} 0.0' in metrics
    bad = {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "FAIL"}}}
    error = assert_error(client.post("/v1/chat/completions", json={**CHAT, "response_format": bad}), 400,
                         "response_format")
    assert "cannot be used" in error["message"]
    assert client.app.state.server.admission.in_flight == 0  # admitted before compiling, then released
    assert 'fbserve_requests_total{status="invalid"} 1.0' in client.get("/metrics").text
    error = assert_error(client.post("/v1/completions", json={"prompt": "a", "logit_bias": {"256": 1}}), 400,
                         "logit_bias")
    assert "outside the vocabulary" in error["message"]
    assert_error(client.post("/v1/chat/completions", json={**CHAT, "response_format": {"type": "xml"}}), 400,
                 "response_format.type")
    error = assert_error(client.post("/v1/chat/completions", json={**CHAT, "logit_bias": {"65": 101}}), 400,
                         "logit_bias")
    assert "[-100, 100]" in error["message"]
    big = {"type": "json_schema", "json_schema": {"name": "p", "schema": {"enum": ["x" * 70_000]}}}
    error = assert_error(client.post("/v1/chat/completions", json={**CHAT, "response_format": big}), 400,
                         "response_format")
    assert "at most 65536" in error["message"]
    assert len(fake_engine.requests) == 1  # the refused ones never reached the engine


def test_models_reports_quantization_and_quality(fake_engine):
    fake_engine.loaded.quantization = {
        "method": "fbquant", "bits": 3, "group_size": 128, "rank": 32, "bits_per_weight": 4.7431,
        "quality": {"wikitext2": {"perplexity": 40.07, "reference_perplexity": 30.64, "kl_divergence": 0.3,
                                  "top1_agreement": 0.699, "windows": 8, "ctx": 512, "note": "quick figure"}}}
    with TestClient(create_app(fake_engine, metrics=Metrics())) as c:
        card = c.get("/v1/models").json()["data"][0]["quantization"]
    assert card == {"method": "fbquant", "bits_per_weight": 4.7431, "bits": 3, "group_size": 128, "rank": 32,
                    "quality": [{"dataset": "wikitext2", "perplexity": 40.07, "reference_perplexity": 30.64,
                                 "kl_divergence": 0.3, "top1_agreement": 0.699, "windows": 8, "ctx": 512}]}


def test_models_reports_an_unquantized_model_as_such():
    import torch
    from types import SimpleNamespace

    from server.model_card import quantization_card

    model = SimpleNamespace(model=SimpleNamespace(norm=torch.nn.LayerNorm(4, dtype=torch.float16)))
    card = quantization_card(SimpleNamespace(quantization=None, model=model))
    assert card.method == "none" and card.bits_per_weight == 16.0 and card.quality == []


def test_loading_returns_503_until_ready():
    release = threading.Event()
    engine = None

    def factory():
        nonlocal engine
        from conftest import FakeEngine

        release.wait(10)
        engine = FakeEngine()
        return engine

    metrics = Metrics()
    with TestClient(create_app(factory, metrics=metrics)) as client:
        assert client.get("/health").json() == {"status": "loading", "ready": False} and client.get("/health").status_code == 503
        assert_error(client.post("/v1/chat/completions", json=CHAT), 503)
        assert_error(client.get("/v1/models"), 503)
        release.set()
        deadline = time.monotonic() + 10
        while client.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
        assert engine.started
        assert 'fbserve_requests_rejected_total{reason="loading"} 1.0' in client.get("/metrics").text
    assert not engine.started  # the app owns a factory-built engine and shuts it down


@contextmanager
def _failed_load(exc: BaseException):
    """A client of an app whose engine factory raised `exc`, once its on_load_error has seen it."""
    failures = []

    def factory():
        raise exc

    with TestClient(create_app(factory, metrics=Metrics(), on_load_error=failures.append)) as client:
        deadline = time.monotonic() + 5
        while not failures and time.monotonic() < deadline:
            time.sleep(0.01)
        assert failures == [exc]
        yield client


def test_load_failure_reported():
    with _failed_load(RuntimeError("no weights")) as client:
        health = client.get("/health")
        assert health.status_code == 503 and "no weights" in health.json()["error"]
        assert "no weights" in assert_error(client.post("/v1/completions", json=COMPLETION), 503)["message"]


def test_a_kv_cache_that_does_not_fit_is_one_log_line_without_traceback(caplog):
    """The operator's settings, not a bug: the reason in /health and one ERROR line, no traceback."""
    from engine.memory import KVCacheTooLarge

    with caplog.at_level(logging.ERROR, logger="fbserve.server"):
        with _failed_load(KVCacheTooLarge("a KV cache of 8 slots x 8192 tokens needs 8.00 GiB")) as client:
            health = client.get("/health")
    assert health.status_code == 503 and "8 slots x 8192 tokens" in health.json()["error"]
    records = [r for r in caplog.records if r.name == "fbserve.server" and r.levelno >= logging.ERROR]
    assert records and "8 slots x 8192 tokens" in records[0].getMessage() and records[0].exc_info is None


async def _call_and_disconnect(app, path: str, payload: dict, after_first_body: bool, delay_s: float = 0.2):
    """Drive the ASGI app directly; the client disconnects after the first streamed bytes, or after delay_s."""
    gone = asyncio.Event()
    sent_body = False
    messages = []

    async def receive():
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": json.dumps(payload).encode(), "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        messages.append(message)
        if after_first_body and message["type"] == "http.response.body" and message.get("body"):
            gone.set()

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json"), (b"host", b"test")],
             "client": ("127.0.0.1", 1234), "server": ("test", 80), "state": {}}
    if not after_first_body:
        asyncio.get_running_loop().call_later(delay_s, gone.set)
    await asyncio.wait_for(app(scope, receive, send), 5)
    return messages


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_cancels_generation(fake_engine, stream):
    fake_engine.token_delay_s = 0.05
    metrics = Metrics()
    app = create_app(fake_engine, metrics=metrics)
    payload = {**COMPLETION, "max_tokens": 50, "n": 2, "stream": stream}
    start = time.monotonic()
    asyncio.run(_call_and_disconnect(app, "/v1/completions", payload, after_first_body=stream))
    assert time.monotonic() - start < 1.5  # 50 tokens would take 2.5 s
    assert len(fake_engine.cancelled) == 2 and fake_engine.running == 0
    assert metrics.requests.labels(status="cancelled")._value.get() == 1
    assert metrics.requests_cancelled._value.get() == 1


METRIC_NAMES = [
    "fbserve_time_to_first_token_seconds_bucket", "fbserve_inter_token_latency_seconds_bucket",
    "fbserve_request_duration_seconds_bucket", "fbserve_queue_wait_seconds_bucket",
    "fbserve_prompt_tokens_total", "fbserve_generation_tokens_total", 'fbserve_requests_total{status="success"}',
    "fbserve_requests_running", "fbserve_requests_waiting", 'fbserve_model_weight_bytes{kind="fp"}',
    'fbserve_memory_bytes{device="cpu",kind="rss"}', 'fbserve_memory_bytes{device="cpu",kind="kv_cache"}',
    'fbserve_requests_rejected_total{reason="loading"}', "fbserve_requests_cancelled_total",
    "fbserve_kv_cache_usage_ratio", "fbserve_qdec_residual_bytes", "fbserve_qdec_channels_fetched_total",
    "fbserve_qdec_bytes_fetched_total", "fbserve_kernel_info{",
]


def test_metrics(client):
    client.post("/v1/chat/completions", json=CHAT)
    client.post("/v1/chat/completions", json={**CHAT, "temperature": 5})
    text = client.get("/metrics").text
    for name in METRIC_NAMES:
        assert name in text, name
    assert 'fbserve_requests_total{status="success"} 1.0' in text
    assert 'fbserve_requests_total{status="invalid"} 1.0' in text
    assert "fbserve_generation_tokens_total 5.0" in text
    assert "fbserve_inter_token_latency_seconds_count 4.0" in text


def test_default_registry_has_every_name():
    from prometheus_client import generate_latest

    from server.metrics import REGISTRY

    text = generate_latest(REGISTRY).decode()
    for name in METRIC_NAMES:
        if "{" not in name:
            assert f"# TYPE {name.removesuffix('_bucket').removesuffix('_total')}" in text, name
