"""Production serving with the real engine and the default model, through `fbserve serve` in a subprocess:
per-request sampling inside a batch, 32 concurrent streaming clients, 16 that leave mid-stream, and a
graceful SIGTERM. One server for the module; the SIGTERM test runs last and ends it.
"""
from __future__ import annotations

import asyncio
import json
import re
import signal
import time

import httpx
import pytest

from tests.server_process import running_server

MAX_BATCH = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log_path = tmp_path_factory.mktemp("fbserve") / "server.log"
    args = ["--device", "cpu", "--max-seq-len", "256", "--max-batch", str(MAX_BATCH), "--shutdown-grace", "60"]
    with running_server(args, log_path) as srv:
        yield srv


def _completion(prompt: str, **params) -> dict:
    return {"prompt": prompt, "max_tokens": 6, "ignore_eos": True, **params}


async def _post_all(url: str, bodies: list[dict]) -> list[dict]:
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        responses = await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    return [r.json() for r in responses]


def test_sampling_params_and_seeds_hold_inside_a_batch(server):
    bodies = [_completion("The capital of France is", temperature=0),
              _completion("Once upon a time", temperature=1.0, seed=1),
              _completion("Once upon a time", temperature=1.0, seed=2),
              _completion("Once upon a time", temperature=1.0, top_k=1, seed=1),
              _completion("My favourite colour is", temperature=1.2, top_p=0.9, seed=7, stop=["\n"])]
    alone = [asyncio.run(_post_all(server.url, [b]))[0]["choices"][0]["text"] for b in bodies]
    together = [r["choices"][0]["text"] for r in asyncio.run(_post_all(server.url, bodies))]
    assert together == alone
    assert alone[1] != alone[2]  # the seed matters...
    assert alone[1] != alone[3]  # ...and so does top_k (1: the greedy tokens), with the same seed


async def _stream(client: httpx.AsyncClient, body: dict, leave_after_first: bool = False) -> list[str]:
    """SSE data payloads of one streamed completion; with leave_after_first, disconnect after the first."""
    frames: list[str] = []
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                frames.append(line[6:])
                if leave_after_first:
                    break
    return frames


def test_32_concurrent_streaming_clients(server):
    rss_before = server.metric('fbserve_memory_bytes{device="cpu",kind="rss"}')

    async def client_loop(client: httpx.AsyncClient, i: int) -> int:
        errors = 0
        for j in range(3):
            frames = await _stream(client, _completion(f"Request {i}.{j}: count", max_tokens=4, temperature=0))
            chunks = [json.loads(f) for f in frames[:-1]]
            errors += frames[-1] != "[DONE]" or any("error" in c for c in chunks)
            errors += sum(len(c["choices"]) and c["choices"][0]["finish_reason"] == "length" for c in chunks) != 1
        return errors

    async def main() -> list[int]:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=server.url, timeout=300, limits=limits) as client:
            return await asyncio.gather(*(client_loop(client, i) for i in range(32)))

    assert sum(asyncio.run(main())) == 0
    assert server.metric("fbserve_requests_running") == 0
    assert server.metric("fbserve_requests_waiting") == 0
    assert server.metric('fbserve_requests_total{status="error"}') == 0
    growth = server.metric('fbserve_memory_bytes{device="cpu",kind="rss"}') - rss_before
    assert growth < 256 * 2**20, f"RSS grew {growth / 2**20:.0f} MiB over 96 requests"


