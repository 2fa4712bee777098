"""Our /metrics against Prometheus itself: `promtool check metrics` lints it, and a real Prometheus
scrapes a live server (fake engine) and answers a PromQL query for the TTFT histogram.

The binaries come from Debian's `prometheus` package (.ci/install-tools.sh). Without them the tests skip,
except in CI (`CI` set), where a missing tool is a failure.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from server.admission import ServingConfig
from server.app import create_app
from server.metrics import Metrics


def _tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}") else None)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing: run .ci/install-tools.sh (Debian package prometheus)")
        pytest.skip(f"{name} not installed (Debian package prometheus; .ci/install-tools.sh)")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def live_server(fake_engine):
    """The app (fake engine) served by uvicorn in a thread on a free loopback port."""
    app = create_app(fake_engine, metrics=Metrics(), config=ServingConfig())
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    # The first /health imports the kernel modules (torch, triton): slow on a busy machine, done once here.
    assert httpx.get(f"{url}/health", timeout=120).status_code == 200
    yield url
    server.should_exit = True
    thread.join(10)


def _generate(url: str) -> None:
    for stream in (False, True):
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "stream": stream}, timeout=30)
        assert r.status_code == 200


def test_promtool_check_metrics(live_server):
    promtool = _tool("promtool")
    _generate(live_server)
    httpx.post(f"{live_server}/v1/completions", json={"prompt": ""}, timeout=30)  # an invalid one, for its counters
    text = httpx.get(f"{live_server}/metrics", timeout=60).text
    out = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"promtool check metrics:\n{out.stdout}{out.stderr}"
    assert not out.stdout.strip() and not out.stderr.strip(), out.stdout + out.stderr  # no lint warnings


def test_promtool_accepts_the_vllm_names_but_their_colons(fake_engine):
    """vLLM's names contain ':' (Prometheus reserves it for recording rules, hence a lint warning); the
    exposition is otherwise valid."""
    promtool = _tool("promtool")
    app = create_app(fake_engine, metrics=Metrics(), config=ServingConfig(metrics_compat="vllm"))
    with TestClient(app) as c:
        assert c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3}).status_code == 200
        text = c.get("/metrics").text
    out = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    problems = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
    assert problems and all(ln.startswith("vllm:") and ln.endswith("metric names should not contain ':'")
                            for ln in problems), problems


def test_prometheus_scrapes_the_ttft_histogram(live_server, tmp_path):
    prometheus = _tool("prometheus")
    _generate(live_server)
    port = _free_port()
    target = live_server.removeprefix("http://")
    config = tmp_path / "prometheus.yml"
    config.write_text(f"global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: fbserve\n"
                      f"    static_configs:\n      - targets: ['{target}']\n")
    log = tmp_path / "prometheus.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}"], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        series: list = []
        while not series:
            assert proc.poll() is None, f"prometheus exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no TTFT series scraped in 60 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/api/v1/query",
                              params={"query": "fbserve_time_to_first_token_seconds_bucket"}, timeout=5)
            except httpx.TransportError:
                continue
            if r.status_code == 200:
                series = r.json()["data"]["result"]
        assert {s["metric"]["le"] for s in series} >= {"0.005", "+Inf"}
        inf = next(s for s in series if s["metric"]["le"] == "+Inf")
        assert float(inf["value"][1]) == 2  # the two requests above
        assert inf["metric"]["job"] == "fbserve"
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
