"""Bare decode-step timing and agreement of the CPU fast path (engine.cpu_decode) vs the module path.

    .venv/bin/python bench/_decode_step.py CHECKPOINT|default [--threads 1] [--steps 64] [--prompt 128]

Loads the model once: the same model object, first the module path (decode_fn unset), then
with the fast path installed (its fbgemm fp16 lm_head, then again with the fp32 head). The module
path runs first, before install turns an fp32 model's projections into Fp16Linear. Prints ms/token of each (median of 3 runs of `--steps` greedy steps after
a prefill of `--prompt` tokens), max |logit| difference on the first steps, and greedy agreement.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(model, prompt: list[int], steps: int, prof=None) -> tuple[float, list[int], list[torch.Tensor]]:
    slots = torch.tensor([0])
    h = model.hidden_states(torch.tensor([prompt]), torch.arange(len(prompt))[None], slots)
    tok = int(model.lm_head(h[0, -1]).argmax())
    ids, logits = [], []
    if prof is not None:
        prof.start()
    t0 = time.perf_counter()
    for i in range(steps):
        out = model(torch.tensor([[tok]]), torch.tensor([[len(prompt) + i]]), slots, last_only=True)[0, 0]
        tok = int(out.argmax())
        ids.append(tok)
        if i < 8:
            logits.append(out.clone())
    if prof is not None:
        prof.stop()
    return (time.perf_counter() - t0) / steps, ids, logits


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("spec")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    from engine.cpu_decode import install
    from models.loader import load_model

    model = load_model(args.spec).model
    model.setup_cache(1, args.prompt + args.steps + 8)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, model.config.vocab_size, (args.prompt,), generator=gen).tolist()
    base = [run(model, prompt, args.steps) for _ in range(args.repeats)]
    t0 = time.perf_counter()
    dec = install(model)
    install_s = time.perf_counter() - t0
    fast = [run(model, prompt, args.steps) for _ in range(args.repeats)]
    packed, dec.lm_fp16 = dec.lm_fp16, None  # the same step with the fp32 lm_head (its fallback path)
    fast32 = [run(model, prompt, args.steps) for _ in range(args.repeats)]
    dec.lm_fp16 = packed
    mb, mf = statistics.median(r[0] for r in base), statistics.median(r[0] for r in fast)
    m32 = statistics.median(r[0] for r in fast32)
    diff = max(float((a - b).abs().max()) for a, b in zip(base[0][2], fast[0][2]))
    same = sum(a == b for a, b in zip(base[0][1], fast[0][1]))

    print(f"{args.spec}: module path {mb * 1e3:.1f} ms/token ({1 / mb:.1f} tok/s), fast path {mf * 1e3:.1f} ms/token "
          f"({1 / mf:.1f} tok/s, lm_head {dec.lm_head_path}, unquantized projections {dec.dense_path}), "
          f"with the fp32 lm_head instead {m32 * 1e3:.1f} ms/token, "
          f"install {install_s:.2f} s; max |dlogit| first 8 steps {diff:.2e}; greedy "
          f"{same}/{args.steps} equal; threads {args.threads}; load {os.getloadavg()[0]:.2f}")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
        n = 16
        run(model, prompt, n, prof)
        ev = prof.key_averages(group_by_input_shape=not os.environ.get("BYNAME"))
        print(f"ops per token {sum(e.count for e in ev) / n:.0f}, self ms per token "
              f"{sum(e.self_cpu_time_total for e in ev) / 1e3 / n:.1f}")
        for e in sorted(ev, key=lambda e: e.self_cpu_time_total, reverse=True)[:25]:
            print(f"{e.self_cpu_time_total / 1e3 / n:7.2f} ms {e.count / n:6.0f} calls  {e.key:40s} {str(e.input_shapes)[:70]}")


if __name__ == "__main__":
    main()
