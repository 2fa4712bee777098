"""QDEC on a GPU: what the CPU-only sessions could not measure (run on a CUDA machine).

    python bench/qdec.py [--model llama2-7b|llama3-8b] [--bits 3] [--json OUT]

1. zero-copy gather: time of cuda_ext.qdec_kernel.qdec_correction reading k rows of a pinned host
   residual (one layer, 4096 outputs -> 2 KB rows) for k = 16..1024; effective PCIe bandwidth;
   pinned cudaMemcpy of 256 MB for comparison.
2. slowdown: one decode step's linear stack (per layer qkv, o, gate_up, down; base quant_matmul,
   3-bit g128, rank 0) alone vs with the correction of each linear on a side stream
   (cuda_ext.qdec_kernel.SideStream) at k_chunk 0/8/16/32/64/128: the % slowdown per k_chunk and the
   knee (the first k_chunk whose slowdown exceeds 2.5 %), next to the paper's estimate
   1024 * PCIe BW / GPU mem BW * bits / 4.
Times: CUDA events, median of 50 repetitions after 10 warm-ups.  Nothing is estimated: on a machine
without CUDA it exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

SHAPES = {  # per decoder layer: (name, N out, K in); 32 layers
    "llama2-7b": [("qkv", 3 * 4096, 4096), ("o", 4096, 4096), ("gate_up", 2 * 11008, 4096), ("down", 4096, 11008)],
    "llama3-8b": [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 2 * 14336, 4096), ("down", 4096, 14336)],
}


def cuda_time(fn, reps: int = 50, warm: int = 10) -> float:
    """Median seconds of fn() (CUDA events)."""
    from cuda_ext.testing import cuda_median_ms

    return cuda_median_ms(fn, reps, warm) / 1e3


def gather_table(n: int = 4096, k_in: int = 11008) -> list[dict]:
    from cuda_ext.qdec_kernel import qdec_correction

    rc = torch.randint(0, 256, (k_in, n // 2), dtype=torch.uint8).pin_memory()
    rs = (torch.rand(n) * 0.01).half().cuda()
    x = torch.randn(1, k_in, device="cuda", dtype=torch.float16)
    rows = []
    for k in (16, 64, 256, 1024):
        idx = torch.randperm(k_in, device="cuda")[:k][None]
        t = cuda_time(lambda: qdec_correction(x, idx, rc, rs))
        rows.append({"rows": k, "row_bytes": n // 2, "us": t * 1e6, "GB_s": k * n / 2 / t / 1e9})
    host = torch.empty(256 << 20, dtype=torch.uint8).pin_memory()
    dev = torch.empty_like(host, device="cuda")
    t = cuda_time(lambda: dev.copy_(host, non_blocking=True), reps=10, warm=2)
    rows.append({"rows": "memcpy 256 MB", "row_bytes": None, "us": t * 1e6, "GB_s": host.numel() / t / 1e9})
    return rows


def slowdown_table(model: str, bits: int, layers: int = 32) -> dict:
    from cuda_ext import quant_matmul
    from cuda_ext.qdec_kernel import SideStream
    from cuda_ext.qdec_reference import exact_topk
    from cuda_ext.testing import random_packed

    stack = []
    for _ in range(layers):
        for name, n, k in SHAPES[model]:
            w = random_packed(n, k, bits, 128)
            rc = torch.randint(0, 256, (k, (n + 1) // 2), dtype=torch.uint8).pin_memory()
            stack.append((w, rc, (torch.rand(n) * 0.01).half().cuda(), torch.randn(1, k, device="cuda").half()))
    side = SideStream(torch.device("cuda"))

    def step(k_chunk: int):
        for w, rc, rs, x in stack:
            if k_chunk:
                idx = exact_topk(x, k_chunk)  # selection cost included (torch topk, not the fused select)
                acc = side.launch(x, idx, rc, rs)
            y = quant_matmul(x, w)
            if k_chunk:
                y += side.join(acc).to(y.dtype)

    base = cuda_time(lambda: step(0), reps=20, warm=3)
    out = {"model": model, "bits": bits, "base_ms": base * 1e3, "k_chunk": {}}
    for kc in (8, 16, 32, 64, 128):
        t = cuda_time(lambda: step(kc), reps=20, warm=3)
        out["k_chunk"][kc] = {"ms": t * 1e3, "slowdown_pct": 100 * (t / base - 1)}
    over = [kc for kc, v in out["k_chunk"].items() if v["slowdown_pct"] > 2.5]
    out["knee_k_chunk_2.5pct"] = over[0] if over else None
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(SHAPES), default="llama2-7b")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/qdec.py needs a CUDA GPU (zero-copy PCIe reads, side-stream overlap); nothing measured",
              file=sys.stderr)
        return 2
    res = {"device": torch.cuda.get_device_name(), "gather": gather_table(),
           "slowdown": slowdown_table(args.model, args.bits)}
    print("| rows | us | GB/s |\n|---|---|---|")
    for r in res["gather"]:
        print(f"| {r['rows']} | {r['us']:.1f} | {r['GB_s']:.1f} |")
    s = res["slowdown"]
    print(f"\nbase linear stack {s['base_ms']:.3f} ms ({s['model']}, {s['bits']}-bit)")
    print("| k_chunk | ms | slowdown |\n|---|---|---|")
    for kc, v in s["k_chunk"].items():
        print(f"| {kc} | {v['ms']:.3f} | {v['slowdown_pct']:.1f}% |")
    print(f"knee (first k_chunk > 2.5%): {s['knee_k_chunk_2.5pct']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
