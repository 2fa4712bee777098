"""CPU decode must not depend on which thread loaded the model (engine/__init__.py explains the cause:
OpenMP busy-waiting on a busy CPU). Each check runs in a fresh interpreter, as libgomp reads its
settings once, when torch loads."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Torch's first OpenMP regions run in a thread that exits; then another thread times small matmuls
# (the shape of a decode step's projections), and the same after warming up in the main thread.
SCRIPT = """
import {first}
import threading, time, torch
def init():
    a = torch.randn(512, 512); (a @ a).sum()
def timed(out):
    a, w = torch.randn(8, 576), torch.randn(1536, 576)
    start = time.monotonic()
    for _ in range(150):
        a @ w.T
    out.append(time.monotonic() - start)
def run(target):
    out = []
    t = threading.Thread(target=target, args=(out,) if target is timed else ()); t.start(); t.join()
    return out
run(init)
after_exit = run(timed)[0]
init()
main_alive = run(timed)[0]
import os
print(os.environ.get("OMP_WAIT_POLICY"), after_exit, main_alive)
"""


def _run(first: str, env: dict | None = None) -> tuple[str, float, float]:
    environ = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(first=first)], capture_output=True, text=True,
                         cwd=ROOT, env={**environ, **(env or {})}, timeout=300)
    assert out.returncode == 0, out.stderr
    policy, after_exit, main_alive = out.stdout.split()
    return policy, float(after_exit), float(main_alive)


def test_importing_engine_first_sets_a_passive_wait_policy():
    policy, after_exit, main_alive = _run("engine")
    assert policy == "PASSIVE"
    # Busy-waiting made the first number ~10-40x the second on 2 busy cores; allow generous noise.
    assert after_exit < 4 * main_alive + 0.2, (after_exit, main_alive)


def test_the_cli_imports_engine_before_torch():
    assert _run("server.cli")[0] == "PASSIVE"


def test_an_explicit_policy_is_kept():
    assert _run("engine", {"OMP_WAIT_POLICY": "ACTIVE"})[0] == "ACTIVE"
