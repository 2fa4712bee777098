"""What a JSON schema (`response_format`) costs per generated token, through the engine on a CPU.

One engine, one chat prompt asking for a person as JSON, two schemas: with length bounds on its strings and
array (`maxLength`, `maxItems`: masks that take xgrammar longer) and without. For each, the constrained answer
is generated first (greedy, or `--temperature T` with seed 0); then, `--rounds` times, the same number of tokens with the schema and without it
(`ignore_eos`), alternating, each request timed from its first token to its last. Prints the median ms per
token of each, the difference, and the constrained answers (the bounded one must parse; the unbounded one
loops inside a string until `--max-tokens` on this 135M model).

    .venv/bin/python bench/structured_output.py --model default-fbquant    # the `make serve` preset
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import engine  # noqa: E402,F401  # before torch: sets OpenMP's wait policy
from bench._host import load_line  # noqa: E402

TEXT = {"type": "string", "maxLength": 40}  # unbounded, this 135M model repeats itself inside a string
PERSON = {"type": "object",
          "properties": {"name": TEXT, "age": {"type": "integer", "minimum": 0, "maximum": 120}, "city": TEXT,
                         "hobbies": {"type": "array", "items": TEXT, "maxItems": 4}},
          "required": ["name", "age", "city", "hobbies"]}
UNBOUNDED = {"type": "object",
             "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"},
                            "hobbies": {"type": "array", "items": {"type": "string"}}},
             "required": ["name", "age", "city", "hobbies"]}
PROMPT = "Describe a person as JSON: name, age, city, hobbies."


async def token_times(eng, ids: list[int], params) -> tuple[str, list[float]]:
    from engine.types import GenerationRequest

    text, times = "", []
    async for event in eng.generate(GenerationRequest("bench", ids, params)):
        text += event.text
        times.append(time.perf_counter())
    return text, times


def measure(eng, ids: list[int], name: str, schema: dict, args) -> tuple[str, int, list[float], list[float], str]:
    """(name, tokens, ms per token with the schema per round, without it per round, the constrained answer)."""
    from engine.types import SamplingParams, StructuredOutput

    spec = StructuredOutput("json_schema", json.dumps(schema))
    sampling = {"temperature": args.temperature, "seed": 0}
    answer, times = asyncio.run(token_times(eng, ids, SamplingParams(max_tokens=args.max_tokens, structured=spec,
                                                                     **sampling)))
    n = len(times)
    runs = {"with": SamplingParams(max_tokens=n, structured=spec, **sampling),
            "without": SamplingParams(max_tokens=n, ignore_eos=True, **sampling)}
    ms: dict[str, list[float]] = {key: [] for key in runs}
    for _ in range(args.rounds):
        for key, params in runs.items():
            _, times = asyncio.run(token_times(eng, ids, params))
            ms[key].append((times[-1] - times[0]) / (len(times) - 1) * 1e3)
    return name, n, ms["with"], ms["without"], answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default-fbquant")
    parser.add_argument("--max-tokens", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else sampled with seed 0")
    args = parser.parse_args()
    before = os.getloadavg()

    from engine.engine import Engine
    from models.loader import load_model

    eng = Engine(load_model(args.model), max_batch=1, max_seq_len=512)
    eng.start()
    try:
        ids = eng.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                                tokenize=True)
        ids = list(ids["input_ids"] if not isinstance(ids, list) else ids)
        rows = [measure(eng, ids, name, schema, args)
                for name, schema in (("bounded", PERSON), ("unbounded", UNBOUNDED))]
    finally:
        eng.shutdown()
    how = "greedy" if args.temperature == 0 else f"temperature {args.temperature}, seed 0"
    print(f"model {args.model}, {how}, {args.rounds} rounds of each schema with and without it, alternating\n")
    print("| schema | tokens | ms per token with it (median) | without | cost | rounds with / without |")
    print("|---|---:|---:|---:|---:|---|")
    for name, n, with_, without, _ in rows:
        extra = statistics.median(with_) - statistics.median(without)
        print(f"| {name} | {n} | {statistics.median(with_):.3f} | {statistics.median(without):.3f} | "
              f"{extra:+.3f} ms ({extra / statistics.median(without) * 100:+.1f}%) | "
              f"{', '.join(f'{v:.2f}' for v in with_)} / {', '.join(f'{v:.2f}' for v in without)} |")
    for name, n, _, _, answer in rows:
        try:
            json.loads(answer)
            verdict = "parses as JSON"
        except json.JSONDecodeError:
            verdict = f"cut at {n} tokens" if n == args.max_tokens else "NOT VALID JSON"
        print(f"\n{name} answer ({verdict}): {answer}")
    print(load_line(before))


if __name__ == "__main__":
    main()
