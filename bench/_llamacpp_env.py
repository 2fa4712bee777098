"""A private environment for the llama.cpp baseline of bench/decode.py (not a project dependency).

`llama-cpp-python` goes into its own virtual environment under `$FBSERVE_HOME/bench-venv/`, so the
project's environment never carries it. PyPI ships it as a source distribution only for Linux x86-64
(CPU), so the first install compiles llama.cpp with the machine's gcc/cmake: several minutes on 2
cores, once. A prebuilt wheel is taken when the package index has one for this platform.

The benchmark itself runs in that environment's Python, as `_llamacpp_worker.py` (which imports nothing
of fbserve), and prints one JSON object.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

# Pinned so that every run of the benchmark measures the same llama.cpp (0.3.36 vendors llama.cpp of 2026).
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
# The llava/mtmd library is not needed for a text model; skipping it shortens the build by about a third.
# GGML_NATIVE: compile for this CPU (AVX2/AVX-512 where present), as a user building llama.cpp would.
CMAKE_ARGS = "-DLLAVA_BUILD=OFF -DGGML_NATIVE=ON"
WORKER = Path(__file__).with_name("_llamacpp_worker.py")


class Unavailable(Exception):
    """llama.cpp cannot be run here; the message is the reason printed as `skipped: <reason>`."""


def venv_dir() -> Path:
    """`$FBSERVE_LLAMACPP_VENV`, default `$FBSERVE_HOME/bench-venv/llama-cpp-python-<version>`."""
    override = os.environ.get("FBSERVE_LLAMACPP_VENV")
    if override:
        return Path(override).expanduser()
    home = Path(os.environ.get("FBSERVE_HOME", Path.home() / ".cache" / "fbserve")).expanduser()
    return home / "bench-venv" / LLAMA_CPP_PYTHON.replace("==", "-")


def _python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _importable(python: Path) -> bool:
    if not python.is_file():
        return False
    probe = subprocess.run([str(python), "-c", "import llama_cpp"], capture_output=True)
    return probe.returncode == 0


def ensure(install: bool = True, timeout_s: float = 3600, log=print) -> Path:
    """The Python of an environment where `import llama_cpp` works, installing it if allowed."""
    venv = venv_dir()
    python = _python(venv)
    if _importable(python):
        return python
    if not install:
        raise Unavailable(f"llama-cpp-python is not installed in {venv} (run without --no-install to build it)")
    if not python.is_file():
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    log(f"llama.cpp baseline: installing {LLAMA_CPP_PYTHON} into {venv}")
    wheel = subprocess.run(pip + ["--only-binary=:all:", LLAMA_CPP_PYTHON], capture_output=True, text=True)
    if wheel.returncode != 0:
        log("  no prebuilt wheel for this platform on the index: building llama.cpp from source "
            f"(CMAKE_ARGS={CMAKE_ARGS!r}; several minutes on 2 cores, once)")
        env = dict(os.environ, CMAKE_ARGS=CMAKE_ARGS, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 1))
        start = time.monotonic()
        try:
            build = subprocess.run(pip + ["--no-binary=llama-cpp-python", LLAMA_CPP_PYTHON], env=env,
                                   capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise Unavailable(f"building {LLAMA_CPP_PYTHON} took over {timeout_s:.0f} s") from None
        if build.returncode != 0:
            tail = (build.stderr or build.stdout).strip().splitlines()[-15:]
            raise Unavailable(f"pip could not build {LLAMA_CPP_PYTHON}:\n    " + "\n    ".join(tail))
        log(f"  built in {time.monotonic() - start:.0f} s")
    if not _importable(python):
        raise Unavailable(f"{LLAMA_CPP_PYTHON} installed in {venv} but `import llama_cpp` fails")
    return python


def run(python: Path, gguf: Path, prompt_ids: list[int], tokens: int, threads: int, repeats: int,
        timeout_s: float = 1800) -> dict:
    """Run the worker in the llama.cpp environment; return its JSON result (raises Unavailable on failure)."""
    job = {"gguf": str(gguf), "prompt_ids": prompt_ids, "tokens": tokens, "threads": threads, "repeats": repeats}
    proc = subprocess.run([str(python), str(WORKER)], input=json.dumps(job), capture_output=True, text=True,
                          timeout=timeout_s)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-10:]
        raise Unavailable("llama.cpp worker failed:\n    " + "\n    ".join(tail))
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":  # `python bench/_llamacpp_env.py`: install only
    print(ensure())