def test_16_clients_leaving_mid_stream_free_their_slots(server):
    cancelled_before = server.metric("fbserve_requests_cancelled_total")

    async def main() -> list[list[str]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=300,
                                     limits=httpx.Limits(max_connections=32)) as client:
            body = _completion("Tell me a long story", max_tokens=200, temperature=0)
            return await asyncio.gather(*(_stream(client, body, leave_after_first=True) for _ in range(16)))

    assert all(len(frames) == 1 for frames in asyncio.run(main()))
    deadline = time.monotonic() + 60
    while server.metric("fbserve_requests_running") or server.metric("fbserve_requests_waiting"):
        assert time.monotonic() < deadline, "slots not freed 60 s after the clients left"
        time.sleep(0.2)
    deadline = time.monotonic() + 10
    while server.metric("fbserve_requests_cancelled_total") - cancelled_before < 16:
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_memory_metrics_by_kind(server):
    text = httpx.get(f"{server.url}/metrics", timeout=60).text
    rows = dict(re.findall(r'^fbserve_memory_bytes\{device="\w+",kind="(\w+)"\} (\S+)$', text, re.MULTILINE))
    assert {"weights_fp", "kv_cache_total", "kv_cache_used", "pinned_residuals", "rss"} <= set(rows), rows
    assert float(rows["kv_cache_total"]) > 0 and float(rows["weights_fp"]) > 0
    assert float(rows["kv_cache_used"]) == 0  # nothing running
    health = httpx.get(f"{server.url}/health", timeout=60).json()
    kv = health["kv_cache"]  # fp16 by default on a CPU; sized within the memory free at start
    assert {k: kv[k] for k in ("dtype", "bytes", "slots", "max_seq_len", "requested_max_seq_len")} == \
        {"dtype": "float16", "bytes": int(float(rows["kv_cache_total"])), "slots": MAX_BATCH, "max_seq_len": 256,
         "requested_max_seq_len": 256}
    assert kv["limited_by_memory"] is False and kv["bytes"] <= kv["budget_bytes"] < kv["free_bytes_at_start"]
    assert health["prefill_chunk"] == 256
    assert server.metric("fbserve_kv_cache_usage_ratio") == 0


def test_optional_paths_are_exported_with_their_reason(server):
    """fbserve_path_enabled says which optional path is live, and why not, as /health does."""
    text = httpx.get(f"{server.url}/metrics", timeout=60).text
    rows = {path: (reason, float(v)) for path, reason, v in
            re.findall(r'^fbserve_path_enabled\{path="(\w+)",reason="([^"]*)"\} (\S+)$', text, re.MULTILINE)}
    health = httpx.get(f"{server.url}/health", timeout=60).json()
    assert set(rows) == {"qdec", "cuda_graph", "cpu_decode", "merged_projections", "prefix_cache"}, rows
    for path in rows:
        assert rows[path] == (health[path].get("reason") or "", 1.0 if health[path]["enabled"] else 0.0), path
    assert rows["cuda_graph"] == ("not a CUDA device", 0.0)
    assert rows["merged_projections"] == ("not a CUDA device", 0.0)


def test_a_chat_follow_up_reports_its_reused_prompt_tokens(server):
    """The next turn of a chat prefills only what is new: usage and the prefix-cache counters say so."""
    first = [{"role": "user", "content": "Name three colours of the rainbow."}]
    body = {"messages": first, "max_tokens": 12, "temperature": 0}
    hits_before = server.metric("fbserve_prefix_cache_hits_total")
    r1 = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=300).json()
    follow = first + [r1["choices"][0]["message"], {"role": "user", "content": "And two more?"}]
    r2 = httpx.post(f"{server.url}/v1/chat/completions", json={**body, "messages": follow}, timeout=300).json()
    cached = r2["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert r1["usage"]["prompt_tokens"] <= cached < r2["usage"]["prompt_tokens"], (r1["usage"], r2["usage"])
    assert server.metric("fbserve_prefix_cache_hits_total") - hits_before >= cached
    assert httpx.get(f"{server.url}/health", timeout=60).json()["prefix_cache"]["enabled"] is True


def test_sigterm_finishes_streams_refuses_new_requests_and_exits_0(server):
    """Runs last: it ends the module's server."""
    body = _completion("Count from one to twenty:", max_tokens=24, temperature=0, stream=True)
    frames: list[str] = []
    with httpx.Client(base_url=server.url, timeout=120) as client:
        with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            for line in lines:  # wait for the first token, then ask the server to stop
                if line.startswith("data: "):
                    frames.append(line[6:])
                    break
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            try:  # a new request during the grace period: refused (503, or the socket is already closed)
                refused = httpx.post(f"{server.url}/v1/completions", json=_completion("Hi"), timeout=10)
                assert refused.status_code == 503, refused.text
                assert refused.json()["error"]["code"] == "shutting_down"
            except httpx.ConnectError:
                pass
            frames += [line[6:] for line in lines if line.startswith("data: ")]
    assert frames[-1] == "[DONE]", frames[-3:]
    chunks = [json.loads(f) for f in frames[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(len(c["choices"][0]["text"]) > 0 for c in chunks) > 5
    assert server.proc.wait(60) == 0, server.log()
