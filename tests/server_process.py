"""`fbserve serve` in a subprocess for the tests that drive the real server: start, wait until healthy, stop."""
from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fbserve_command() -> list[str]:
    script = Path(sys.executable).parent / "fbserve"
    return [str(script)] if script.exists() else [sys.executable, "-m", "server.cli"]


class ServerProcess:
    def __init__(self, proc: subprocess.Popen, url: str, log_path: Path, started_s: float) -> None:
        self.proc, self.url, self.log_path, self.started_s = proc, url, log_path, started_s

    def log(self) -> str:
        return self.log_path.read_text()[-4000:]

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=60).text
        match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
        assert match, f"{name} not in /metrics"
        return float(match.group(1))


@contextlib.contextmanager
def running_server(serve_args: list[str], log_path: Path, startup_timeout_s: float = STARTUP_TIMEOUT_S,
                   stop_grace_s: float = 20) -> Iterator[ServerProcess]:
    """`fbserve serve --port <free> <serve_args>` until /health says 200 (the test fails with the server's
    log otherwise); terminated (then killed) on exit unless the test already ended it."""
    port = free_port()
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(fbserve_command() + ["serve", "--port", str(port), *serve_args], stdout=log,
                                stderr=subprocess.STDOUT, env=os.environ.copy(), cwd=REPO_ROOT)
    srv = ServerProcess(proc, f"http://127.0.0.1:{port}", log_path, 0.0)
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"fbserve exited with {proc.returncode}:\n{srv.log()}")
            try:
                if httpx.get(f"{srv.url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() - t0 > startup_timeout_s:
                pytest.fail(f"fbserve not healthy after {startup_timeout_s} s:\n{srv.log()}")
            time.sleep(0.5)
        srv.started_s = time.monotonic() - t0
        yield srv
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(stop_grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
