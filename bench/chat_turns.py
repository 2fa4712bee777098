"""Time to first token of each turn of a chat, prefix caching on vs off, in one process and one run.

A conversation about a WikiText-2 test article (the system prompt holds its first `--doc-tokens` tokens):
`--turns` user questions, each answered greedily with up to `--max-tokens` tokens by an engine with prefix
caching on; `--chats N` interleaves N such conversations (same system prompt, other questions). Every turn's prompt (the whole history, rendered by the chat template) is then sent to a second
engine with it off (`--prefix-caching off`), which prefills all of it. Both engines load the same model
and run one after the other, never at once.

    .venv/bin/python bench/chat_turns.py                          # embedded model, unquantized
    .venv/bin/python bench/chat_turns.py --model default-fbquant  # the `make serve` preset
    .venv/bin/python bench/chat_turns.py --model default-fbquant --prefill-cost 600,1500

Prints a markdown table: turn, prompt tokens, tokens reused, TTFT with and without reuse, ratio. Then
`--choices N` concurrent requests with the whole chat as one prompt (as `n = N` runs them) on each engine, from
a slot that holds none of it: the time until every one has its first token, and the tokens reused.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import engine  # noqa: E402,F401  # before torch: sets OpenMP's wait policy
from bench._host import load_line  # noqa: E402

QUESTIONS = [
    "What is this text about? Answer in one sentence.",
    "Who or what is mentioned first?",
    "Give one date or number from the text.",
    "Summarise the second half in two sentences.",
    "What might a reader ask next about this subject?",
    "Write a title for the text.",
]


def article(doc_tokens: int, tokenizer) -> str:
    """The start of the WikiText-2 test set, cut to about `doc_tokens` tokens (fails clearly if missing)."""
    from quant.calibration import data_dir

    path = data_dir() / "wikitext-2-raw" / "wiki.test.raw"
    if not path.is_file():
        raise SystemExit(f"evaluation text not found: {path} (set FBSERVE_DATA to the folder holding wikitext-2-raw/)")
    ids = tokenizer.encode(path.read_text(encoding="utf-8")[: doc_tokens * 8], add_special_tokens=False)
    return tokenizer.decode(ids[:doc_tokens]).strip()


def prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if not isinstance(out, list) else out)


async def timed(eng, rid: str, ids: list[int], max_tokens: int) -> tuple[float, int, str]:
    """(seconds to the first event, prompt tokens reused, text) of one greedy request."""
    from engine.types import GenerationRequest, SamplingParams

    start, ttft, cached, text = time.perf_counter(), None, 0, ""
    async for out in eng.generate(GenerationRequest(rid, ids, SamplingParams(max_tokens=max_tokens, temperature=0.0))):
        if ttft is None:
            ttft, cached = time.perf_counter() - start, out.cached_tokens
        text += out.text
    return ttft, cached, text


async def concurrent(eng, tag: str, ids: list[int], n: int) -> tuple[float, int]:
    """(seconds until all n requests with the same prompt have a first token, prompt tokens they reused)."""
    start = time.perf_counter()
    results = await asyncio.gather(*(timed(eng, f"{tag}-{i}", ids, 1) for i in range(n)))
    return time.perf_counter() - start, sum(cached for _, cached, _ in results)


def run(args: argparse.Namespace) -> tuple[list[tuple[int, int, int, int, float, float]], str]:
    from engine.engine import Engine
    from models.loader import load_model

    with_cache = Engine(load_model(args.model, args.device), max_batch=args.max_batch, max_seq_len=args.max_seq_len)
    without = Engine(load_model(args.model, args.device), max_batch=args.max_batch, max_seq_len=args.max_seq_len,
                     prefix_caching=False)
    for eng in (with_cache, without):
        eng.start()
    tok = with_cache.tokenizer
    system = {"role": "system", "content": "Answer questions about this text.\n\n" + article(args.doc_tokens, tok)}
    chats = [[system] for _ in range(args.chats)]  # every chat about the same text, turns interleaved
    rows = []
    try:
        for eng in (with_cache, without):  # warm-up: first calls allocate and pick kernels
            asyncio.run(timed(eng, "warm", prompt_ids(tok, [{"role": "user", "content": "Hi"}]), 2))
        for turn in range(1, args.turns + 1):
            for c, messages in enumerate(chats, 1):
                messages.append({"role": "user", "content": QUESTIONS[(turn - 1 + c - 1) % len(QUESTIONS)]})
                ids = prompt_ids(tok, messages)
                ttft_on, cached, reply = asyncio.run(timed(with_cache, f"on-{c}-{turn}", ids, args.max_tokens))
                ttft_off, _, _ = asyncio.run(timed(without, f"off-{c}-{turn}", ids, 1))
                messages.append({"role": "assistant", "content": reply})
                rows.append((turn, c, len(ids), cached, ttft_on, ttft_off))
                print(f"# turn {turn} chat {c}: {len(ids)} prompt tokens, {cached} reused, TTFT {ttft_on * 1e3:.0f} "
                      f"ms with reuse, {ttft_off * 1e3:.0f} ms without", file=sys.stderr, flush=True)
        messages = chats[0]
        # The whole chat and one more question, behind a first token no slot holds: nothing comes from the turns.
        fresh = [tok.eos_token_id] + prompt_ids(tok, messages + [{"role": "user", "content": "Summarise it all."}])
        (on, hit), (off, _) = (asyncio.run(concurrent(eng, name, fresh, args.choices))
                               for eng, name in ((with_cache, "n-on"), (without, "n-off")))
        summary = (f"{args.choices} concurrent requests, one {len(fresh)}-token prompt: all first tokens after "
                   f"{on * 1e3:.0f} ms with reuse ({hit} prompt tokens reused) vs {off * 1e3:.0f} ms without "
                   f"({off / on:.2f}x)")
    finally:
        for eng in (with_cache, without):
            eng.shutdown()
    return rows, summary


def prefill_cost(model_name: str, device: str, lengths: list[int], repeats: int = 3) -> str:
    """Prefill ms of a T-token prompt into a slot already holding its first R tokens, for R from 0 to T/2:
    where reusing a short prefix costs more (attention with an explicit mask) than it saves."""
    import torch

    from models.loader import load_model

    torch.set_grad_enabled(False)
    model = load_model(model_name, device).model
    model.setup_cache(1, max(lengths))
    slot = torch.tensor([0], device=device)
    lines = ["| T | R | prefill ms (best of %d) |" % repeats, "|---:|---:|---:|"]
    for t in lengths:
        ids = torch.randint(0, model.config.vocab_size, (1, t), generator=torch.Generator().manual_seed(t)).to(device)
        model.hidden_states(ids, torch.arange(t, device=device)[None], slot)  # warm-up; fills the slot
        for r in (0, 4, 32, 128, t // 4, t // 2):
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                model.hidden_states(ids[:, r:], torch.arange(r, t, device=device)[None], slot)
                best = min(best, time.perf_counter() - start)
            lines.append(f"| {t} | {r} | {best * 1e3:.0f} |")
    return "\n".join(lines)


def table(rows: list[tuple[int, int, int, int, float, float]]) -> str:
    lines = ["| turn | chat | prompt tokens | reused | TTFT with reuse ms | TTFT without ms | without / with |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for turn, chat, n, cached, on, off in rows:
        lines.append(f"| {turn} | {chat} | {n} | {cached} | {on * 1e3:.0f} | {off * 1e3:.0f} | {off / on:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-batch", type=int, default=2)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--doc-tokens", type=int, default=600)
    p.add_argument("--turns", type=int, default=len(QUESTIONS), choices=range(1, len(QUESTIONS) + 1))
    p.add_argument("--chats", type=int, default=1, help="conversations about the same text, turns interleaved "
                   "(each keeps its slot's history while there are --max-batch slots)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--choices", type=int, default=2, help="concurrent requests with one prompt (<= --max-batch)")
    p.add_argument("--prefill-cost", metavar="T1,T2", help="instead: prefill ms of T-token prompts with R reused")
    args = p.parse_args()
    load_before = os.getloadavg()
    if args.prefill_cost:
        print(prefill_cost(args.model, args.device, [int(t) for t in args.prefill_cost.split(",")]))
    else:
        rows, summary = run(args)
        print(table(rows))
        print(f"\n{summary}")
    print(f"\nmodel {args.model}, {args.device}; {load_line(load_before)}")


if __name__ == "__main__":
    main()
