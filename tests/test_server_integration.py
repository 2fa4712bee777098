"""The real server (`fbserve serve`, real engine, default model) driven by the official OpenAI SDK and httpx.

One server process for the module; generated lengths stay small (the model decodes ~40-60 tok/s on CPU).
"""
from __future__ import annotations

import json
import re
import threading
import time

import httpx
import openai
import pytest
import torch
from openai import OpenAI
from pydantic import BaseModel, Field

from tests.server_process import running_server

CONTEXT = 512  # --max-seq-len: a small KV cache, and an over-long prompt is cheap to build


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    log_path = tmp_path_factory.mktemp("fbserve") / "server.log"
    with running_server(["--device", "cpu", "--max-seq-len", str(CONTEXT)], log_path) as srv:
        yield srv.url


@pytest.fixture(scope="module")
def client(base_url) -> OpenAI:
    return OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0, timeout=120)


def metric(base_url: str, name: str) -> float:
    text = httpx.get(f"{base_url}/metrics").text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def test_health_and_models(base_url, client):
    health = httpx.get(f"{base_url}/health").json()
    assert health["status"] == "ok" and health["device"] == "cpu" and health["max_seq_len"] == CONTEXT
    assert health["kernel_paths"]
    fast = health["cpu_decode"]  # engine.cpu_decode on, and which lm_head it runs
    assert fast["enabled"], fast
    assert fast["threads"]["decode"] == max(1, fast["threads"]["prefill"] - 1), fast  # a core left to the server
    from cuda_ext.cpu_native import kernel_name, native_reason

    x86 = "fbgemm" in torch.backends.quantized.supported_engines
    if native_reason() is None:  # the embedded model's head is Q8_0: int8 on fbserve's kernel
        assert fast["lm_head"] == f"{kernel_name()}-q8_0", fast
    else:
        assert fast["lm_head"] == "fbgemm-fp16" if x86 else fast["lm_head"].startswith("fp32"), fast
    assert [m.id for m in client.models.list().data] == [health["model"]]


def test_capital_of_france(client):
    r = client.chat.completions.create(model="default", temperature=0, max_tokens=12,
                                       messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in r.choices[0].message.content
    assert r.usage.completion_tokens <= 12 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_with_usage(client):
    stream = client.chat.completions.create(model="default", temperature=0, max_tokens=6, stream=True,
                                            stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": "Say hello."}])
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content and chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 6
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_completions(client):
    r = client.completions.create(model="default", prompt="Once upon a time", max_tokens=5, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5 and r.choices[0].text
    pieces = [c.choices[0].text for c in client.completions.create(
        model="default", prompt="Once upon a time", max_tokens=5, temperature=0, stream=True)]
    assert "".join(pieces) == r.choices[0].text  # greedy: streaming and not give the same text


@pytest.mark.parametrize("max_tokens", [1, 0])
def test_echo_logprobs(client, max_tokens):
    """What lm-eval-harness sends to score a continuation."""
    prompt = "The capital of France is Paris"
    r = client.completions.create(model="default", prompt=prompt, echo=True, logprobs=1, max_tokens=max_tokens,
                                  temperature=0)
    choice = r.choices[0]
    lp = choice.logprobs
    assert choice.text.startswith(prompt)
    assert len(lp.tokens) == r.usage.prompt_tokens + max_tokens == len(lp.token_logprobs) == len(lp.top_logprobs)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:]) and "".join(lp.tokens).startswith(prompt)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_n_with_seed_is_reproducible(client):
    def sample() -> list[str]:
        r = client.completions.create(model="default", prompt="My favourite animal is", n=2, seed=1234,
                                      max_tokens=6, temperature=1.0)
        return [c.text for c in sorted(r.choices, key=lambda c: c.index)]

    first = sample()
    assert first == sample() and first[0] != first[1]


def test_stop_strings(client):
    # ignore_eos: finish_reason "stop" can then only come from the stop string.
    r = client.chat.completions.create(model="default", temperature=0, max_tokens=12, stop=["zzzz", "Paris"],
                                       messages=[{"role": "user", "content": "What is the capital of France?"}],
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop" and "Paris" not in r.choices[0].message.content


class City(BaseModel):
    name: str = Field(max_length=32)
    country: str = Field(max_length=32)
    is_capital: bool  # (a float lets this 135M model loop on digits until max_tokens: the SDK then raises)


def test_structured_output_through_the_sdk_parse_helper(client):
    """`client.chat.completions.parse(response_format=<pydantic model>)`: the SDK sends a strict JSON schema
    and validates the answer into the model; a schema the grammar compiler rejects is a 400."""
    r = client.chat.completions.parse(model="default", temperature=0, max_tokens=80, response_format=City,
                                      messages=[{"role": "user", "content": "Describe the capital of France."}])
    city = r.choices[0].message.parsed
    assert isinstance(city, City) and r.choices[0].finish_reason == "stop", r.choices[0].message.content
    assert list(json.loads(r.choices[0].message.content)) == ["name", "country", "is_capital"]
    stream = client.chat.completions.create(model="default", temperature=0, max_tokens=48, stream=True,
                                            response_format={"type": "json_object"},
                                            messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert isinstance(json.loads("".join(c.choices[0].delta.content or "" for c in stream if c.choices)), dict)
    completion = client.completions.create(model="default", prompt="A JSON object describing Paris:", max_tokens=48,
                                           temperature=0, extra_body={"response_format": {"type": "json_object"}})
    assert isinstance(json.loads(completion.choices[0].text), dict)  # the extension on /v1/completions
    assert completion.choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="default", max_tokens=4, messages=[{"role": "user", "content": "x"}],
                                       response_format={"type": "json_schema", "json_schema": {
                                           "name": "bad", "schema": {"type": "integer", "minimum": "x"}}})
    assert err.value.body["param"] == "response_format" and "must be a number" in err.value.body["message"]


def test_errors(base_url, client):
    url = f"{base_url}/v1/completions"
    cases = [{"prompt": "x", "temperature": 3}, {"prompt": "x", "max_tokens": -1}, {"prompt": "x", "n": 0},
             {"prompt": "x", "top_p": 0}, {"prompt": "hello " * (CONTEXT + 10)},
             {"prompt": "x", "max_tokens": CONTEXT}]
    for payload in cases:
        r = httpx.post(url, json=payload)
        assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}, payload
    r = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="default", messages=[{"role": "user", "content": "x"}], temperature=-1)
    assert client.completions.create(model="default", prompt="Hi", max_tokens=1).choices  # still serving


