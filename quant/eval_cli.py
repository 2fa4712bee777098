"""`fbserve eval`: perplexity, KL to the unquantized model, and zero-shot accuracy of a model.

    fbserve eval --model default|DIR [--text FILE ...] [--json OUT] [--markdown OUT] [--plot OUT.png]
                 [--tasks piqa,arc_easy,...|none] [--limit N] [--ctx 2048] [--max-windows N]
                 [--reference default|DIR|none]

The JSON keys `perplexity` ({"wikitext2": float, "<file name>": float}) and `bits_per_weight` are a
public contract (the quantizer and bench/quality.py read them); `kl_divergence`, `top1_agreement`,
`tasks` and `zero_shot_mean` are kept stable too.
"""
from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch

from quant.eval import (WIKITEXT2_TEST, DataMissingError, evaluate_windows, model_summary, require_data,
                        token_windows, wikitext2_text)
from quant.eval_report import markdown_table, plot_results, write_outputs
from quant.eval_score import encode_pair, hf_encoder, loglikelihoods
from quant.tasks import HEADLINE_METRIC, TASK_NAMES, accuracy, load_task, task_files

log = logging.getLogger("fbserve.eval")


def _progress(desc: str, every_s: float = 60.0):
    """A tqdm bar on a terminal; otherwise a log line every `every_s` seconds (long runs write to files)."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        return partial(tqdm, desc=desc, file=sys.stderr, leave=False)

    def logged(items):
        items = list(items)
        start = last = time.perf_counter()
        for i, x in enumerate(items):
            yield x
            now = time.perf_counter()
            if now - last >= every_s:
                log.info("%s: %d/%d done (%.0f s)", desc, i + 1, len(items), now - start)
                last = now
    return logged


def default_reference(lm) -> str | None:
    """The unquantized model to compare a quantized checkpoint with: its recorded source, or `default`
    when the checkpoint has the embedded default's shape. None for an unquantized model."""
    from models.config import ModelConfig
    from models.embedded import DEFAULT_MODEL_NAME

    if lm.quantization is None:
        return None
    m = lm.quantization
    src = m.get("model") or m.get("base_model") or m.get("source_model")
    if src == "default" or (isinstance(src, str) and src.rstrip("/").endswith(DEFAULT_MODEL_NAME)):
        return "default"
    if isinstance(src, str) and Path(src).expanduser().is_dir():
        return src
    c, d = lm.model.config, ModelConfig()
    same = all(getattr(c, k) == getattr(d, k) for k in
               ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"))
    return "default" if same else None


def zero_shot(model, tokenizer, task: str, limit: int | None, ctx: int) -> dict:
    """lm-eval style accuracy of `model` on one task."""
    docs = load_task(task, limit)
    encode = hf_encoder(tokenizer)
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    pairs = [encode_pair(encode, c, x, prefix) for d in docs for c, x in d.requests]
    scored = loglikelihoods(model, pairs, max_len=ctx, progress=_progress(task))
    lls, k = [], 0
    for d in docs:
        lls.append([ll for ll, _ in scored[k:k + len(d.requests)]])
        k += len(d.requests)
    return accuracy(docs, lls)


def _perplexities(lm, ref, ref_spec, ctx: int, max_windows: int | None, texts: Sequence[str],
                  result: dict, timings: dict) -> None:
    """WikiText-2 test (with KL / top-1 agreement when there is a reference) and each --text file."""
    sources = [("wikitext2", wikitext2_text())] if max_windows != 0 else []
    sources += [(Path(t).name, Path(t).read_text(encoding="utf-8")) for t in texts]
    for name, text in sources:
        t1 = time.perf_counter()
        windows = token_windows(lm.tokenizer, text, ctx, max_windows or None)  # (N, ctx)
        with_ref = ref.model if (ref is not None and name == "wikitext2") else None
        m = evaluate_windows(lm.model, windows, with_ref, progress=_progress(f"ppl {name}"))
        result["perplexity"][name] = m.perplexity
        result["windows"][name] = {"count": m.windows, "ctx": int(windows.shape[1]), "positions": m.positions}
        if with_ref is not None:
            result.update(reference=ref_spec, kl_divergence=m.kl_mean, top1_agreement=m.top1_agreement)
        timings[f"perplexity_{name}"] = time.perf_counter() - t1
        log.info("%s: ppl %.4f over %d windows (%.0f s)", name, m.perplexity, m.windows, timings[f"perplexity_{name}"])


def evaluate(model: str = "default", *, tasks: Sequence[str] = TASK_NAMES, limit: int | None = None,
             ctx: int = 2048, max_windows: int | None = None, texts: Sequence[str] = (),
             reference: str | None = "auto") -> dict:
    """Evaluate `model` ("default" or a directory) and return the results dict written by `--json`.

    `max_windows=0` skips WikiText-2; `reference="auto"` picks `default_reference`, None skips KL.
    Raises DataMissingError before loading anything if a data file is missing.
    """
    from models.loader import load_model

    bad = [t for t in tasks if t not in TASK_NAMES]
    if bad:
        raise ValueError(f"unknown tasks {bad}; known: {', '.join(TASK_NAMES)}")
    require_data(*([WIKITEXT2_TEST] if max_windows != 0 else []), *task_files(tasks))
    for t in texts:
        if not Path(t).is_file():
            raise DataMissingError(f"--text {t}: no such file")

    t0 = time.perf_counter()
    lm = load_model(model)
    ref_spec = default_reference(lm) if reference == "auto" else reference
    ref = load_model(ref_spec) if ref_spec and max_windows != 0 else None
    if ref is not None and ref.model.config.vocab_size != lm.model.config.vocab_size:
        raise ValueError(f"reference {ref_spec} has another vocabulary: KL needs the same tokenizer")
    timings: dict = {"load": time.perf_counter() - t0}
    dtype = lm.model.model.embed_tokens.weight.dtype  # what the unquantized layers run in
    result: dict = {"model": model, "name": lm.name, **model_summary(lm.quantization, dtype),
                    "perplexity": {}, "windows": {}, "reference": None, "kl_divergence": None,
                    "top1_agreement": None, "tasks": {}, "zero_shot_mean": None}
    _perplexities(lm, ref, ref_spec, ctx, max_windows, texts, result, timings)
    del ref

    for task in tasks:
        t1 = time.perf_counter()
        result["tasks"][task] = zero_shot(lm.model, lm.tokenizer, task, limit, ctx)
        timings[f"task_{task}"] = time.perf_counter() - t1
        log.info("%s: %s (%.0f s)", task, result["tasks"][task], timings[f"task_{task}"])
    if tasks:
        result["zero_shot_mean"] = sum(result["tasks"][t][HEADLINE_METRIC[t]] for t in tasks) / len(tasks)
    timings["total"] = time.perf_counter() - t0
    timings["cpu_total"] = time.process_time()  # CPU seconds of this process: wall time depends on other load
    result.update(timings_s=timings, date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                  settings={"ctx": ctx, "max_windows": max_windows, "limit": limit, "tasks": list(tasks),
                            "torch_threads": torch.get_num_threads()})
    return result


def _tasks_arg(s: str) -> list[str]:
    if s.strip().lower() in ("", "none"):
        return []
    names = [t.strip() for t in s.split(",") if t.strip()]
    bad = [t for t in names if t not in TASK_NAMES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown tasks {bad}; choose from {','.join(TASK_NAMES)} or none")
    return names


def _reference_arg(s: str) -> str | None:
    return None if s.lower() == "none" else s


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="'default' (embedded SmolLM2-135M-Instruct) or a model directory")
    p.add_argument("--text", action="append", default=[], metavar="FILE",
                   help="also report perplexity on this text file (named by its file name); repeatable")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON")
    p.add_argument("--markdown", metavar="OUT", help="write a markdown table of the results")
    p.add_argument("--plot", metavar="OUT.png", help="plot perplexity against bits per weight")
    p.add_argument("--tasks", type=_tasks_arg, default=list(TASK_NAMES),
                   help=f"comma-separated subset of {','.join(TASK_NAMES)}, or none (default: all)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="first N examples per task")
    p.add_argument("--ctx", type=int, default=2048, help="perplexity window and scoring context (tokens)")
    p.add_argument("--max-windows", type=int, default=None, metavar="N",
                   help="first N perplexity windows per text (0 skips WikiText-2)")
    p.add_argument("--reference", type=_reference_arg, default="auto", metavar="default|DIR|none",
                   help="unquantized model for KL and top-1 agreement (default: the checkpoint's source model)")
    from quant.qdec_eval import add_arguments as add_qdec_arguments  # QDEC hook: --qdec-k-chunk, --qdec-select

    add_qdec_arguments(p)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "qdec_k_chunk", None) is not None:  # QDEC hook: perplexity with error compensation
        from quant.qdec_eval import run as run_qdec

        return run_qdec(args)
    try:
        result = evaluate(args.model, tasks=args.tasks, limit=args.limit, ctx=args.ctx, max_windows=args.max_windows,
                          texts=args.text, reference=args.reference)
    except (DataMissingError, ValueError) as e:
        print(f"fbserve eval: error: {e}", file=sys.stderr)
        return 2
    table = markdown_table([result])
    write_outputs(result, table, args.json, args.markdown)
    if args.plot:
        plot_results([result], args.plot)
    print(table)
    return 0


def register(subparsers) -> None:
    """Add `eval` to the `fbserve` command's subparsers."""
    p = subparsers.add_parser("eval", help="perplexity, KL to the unquantized model, zero-shot accuracy",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    """`python -m quant.eval_cli ...`: the same as `fbserve eval ...`."""
    from server.cli import main as fbserve

    return fbserve(["eval", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
