"""The KV cache's dtype on a CPU: memory, decode speed by context length, and what it does to the logits.

One process, one model, each cache dtype in turn (fp32, fp16, bf16; `--dtypes`), through the engine's own
decode step (on a CPU with fbserve's kernel: every layer in one call, attention reading the cache in its dtype):

- memory: bytes of the KV cache `fbserve serve` allocates (`--max-batch` slots of `--max-seq-len` tokens);
- speed: ms per batch-1 decode step at each of `--lengths` cached tokens, after a prefill of WikiText-2 test
  text, with the engine's decode threads: the dtypes timed in turn, `--rounds` times, the median of all steps;
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
from bench._host import load_line  # noqa: E402


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


def use_cache(model, caches: list) -> None:
    """Put one KVCache per layer in place (the one-call step rebinds to new cache tensors by itself)."""
    for layer, cache in zip(model.model.layers, caches):
        layer.self_attn.kv_cache = cache


def step_ms(model, ids: list[int], lengths: list[int], dtypes: list[str], steps: int, rounds: int,
            threads: dict[str, int]) -> dict[tuple[str, int], float]:
    """Median ms of one batch-1 decode step with L tokens cached, per (dtype, L): one cache per dtype, each
    prefilled once with max L tokens; then per L, `rounds` rounds that time `steps` steps of every dtype in
    turn (interleaved, so the host's slow spells fall on every dtype alike); the median of all of them."""
    import torch

    from models.llama import KV_CACHE_DTYPES

    slot, top = torch.tensor([0]), max(lengths)
    caches = {}
    for name in dtypes:
        model.setup_cache(1, top + 1, KV_CACHE_DTYPES[name])
        caches[name] = [layer.self_attn.kv_cache for layer in model.model.layers]
        torch.set_num_threads(threads["prefill"])
        model(torch.tensor([ids[:top]]), torch.arange(top)[None], slot, last_only=True)
    torch.set_num_threads(threads["decode"])
    times: dict[tuple[str, int], list[float]] = {(name, n): [] for name in dtypes for n in lengths}
    for length in lengths:
        token, pos = torch.tensor([[ids[length]]]), torch.tensor([[length]])
        for _ in range(rounds):
            for name in dtypes:
                use_cache(model, caches[name])
                for _ in range(3):  # warm-up
                    model(token, pos, slot, last_only=True)
                for _ in range(steps):
                    start = time.perf_counter()
                    model(token, pos, slot, last_only=True)
                    times[name, length].append(time.perf_counter() - start)
    return {key: statistics.median(t) * 1e3 for key, t in times.items()}


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
    p.add_argument("--steps", type=int, default=20, help="timed decode steps per length, dtype and round")
    p.add_argument("--rounds", type=int, default=5, help="rounds over the dtypes per length")
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

    memory, quality = {}, {}
    for name in dtypes:
        model.setup_cache(args.max_batch, args.max_seq_len, KV_CACHE_DTYPES[name])
        memory[name] = model.kv_cache_bytes()
        model.setup_cache(1, window, KV_CACHE_DTYPES[name])
        quality[name] = [teacher_forced(model, ids[w * window:(w + 1) * window], args.prefill, threads)
                         for w in range(args.windows)]
    speed = step_ms(model, ids, lengths, dtypes, args.steps, args.rounds, threads)

    print(f"| KV cache | bytes ({args.max_batch} slots x {args.max_seq_len} tokens) | "
          + " | ".join(f"ms/step at {n}" for n in lengths) + " | " + " | ".join(f"tok/s at {n}" for n in lengths) + " |")
    print("|---|---:|" + "---:|" * (2 * len(lengths)))
    for name in dtypes:
        ms = [speed[name, n] for n in lengths]
        print(f"| {name} | {memory[name] / 2**20:.0f} MiB | " + " | ".join(f"{t:.2f}" for t in ms) + " | "
              + " | ".join(f"{1e3 / t:.1f}" for t in ms) + " |")
    if args.windows:
        print("\n" + quality_table(quality, ids, args, dtypes))
    print(f"\nmodel {args.model}, cpu, threads prefill {threads['prefill']} decode {threads['decode']}, decode step "
          f"{eng.cpu_decode_status().get('layers')}; {load_line(load_before)}")


if __name__ == "__main__":
    main()
