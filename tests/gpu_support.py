"""What the GPU test files share: whether CUDA is there, the CPU dry run, and the module-level skip marks.

Imported before anything imports triton: without CUDA it sets TRITON_INTERPRET (see cuda_ext/README.md).
"""
from __future__ import annotations

import json
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
DRY = not CUDA and os.environ.get("FBSERVE_GPU_DRYRUN", "0") == "1"
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
DEV = "cuda" if CUDA else "cpu"
GPU_MARKS = [pytest.mark.gpu, pytest.mark.skipif(
    not (CUDA or DRY), reason="needs a CUDA GPU (torch.cuda.is_available() is False); run on a lent GPU by "
    "`bash bench/gpu_session.sh`, or FBSERVE_GPU_DRYRUN=1 for a CPU-interpreter subset")]


def cuda_only_mark(why: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(not CUDA, reason=f"CUDA only ({why})")

DNAME = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def record(check: str, **fields) -> None:
    """Append one JSON line to $FBSERVE_GPU_RECORD (read by bench/gpu_summary.py); dtypes by short name."""
    path = os.environ.get("FBSERVE_GPU_RECORD")
    if path:
        fields = {k: (DNAME.get(v, str(v)) if isinstance(v, torch.dtype) else v) for k, v in fields.items()}
        with open(path, "a") as f:
            f.write(json.dumps({"check": check, "device": DEV, **fields}) + "\n")
