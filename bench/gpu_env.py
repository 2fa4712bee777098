"""Environment report for a GPU session (bench/gpu_session.sh step 1): GPU, driver, torch/triton/ptxas
versions, which of the project's Python packages are present or missing.  Prints text; --json FILE also
writes it as JSON.  Imports only the standard library and torch (triton if present)."""
from __future__ import annotations

import argparse
import importlib.metadata as md
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys

# import name -> distribution name: pyproject's dependencies and test extras, and what the GPU scripts use
PACKAGES = {
    "torch": "torch", "triton": "triton", "numpy": "numpy", "safetensors": "safetensors",
    "transformers": "transformers", "tokenizers": "tokenizers", "accelerate": "accelerate", "gguf": "gguf",
    "fastapi": "fastapi", "uvicorn": "uvicorn", "pydantic": "pydantic", "prometheus_client": "prometheus-client",
    "httpx": "httpx", "tqdm": "tqdm", "rich": "rich", "jinja2": "jinja2", "matplotlib": "matplotlib",
    "pytest": "pytest", "pytest_timeout": "pytest-timeout", "xdist": "pytest-xdist", "openai": "openai",
    "schemathesis": "schemathesis", "sentencepiece": "sentencepiece", "tiktoken": "tiktoken",
}


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as e:  # noqa: BLE001 - a report, never fatal
        return f"({cmd[0]} failed: {type(e).__name__}: {e})"


def report() -> dict:
    out: dict = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
                 "env": {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "TRITON_CACHE_DIR", "CUDA_VISIBLE_DEVICES",
                                                        "FBSERVE_KERNEL_PATH", "FBSERVE_KERNEL_FALLBACK")}}
    out["nvidia_smi"] = _run(["nvidia-smi"]) if shutil.which("nvidia-smi") else "(nvidia-smi not found)"
    out["nvidia_smi_query"] = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,"
                                    "clocks.max.sm,clocks.mem,power.limit,temperature.gpu", "--format=csv"]) \
        if shutil.which("nvidia-smi") else ""
    import torch
    out["torch"] = torch.__version__
    out["torch_cuda"] = torch.version.cuda
    out["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                      "memory_GiB": round(p.total_memory / 2**30, 1),
                      "l2_MB": round(getattr(p, "L2_cache_size", 0) / 1e6, 1), "count": torch.cuda.device_count()}
    try:
        import triton
        out["triton"] = triton.__version__
        from triton.backends.nvidia import compiler as nvc  # ptxas Triton uses
        try:
            out["ptxas"] = nvc.get_ptxas_version() if hasattr(nvc, "get_ptxas_version") else None
        except Exception as e:  # noqa: BLE001
            out["ptxas"] = f"({type(e).__name__}: {e})"
    except Exception as e:  # noqa: BLE001
        out["triton"] = f"(import failed: {type(e).__name__}: {e})"
    present, missing = {}, []
    for mod, dist in PACKAGES.items():
        try:
            found = importlib.util.find_spec(mod) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(dist)
            continue
        try:
            present[dist] = md.version(dist)
        except md.PackageNotFoundError:
            present[dist] = "?"
    out["packages"], out["missing"] = present, missing
    out["nvcc"] = _run(["nvcc", "--version"]).splitlines()[-1:] if shutil.which("nvcc") else None
    out["cpus"] = os.cpu_count()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="also write the report as JSON here")
    args = ap.parse_args(argv)
    r = report()
    print(r["nvidia_smi"])
    print(r["nvidia_smi_query"])
    for k in ("python", "executable", "platform", "torch", "torch_cuda", "cuda_available", "gpu", "triton", "ptxas",
              "nvcc", "cpus", "env"):
        print(f"{k}: {r.get(k)}")
    print("packages present: " + ", ".join(f"{k} {v}" for k, v in sorted(r["packages"].items())))
    print("packages MISSING: " + (", ".join(r["missing"]) or "none"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
