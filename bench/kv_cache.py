"""The KV cache's dtype on a CPU: memory, decode speed by context length, and what it does to the logits.

One process, one model, each cache dtype in turn (fp32, fp16, bf16; `--dtypes`), through the engine's own
decode step (on a CPU with fbserve's kernel: every layer in one call, attention reading the cache in its dtype):

- memory: bytes of the KV cache `fbserve serve` allocates (`--max-batch` slots of `--max-seq-len` tokens);
- speed: ms per batch-1 decode step at each of `--lengths` cached tokens (median of `--steps`), after a
  prefill of WikiText-2 test text, with the engine's decode threads;
- quality: `--windows` windows of WikiText-2 test text, each a `--prefill`-token prompt then `--teacher`
  teacher-forced decode steps (the true next token fed at each step, as serving a long context would
  read the cache): perplexity of those tokens, and against the fp32 cache the mean and max KL, the largest
  logit change and how often the top token agrees.

    .venv/bin/python bench/kv_cache.py --model default-fbquant        # the `make serve` preset
    .venv/bin/python bench/kv_cache.py --model default --lengths 256,1024

Prints markdown tables; fails clearly without the evaluation text.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import engine  # noqa: E402,F401  # before torch: sets OpenMP's wait policy


def test_tokens(tokenizer, count: int) -> list[int]:
    """The first `count` tokens of the WikiText-2 test set (fails clearly if it is missing)."""
    from quant.calibration import data_dir

    path = data_dir() / "wikitext-2-raw" / "wiki.test.raw"
    if not path.is_file():
        raise SystemExit(f"evaluation text not found: {path} (set FBSERVE_DATA to the folder holding wikitext-2-raw/)")
    ids = tokenizer.encode(path.read_text(encoding="utf-8")[: count * 8], add_special_tokens=False)
    if len(ids) < count:
        raise SystemExit(f"the test text has {len(ids)} tokens, {count} needed")
    return ids[:count]


def teacher_forced(model, ids: list[int], prefill: int, threads: dict[str, int]):
    """Log-probabilities (T, V) of the decode steps feeding ids[prefill:-1] one at a time after a prefill."""
    import torch

    slot = torch.tensor([0])
    torch.set_num_threads(threads["prefill"])
    model(torch.tensor([ids[:prefill]]), torch.arange(prefill)[None], slot, last_only=True)
    torch.set_num_threads(threads["decode"])
    out = []
    for p in range(prefill, len(ids) - 1):
        logits = model(torch.tensor([[ids[p]]]), torch.tensor([[p]]), slot, last_only=True)[0, 0]
        out.append(torch.log_softmax(logits.float(), -1))
    return torch.stack(out)


def step_ms(model, ids: list[int], lengths: list[int], steps: int, threads: dict[str, int]) -> dict[int, float]:
    """Median ms of one batch-1 decode step with `L` tokens cached, for each L (after one prefill of max L)."""
    import torch

    slot = torch.tensor([0])
    top = max(lengths)
    torch.set_num_threads(threads["prefill"])
    model(torch.tensor([ids[:top]]), torch.arange(top)[None], slot, last_only=True)
    torch.set_num_threads(threads["decode"])
    out = {}
    for length in lengths:
        token, pos = torch.tensor([[ids[length]]]), torch.tensor([[length]])
        for _ in range(3):  # warm-up
            model(token, pos, slot, last_only=True)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            model(token, pos, slot, last_only=True)
            times.append(time.perf_counter() - start)
        out[length] = statistics.median(times) * 1e3
    return out


def quality_table(quality: dict, ids: list[int], args: argparse.Namespace, dtypes: list[str]) -> str:
    """Perplexity of the teacher-forced tokens per cache dtype, and KL / logit change / top-1 against the first."""
    import torch

    window, base = args.prefill + args.teacher + 1, dtypes[0]
    lines = [f"| KV cache | perplexity ({args.windows} x {args.teacher} decode steps after {args.prefill} tokens) | "
             f"mean KL to {base} | max KL | max centred-logit change | top-1 equal |", "|---|---:|---:|---:|---:|---:|"]
    for name in dtypes:
        nll, kl, kl_max, dlogit, same, count = 0.0, 0.0, 0.0, 0.0, 0, 0
        for w, (lp, ref) in enumerate(zip(quality[name], quality[base])):
            targets = torch.tensor(ids[w * window + args.prefill + 1:(w + 1) * window])
            nll += float(-lp.gather(1, targets[:, None]).sum())
            per = (ref.exp() * (ref - lp)).sum(-1)
            kl, kl_max = kl + float(per.sum()), max(kl_max, float(per.max()))
            centred = (lp - lp.mean(-1, keepdim=True)) - (ref - ref.mean(-1, keepdim=True))
            dlogit = max(dlogit, float(centred.abs().max()))
            same, count = same + int((lp.argmax(-1) == ref.argmax(-1)).sum()), count + len(targets)
        lines.append(f"| {name} | {torch.tensor(nll / count).exp():.3f} | {kl / count:.2e} | {kl_max:.2e} | "
                     f"{dlogit:.3f} | {same}/{count} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default-fbquant")
    p.add_argument("--dtypes", default="float32,float16,bfloat16")
    p.add_argument("--max-batch", type=int, default=8, help="slots of the serving cache (memory row)")
    p.add_argument("--max-seq-len", type=int, default=2048, help="tokens per slot (memory row)")
    p.add_argument("--lengths", default="128,512,1024,2000", help="cached tokens at which decode steps are timed")
    p.add_argument("--steps", type=int, default=30, help="timed decode steps per length")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--prefill", type=int, default=1024)
    p.add_argument("--teacher", type=int, default=256, help="teacher-forced decode steps per window")
    args = p.parse_args()

    import torch

    from engine.engine import Engine
    from models.llama import KV_CACHE_DTYPES
    from models.loader import load_model

    torch.set_grad_enabled(False)
    load_before = os.getloadavg()
    dtypes = args.dtypes.split(",")
    lengths = [int(x) for x in args.lengths.split(",")]
    eng = Engine(load_model(args.model, "cpu"), max_batch=1, max_seq_len=args.max_seq_len)
    model, threads = eng.model, eng.threads
    window = args.prefill + args.teacher + 1
    ids = test_tokens(eng.tokenizer, max(window * args.windows, max(lengths) + 1))

    memory, speed, quality = {}, {}, {}
    for name in dtypes:
        dtype = KV_CACHE_DTYPES[name]
        model.setup_cache(args.max_batch, args.max_seq_len, dtype)
        memory[name] = model.kv_cache_bytes()
        model.setup_cache(1, max(window, max(lengths) + 1), dtype)
        speed[name] = step_ms(model, ids, lengths, args.steps, threads)
        quality[name] = [teacher_forced(model, ids[w * window:(w + 1) * window], args.prefill, threads)
                         for w in range(args.windows)]
        print(f"# {name}: done", file=sys.stderr, flush=True)

    print(f"| KV cache | bytes ({args.max_batch} slots x {args.max_seq_len} tokens) | "
          + " | ".join(f"ms/step at {n}" for n in lengths) + " | " + " | ".join(f"tok/s at {n}" for n in lengths) + " |")
    print("|---|---:|" + "---:|" * (2 * len(lengths)))
    for name in dtypes:
        ms = speed[name]
        print(f"| {name} | {memory[name] / 2**20:.0f} MiB | " + " | ".join(f"{ms[n]:.2f}" for n in lengths) + " | "
              + " | ".join(f"{1e3 / ms[n]:.1f}" for n in lengths) + " |")
    if args.windows:
        print("\n" + quality_table(quality, ids, args, dtypes))
    load_after = os.getloadavg()
    print(f"\nmodel {args.model}, cpu, threads prefill {threads['prefill']} decode {threads['decode']}, decode step "
          f"{eng.cpu_decode_status().get('layers')}; load average before: {' '.join(f'{x:.2f}' for x in load_before)}; "
          f"after: {' '.join(f'{x:.2f}' for x in load_after)}; CPUs: {os.cpu_count()}")


if __name__ == "__main__":
    main()