def _stream_chat(base_url: str, content: str, results: list) -> None:
    payload = {"model": "default", "stream": True, "max_tokens": 6, "temperature": 0,
               "messages": [{"role": "user", "content": content}]}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=payload, timeout=120) as r:
        frames = [line.removeprefix("data: ") for line in r.iter_lines() if line]
    assert frames[-1] == "[DONE]"
    results.append("".join(json.loads(f)["choices"][0]["delta"].get("content", "") for f in frames[:-1]))


def test_concurrent_streams(base_url):
    results: list[str] = []
    threads = [threading.Thread(target=_stream_chat, args=(base_url, f"Tell me about number {i}.", results))
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert len(results) == 4 and all(results)


def _wait_idle(base_url: str, timeout_s: float) -> None:
    start = time.monotonic()
    while metric(base_url, "fbserve_requests_running") != 0:
        assert time.monotonic() - start < timeout_s, "the abandoned request kept running"
        time.sleep(0.05)


LONG = {"model": "default", "prompt": "Once upon a time", "max_tokens": CONTEXT - 16, "ignore_eos": True}


def test_disconnect_mid_stream_cancels(base_url):
    cancelled = metric(base_url, "fbserve_requests_cancelled_total")
    with httpx.stream("POST", f"{base_url}/v1/completions", json={**LONG, "stream": True}, timeout=60) as r:
        # Keep the line iterator referenced: a dropped one is closed at once, and closing it closes the
        # connection, i.e. disconnects before the checks below (this raced and failed once).
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: {"):
                break
        assert metric(base_url, "fbserve_requests_running") == 1
        generated = metric(base_url, "fbserve_generation_tokens_total")
        lines.close()
    _wait_idle(base_url, 3)  # the whole completion would take far longer
    assert metric(base_url, "fbserve_requests_cancelled_total") == cancelled + 1
    assert metric(base_url, "fbserve_generation_tokens_total") - generated < LONG["max_tokens"] / 2


def test_disconnect_while_waiting_cancels(base_url):
    cancelled = metric(base_url, "fbserve_requests_cancelled_total")
    generated = metric(base_url, "fbserve_generation_tokens_total")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base_url}/v1/completions", json=LONG, timeout=httpx.Timeout(60, read=1.0))
    _wait_idle(base_url, 3)  # the whole completion would take far longer
    assert metric(base_url, "fbserve_generation_tokens_total") - generated < LONG["max_tokens"] / 2
    deadline = time.monotonic() + 5  # the server notices within its poll interval
    while metric(base_url, "fbserve_requests_cancelled_total") != cancelled + 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
