"""Prefill (prompt) time of one model on the CPU: each path of the quantized layers and of attention,
in one process, so the rows compare.

    .venv/bin/python bench/_prefill.py CHECKPOINT|default [--threads 1] [--lengths 256,512,1024,2048]
    .venv/bin/python bench/_prefill.py --layers [--lengths 128,256,512,1024,2048]   (one random 3-bit g128
        layer of each SmolLM2 shape: dequantize time, then int4 op vs dequantize + bf16 GEMM per length)

Rows: "<kernel>, masked SDPA" (the path before bf16 prefill and the causal flag: FBSERVE_CPU_BF16_PREFILL_ROWS=0
and models.llama told that no prompt starts at position 0; <kernel> is what runs calls of few rows,
fbserve-<isa> or torch-int4, see kernel_paths()), "<kernel>, causal SDPA", "bf16 GEMM, causal SDPA"
(the default). Each figure is the median of 3 prefills of WikiText-2 test tokens from an empty cache,
logits of the last position only (what serving computes), after one warm-up; max |dlogit| of each row
to the first.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _median_ms(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def layers(lengths: list[int]) -> None:
    from cuda_ext import pack, prepare_cpu
    from cuda_ext.cpu import dequantize_bf16_t

    print("| layer (N x K) | dequantize ms | " + " | ".join(f"{m} rows int4 / bf16 ms" for m in lengths) + " |")
    print("|---|---:|" + "---|" * len(lengths))
    for n, k in ((3072, 576), (576, 1536), (960, 576), (576, 576)):
        groups = -(-k // 128)
        packed = pack(torch.randint(0, 8, (n, k), dtype=torch.uint8), (torch.rand(n, groups) * 0.01 + 1e-3).half(),
                      torch.randint(0, 8, (n, groups)).half(), 3, 128)
        w = prepare_cpu(packed)
        cells = []
        for m in lengths:
            xb = torch.randn(m, k).bfloat16()
            int4 = _median_ms(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, w.weight, w.group_size,
                                                                                 w.scales_zeros))
            bf16 = _median_ms(lambda: xb @ dequantize_bf16_t(packed))
            cells.append(f"{int4:.1f} / {bf16:.1f}")
        print(f"| {n} x {k} | {_median_ms(lambda: dequantize_bf16_t(packed)):.1f} | " + " | ".join(cells) + " |",
              flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("spec", nargs="?")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lengths", default=None)
    p.add_argument("--layers", action="store_true", help="per-layer timings instead of a whole model")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    if args.layers:
        layers([int(x) for x in (args.lengths or "128,256,512,1024,2048").split(",")])
        return
    if not args.spec:
        p.error("give a model (CHECKPOINT or default), or --layers")
    import models.llama as llama
    from cuda_ext.cpu import BF16_PREFILL_ENV
    from engine.cpu_decode import install
    from engine.quant_linear import cpu_decode_kernel, cpu_prefill_path
    from models.loader import load_model
    from quant.eval import wikitext2_text

    loaded = load_model(args.spec)
    model = loaded.model
    lengths = [int(x) for x in (args.lengths or "256,512,1024,2048").split(",")]
    model.setup_cache(1, max(lengths) + 8)
    install(model)
    ids = torch.tensor(loaded.tokenizer(wikitext2_text()[:100_000])["input_ids"][:max(lengths)])[None]

    def prefill(t: int) -> torch.Tensor:
        return model(ids[:, :t], positions=torch.arange(t)[None], slots=torch.tensor([0]), last_only=True)

    never_from_start = mock.patch.object(llama.torch, "equal", lambda *a: False)  # the explicit mask
    small = cpu_decode_kernel().split(" ")[0]  # the per-call kernel: fbserve-<isa> or torch-int4
    rows = [(f"{small}, masked SDPA", "0", never_from_start), (f"{small}, causal SDPA", "0", None),
            ("bf16 GEMM, causal SDPA", None, None)]
    print(f"{args.spec}: threads {args.threads}, load {os.getloadavg()[0]:.2f}; default prefill path: {cpu_prefill_path()}")
    print("| path | " + " | ".join(f"{t} tokens ms" for t in lengths) + " | max abs dlogit vs first row |")
    print("|---|" + "---:|" * len(lengths) + "---:|")
    first: dict[int, torch.Tensor] = {}
    for name, env, patch in rows:
        old = os.environ.pop(BF16_PREFILL_ENV, None)
        if env is not None:
            os.environ[BF16_PREFILL_ENV] = env
        if patch is not None:
            patch.start()
        cells, diff = [], 0.0
        for t in lengths:
            out = prefill(t)
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                out = prefill(t)
                times.append(time.perf_counter() - t0)
            cells.append(f"{statistics.median(times) * 1e3:.0f}")
            diff = max(diff, float((out - first.setdefault(t, out)).abs().max()))
        if patch is not None:
            patch.stop()
        os.environ.pop(BF16_PREFILL_ENV, None)
        if old is not None:
            os.environ[BF16_PREFILL_ENV] = old
        print(f"| {name} | " + " | ".join(cells) + f" | {diff:.3g} |", flush=True)


if __name__ == "__main__":
    main()
