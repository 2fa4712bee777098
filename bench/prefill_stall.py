"""How long a long prompt stalls a running stream, prefilled whole vs in chunks (`--prefill-chunk`).

One engine with 3 slots, prefix caching off (every prompt is prefilled in full). A stream decodes greedily
from a short prompt; after its 10th token a second request arrives with a long prompt (the start of the
WikiText-2 test set, `--prompt-tokens`), and 0.1 s later a short one. Per chunk size (0 = the whole prompt in one call),
rounds interleaved: the long request's time to first token, the longest gap between the stream's tokens
while that prompt was prefilled, how many tokens the stream got meanwhile, the short request's time to first
token, and the long prompt's time to first token alone.

    .venv/bin/python bench/prefill_stall.py                                   # the `make serve` preset
    .venv/bin/python bench/prefill_stall.py --model default --chunks 0,256,128 --rounds 3

Prints a markdown table (medians over rounds) and the host's load.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import engine  # noqa: E402,F401  # before torch: sets OpenMP's wait policy
from bench._host import load_line  # noqa: E402
from bench.chat_turns import article  # noqa: E402

STREAM_PROMPT = "Write a long story about a lighthouse keeper:"
SHORT_PROMPT = "Name a colour."
SHORT_AFTER_S = 0.1  # a short request arrives this long after the long prompt


async def alone(eng, long_ids: list[int], chunk: int, tag: str) -> float:
    """The long prompt's TTFT in ms with nothing else running."""
    from engine.types import GenerationRequest, SamplingParams

    eng.prefill_chunk = chunk or len(long_ids)
    sent = time.perf_counter()
    async for _ in eng.generate(GenerationRequest(f"alone-{tag}", long_ids, SamplingParams(max_tokens=1))):
        break
    return (time.perf_counter() - sent) * 1e3


async def one_round(eng, long_ids: list[int], chunk: int, tag: str) -> dict[str, float]:
    """Stream + long prompt once with eng.prefill_chunk = chunk (0: whole): TTFT, max gap, tokens meanwhile;
    then the long prompt alone."""
    from engine.types import GenerationRequest, SamplingParams

    eng.prefill_chunk = chunk or len(long_ids)
    stamps: list[float] = []
    tenth = asyncio.Event()
    done = asyncio.Event()

    async def stream() -> None:
        ids = eng.tokenizer.encode(STREAM_PROMPT)
        params = SamplingParams(max_tokens=eng.max_seq_len - len(ids), temperature=0.0, ignore_eos=True)
        agen = eng.generate(GenerationRequest(f"stream-{tag}", ids, params))
        try:
            async for _ in agen:
                stamps.append(time.perf_counter())
                if len(stamps) == 10:
                    tenth.set()
                if done.is_set():
                    return
        finally:
            await agen.aclose()

    async def first_token(rid: str, ids: list[int]) -> float:
        async for _ in eng.generate(GenerationRequest(rid, ids, SamplingParams(max_tokens=1))):
            break
        return time.perf_counter()

    task = asyncio.create_task(stream())
    await tenth.wait()
    sent = time.perf_counter()
    long_task = asyncio.create_task(first_token(f"long-{tag}", long_ids))
    await asyncio.sleep(SHORT_AFTER_S)
    short_sent = time.perf_counter()
    short_first = await first_token(f"short-{tag}", eng.tokenizer.encode(f"{SHORT_PROMPT} ({tag})"))
    first = await long_task
    done.set()
    await task
    during = [t for t in stamps if sent <= t <= first]
    edges = [sent, *during, first]
    return {"ttft_ms": (first - sent) * 1e3, "max_gap_ms": max(b - a for a, b in zip(edges, edges[1:])) * 1e3,
            "tokens": len(during), "short_ms": (short_first - short_sent) * 1e3,
            "alone_ms": await alone(eng, long_ids, chunk, tag)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default-fbquant")
    ap.add_argument("--prompt-tokens", type=int, default=1536)
    ap.add_argument("--chunks", default="0,256", help="chunk sizes in tokens, 0 = whole prompt in one call")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-seq-len", type=int, default=2048)
    args = ap.parse_args()
    chunks = [int(c) for c in args.chunks.split(",")]

    from engine.engine import Engine
    from models.loader import load_model

    load_before = os.getloadavg()
    eng = Engine(load_model(args.model), max_batch=3, max_seq_len=args.max_seq_len, prefix_caching=False)
    long_ids = eng.tokenizer.encode(article(args.prompt_tokens, eng.tokenizer), add_special_tokens=False)
    eng.start()
    try:
        results: dict[int, list[dict[str, float]]] = {c: [] for c in chunks}
        for r in range(args.rounds):
            for c in chunks if r % 2 == 0 else chunks[::-1]:  # alternate the order: drift hits each alike
                results[c].append(asyncio.run(one_round(eng, long_ids, c, f"{r}-{c}")))
    finally:
        eng.shutdown()
    print(f"\nmodel {args.model}, prompt {len(long_ids)} tokens, {args.rounds} rounds (median)\n")
    print("| prefill chunk | long prompt's TTFT ms | stream's longest gap ms | stream tokens meanwhile "
          "| short request's TTFT ms | long prompt's TTFT alone ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for c in chunks:
        med = {k: statistics.median(x[k] for x in results[c])
               for k in ("ttft_ms", "max_gap_ms", "tokens", "short_ms", "alone_ms")}
        print(f"| {c or 'whole'} | {med['ttft_ms']:.0f} | {med['max_gap_ms']:.0f} | {med['tokens']:.0f} "
              f"| {med['short_ms']:.0f} | {med['alone_ms']:.0f} |")
    print(load_line(load_before))
    return 0


if __name__ == "__main__":
    sys.exit(main())
