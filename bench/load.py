"""Aggregate decode throughput under concurrency: 1, 4, 8, 16 simultaneous streams vs one.

Against a running server (`--url http://127.0.0.1:8000`, streaming /v1/completions), or, by default, an
in-process engine (`--model default`, `--max-batch 16`) driven through the same `generate()` API the
server uses. Each stream asks for `--max-tokens` tokens with EOS ignored, so every run does the same
work; the first request of each level is not excluded (prefill is part of serving).

    .venv/bin/python bench/load.py                     # in-process engine, default model, CPU
    .venv/bin/python bench/load.py --url http://127.0.0.1:8000 --api-key KEY

Prints a markdown table: streams, wall seconds, tokens, aggregate tok/s, per-stream tok/s, speedup vs 1.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import engine  # noqa: E402,F401  # before torch: sets OpenMP's wait policy
from bench._host import load_line  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper:"


async def _engine_stream(eng, i: int, max_tokens: int, top_p: float) -> int:
    from engine.types import GenerationRequest, SamplingParams

    ids = eng.tokenizer.encode(f"{PROMPT} ({i})")
    params = SamplingParams(max_tokens=max_tokens, temperature=0.8, top_p=top_p, seed=i, ignore_eos=True)
    n = 0
    async for out in eng.generate(GenerationRequest(f"load-{i}", ids, params)):
        n += len(out.token_ids)
    return n


async def _http_stream(client, i: int, max_tokens: int, top_p: float) -> int:
    body = {"prompt": f"{PROMPT} ({i})", "max_tokens": max_tokens, "temperature": 0.8, "top_p": top_p, "seed": i,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    tokens = 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                usage = json.loads(line[6:]).get("usage")
                if usage:
                    tokens = usage["completion_tokens"]
    return tokens


async def run_level(streams: int, max_tokens: int, eng=None, client=None, top_p: float = 1.0) -> tuple[float, int]:
    start = time.monotonic()
    if eng is not None:
        counts = await asyncio.gather(*(_engine_stream(eng, i, max_tokens, top_p) for i in range(streams)))
    else:
        counts = await asyncio.gather(*(_http_stream(client, i, max_tokens, top_p) for i in range(streams)))
    return time.monotonic() - start, sum(counts)


async def bench(args: argparse.Namespace) -> list[tuple[int, float, int]]:
    eng = client = None
    if args.url:
        import httpx

        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        client = httpx.AsyncClient(base_url=args.url, timeout=600, headers=headers,
                                   limits=httpx.Limits(max_connections=64))
    else:
        from engine.engine import Engine
        from models.loader import load_model

        eng = Engine(load_model(args.model, args.device), max_batch=args.max_batch, max_seq_len=args.max_seq_len)
        eng.start()
    try:
        await run_level(1, 2, eng, client)  # warm-up
        rows = []
        for streams in args.streams:
            wall, tokens = await run_level(streams, args.max_tokens, eng, client, args.top_p)
            rows.append((streams, wall, tokens))
            print(f"# {streams} streams: {tokens} tokens in {wall:.1f} s", file=sys.stderr, flush=True)
        return rows
    finally:
        if client is not None:
            await client.aclose()
        if eng is not None:
            eng.shutdown()


def table(rows: list[tuple[int, float, int]]) -> str:
    base = rows[0][2] / rows[0][1]
    lines = ["| streams | wall s | tokens | aggregate tok/s | per-stream tok/s | speedup vs 1 |",
             "|---:|---:|---:|---:|---:|---:|"]
    for streams, wall, tokens in rows:
        agg = tokens / wall
        lines.append(f"| {streams} | {wall:.1f} | {tokens} | {agg:.1f} | {agg / streams:.1f} | {agg / base:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="a running fbserve (default: an in-process engine)")
    p.add_argument("--api-key")
    p.add_argument("--model", default="default")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling of every stream (temperature 0.8)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8, 16])
    args = p.parse_args()
    load_before = os.getloadavg()
    rows = asyncio.run(bench(args))
    print(f"model {args.model}, temperature 0.8, top_p {args.top_p}, {args.max_tokens} tokens per stream")
    print(table(rows))
    print(f"\n{load_line(load_before)}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")


if __name__ == "__main__":
    main()
