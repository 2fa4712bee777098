"""Production serving on the fake engine: auth, limits, back-pressure, timeouts, draining, /tokenize,
/health, memory and vLLM-named metrics, and the CLI flags that configure them."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from fastapi.testclient import TestClient

from server import cli
from server.admission import ServingConfig, key_matches, load_api_keys
from server.app import create_app
from server.metrics import Metrics

COMPLETION = {"prompt": "Hello", "max_tokens": 4, "temperature": 0}


def make_client(engine, **config) -> TestClient:
    app = create_app(engine, metrics=Metrics(), config=ServingConfig(**config))
    return TestClient(app, raise_server_exceptions=False)


def assert_envelope(r: httpx.Response, status: int, type_: str, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["type"] == type_ and error["message"]
    if code is not None:
        assert error["code"] == code
    return error


def rejected(client: TestClient, reason: str) -> float:
    return client.app.state.metrics.requests_rejected.labels(reason=reason)._value.get()


# ---------------------------------------------------------------- auth

def test_api_keys_guard_inference_and_admin_routes(fake_engine):
    with make_client(fake_engine, api_keys=["k1", "k2"]) as c:
        for path, body in [("/v1/completions", COMPLETION), ("/tokenize", {"prompt": "hi"}),
                           ("/detokenize", {"tokens": [104]})]:
            assert_envelope(c.post(path, json=body), 401, "invalid_request_error", "invalid_api_key")
            wrong = c.post(path, json=body, headers={"Authorization": "Bearer k3"})
            assert_envelope(wrong, 401, "invalid_request_error", "invalid_api_key")
            assert wrong.headers["www-authenticate"] == "Bearer"
            for key in ("k1", "k2"):
                assert c.post(path, json=body, headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Basic k1"}).status_code == 401
        assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200  # public


def test_metrics_auth(fake_engine):
    with make_client(fake_engine, api_keys=["k1"], metrics_auth=True) as c:
        assert_envelope(c.get("/metrics"), 401, "invalid_request_error", "invalid_api_key")
        assert c.get("/metrics", headers={"Authorization": "Bearer k1"}).status_code == 200
        assert c.get("/health").status_code == 200


def test_api_key_sources(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# ops keys\nfile-a\n\n  file-b  \n")
    keys = load_api_keys(["flag"], str(path), env={"FBSERVE_API_KEY": "env-a, env-b,flag"})
    assert keys == ["flag", "file-a", "file-b", "env-a", "env-b"]
    assert load_api_keys(env={}) == []
    assert key_matches("env-b", keys) and not key_matches("env-", keys) and not key_matches("", keys)


# ---------------------------------------------------------------- limits

def test_body_size_limit(fake_engine):
    with make_client(fake_engine, max_body_bytes=200) as c:
        big = {**COMPLETION, "prompt": "x" * 300}
        assert_envelope(c.post("/v1/completions", json=big), 413, "invalid_request_error", "request_too_large")

        def chunks():  # no Content-Length: counted as it arrives
            yield json.dumps(big).encode()

        r = c.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
        assert_envelope(r, 413, "invalid_request_error", "request_too_large")
        assert rejected(c, "too_large") == 2
        assert c.post("/v1/completions", json=COMPLETION).status_code == 200


def test_n_stop_and_prompt_limits(fake_engine):
    with make_client(fake_engine, max_n=2, max_prompt_tokens=10) as c:
        error = assert_envelope(c.post("/v1/completions", json={**COMPLETION, "n": 3}), 400, "invalid_request_error")
        assert error["param"] == "n" and "at most 2" in error["message"]
        stops = {**COMPLETION, "stop": ["a", "b", "c", "d", "e"]}
        error = assert_envelope(c.post("/v1/completions", json=stops), 400, "invalid_request_error")
        assert error["param"] == "stop" and "4 stop" in error["message"]
        long = {"messages": [{"role": "user", "content": "x" * 20}], "max_tokens": 2}
        error = assert_envelope(c.post("/v1/chat/completions", json=long), 400, "invalid_request_error",
                                "prompt_too_long")
        assert error["param"] == "messages" and "--max-prompt-tokens" in error["message"]
        assert rejected(c, "too_large") == 1
        assert c.post("/v1/completions", json={**COMPLETION, "n": 2, "stop": ["a", "b", "c", "d"]}).status_code == 200


# ---------------------------------------------------------------- back-pressure and timeouts

async def _post_many(app, n: int, payload: dict) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
        return await asyncio.gather(*(client.post("/v1/completions", json=payload) for _ in range(n)))


def test_full_queue_answers_429_and_stays_healthy(fake_engine):
    fake_engine.max_batch, fake_engine.token_delay_s = 2, 0.05
    app = create_app(fake_engine, metrics=Metrics(), config=ServingConfig(max_queue=1))
    responses = asyncio.run(_post_many(app, 5, {**COMPLETION, "max_tokens": 10}))
    codes = sorted(r.status_code for r in responses)
    assert codes == [200, 200, 200, 429, 429]  # 2 slots + 1 waiting
    for r in responses:
        if r.status_code == 429:
            assert_envelope(r, 429, "rate_limit_error", "server_overloaded")
            assert int(r.headers["retry-after"]) >= 1
    with TestClient(app) as c:  # the admissions were all released: it serves again
        assert c.get("/health").status_code == 200
        assert c.post("/v1/completions", json={**COMPLETION, "n": 3}).status_code == 200
        assert_envelope(c.post("/v1/completions", json={**COMPLETION, "n": 4}), 429, "rate_limit_error")
    m = app.state.metrics
    assert m.requests_rejected.labels(reason="queue_full")._value.get() == 3
    assert m.requests.labels(status="rejected")._value.get() == 3
    assert app.state.server.admission.in_flight == 0


def test_request_timeout(fake_engine):
    fake_engine.token_delay_s = 0.05
    with make_client(fake_engine, request_timeout_s=0.3) as c:
        slow = {**COMPLETION, "max_tokens": 40}
        error = assert_envelope(c.post("/v1/completions", json=slow), 504, "timeout_error", "request_timeout")
        assert "--request-timeout" in error["message"]
        with c.stream("POST", "/v1/completions", json={**slow, "stream": True}) as r:
            assert r.status_code == 200
            frames = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert frames[-1] == "[DONE]"
        assert json.loads(frames[-2])["error"]["code"] == "request_timeout"
        assert len(frames) > 3  # some tokens streamed before the deadline
        assert rejected(c, "timeout") == 2
        assert fake_engine.running == 0 and len(fake_engine.cancelled) == 2
        assert c.app.state.server.admission.in_flight == 0


def test_draining_refuses_new_requests(fake_engine):
    with make_client(fake_engine) as c:
        c.app.state.server.draining = True
        error = assert_envelope(c.post("/v1/completions", json=COMPLETION), 503, "service_unavailable", "shutting_down")
        assert error["message"] == "the server is shutting down"
        assert rejected(c, "shutting_down") == 1
        assert c.get("/health").status_code == 503 and c.get("/health").json()["status"] == "shutting_down"


# ---------------------------------------------------------------- /tokenize, /detokenize, /health

def test_tokenize_and_detokenize(client):
    r = client.post("/tokenize", json={"prompt": "abc"})
    assert r.status_code == 200 and r.json() == {"tokens": [97, 98, 99], "count": 3, "max_model_len": 64}
    chat = client.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"] == [ord(ch) for ch in "<user>hi\n<assistant>"] and chat["count"] == len(chat["tokens"])
    no_gen = client.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}],
                                            "add_generation_prompt": False}).json()
    assert no_gen["count"] == len("<user>hi\n")
    assert client.post("/detokenize", json={"tokens": [104, 105]}).json() == {"prompt": "hi"}
    assert client.post("/detokenize", json={"tokens": []}).json() == {"prompt": ""}
    for bad in ({"tokens": [104, 256]}, {"tokens": [-1]}, {"tokens": ["x"]}):
        assert_envelope(client.post("/detokenize", json=bad), 400, "invalid_request_error")
    for bad in ({}, {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, {"prompt": 3}):
        assert_envelope(client.post("/tokenize", json=bad), 400, "invalid_request_error")
    assert_envelope(client.post("/tokenize", json={"prompt": "a", "model": "nope"}), 404, "invalid_request_error")


def test_health_reports_readiness_kernel_qdec_and_model(client):
    body = client.get("/health").json()
    assert body["status"] == "ok" and body["ready"] is True and body["model"] == "fake-model"
    assert body["qdec"] == {"enabled": False, "reason": "not configured"}
    assert body["kernel_paths"] and all("path" in row for row in body["kernel_paths"])


# ---------------------------------------------------------------- metrics

def test_vllm_metric_names(fake_engine):
    with make_client(fake_engine, metrics_compat="vllm") as c:
        assert c.post("/v1/completions", json=COMPLETION).status_code == 200
        text = c.get("/metrics").text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:gpu_cache_usage_perc",
                 "vllm:kv_cache_usage_perc", "vllm:time_to_first_token_seconds_bucket",
                 "vllm:time_per_output_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_count", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total", "vllm:request_success_total"):
        assert f'{name}{{' in text and 'model_name="fake-model"' in text, name
    assert 'vllm:request_success_total{model_name="fake-model"} 1.0' in text
    assert 'vllm:generation_tokens_total{model_name="fake-model"} 4.0' in text
    assert "fbserve_time_to_first_token_seconds_bucket" in text  # ours stay


def test_prefix_cache_counters_and_cached_tokens_in_usage(fake_engine):
    fake_engine.cached_tokens = 3
    with make_client(fake_engine, metrics_compat="vllm") as c:
        body = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                                    "n": 2}).json()
        assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 3}  # the prompt counts once for n = 2
        frames = c.post("/v1/completions", json={**COMPLETION, "stream": True,
                                                 "stream_options": {"include_usage": True}}).text
        text = c.get("/metrics").text
    assert '"prompt_tokens_details":{"cached_tokens":3}' in frames
    assert "fbserve_prefix_cache_queries_total 40.0" in text and "fbserve_prefix_cache_hits_total 30.0" in text
    assert 'vllm:prefix_cache_hits_total{model_name="fake-model"} 30.0' in text


def test_without_compat_no_vllm_names(client):
    assert "vllm:" not in client.get("/metrics").text


# ---------------------------------------------------------------- CLI

def test_serve_flags():
    args = cli.build_parser().parse_args([
        "serve", "--max-batch", "16", "--max-queue", "5", "--request-timeout", "2.5", "--shutdown-grace", "7",
        "--api-key", "a", "--api-key", "b", "--metrics-auth", "--metrics-compat", "vllm",
        "--max-body-bytes", "1000", "--max-prompt-tokens", "100", "--max-n", "3"])
    config = cli.serving_config(args)
    assert args.max_batch == 16 and args.shutdown_grace == 7
    assert config.api_keys == ["a", "b"] and config.metrics_auth and config.metrics_compat == "vllm"
    assert (config.max_queue, config.request_timeout_s, config.max_body_bytes, config.max_prompt_tokens,
            config.max_n) == (5, 2.5, 1000, 100, 3)
    d = cli.build_parser().parse_args(["serve"])
    assert (d.max_batch, d.max_queue, d.request_timeout, d.shutdown_grace, d.max_body_bytes, d.max_n) == \
        (8, 64, 600.0, 30, 1 << 20, 8)
    for bad in (["--max-batch", "17"], ["--max-batch", "0"], ["--max-n", "0"], ["--max-queue", "-1"]):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(["serve", *bad])
