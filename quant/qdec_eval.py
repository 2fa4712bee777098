"""`fbserve eval --qdec-k-chunk 0,8,16,32,64 [--qdec-select approx,exact,random,static]`: perplexity
with QDEC error compensation (engine.qdec) applied at every position as if it were a decode step.

The paper's protocol: each window runs the quantized model (dequantized matmuls) and every linear
adds, per position, R[:, idx] @ x[idx] for that position's selected channels (the true history, no
cache). k_chunk 0 is the quantized model alone. The unquantized reference gives the gap recovered:
(ppl_q - ppl_qdec) / (ppl_q - ppl_fp). `approx` also reports its recall of the exact per-chunk top-k.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

log = logging.getLogger("fbserve.eval")


def _ints(s: str) -> list[int]:
    try:
        v = [int(t) for t in s.split(",") if t.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from e
    if not v or any(k < 0 for k in v):
        raise argparse.ArgumentTypeError("k_chunk values must be >= 0")
    return v


def _selections(s: str) -> list[str]:
    from engine.qdec import SELECTIONS

    v = [t.strip() for t in s.split(",") if t.strip()]
    bad = [t for t in v if t not in SELECTIONS]
    if bad or not v:
        raise argparse.ArgumentTypeError(f"unknown selections {bad}; choose from {','.join(SELECTIONS)}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The QDEC flags of `fbserve eval` (quant/eval_cli.py calls this)."""
    p.add_argument("--qdec-k-chunk", type=_ints, default=None, metavar="K[,K...]",
                   help="QDEC: perplexity with error compensation at these k_chunk values (needs residuals; "
                        "see `python -m quant.qdec`); runs only the QDEC evaluation")
    p.add_argument("--qdec-select", type=_selections, default=["approx"], metavar="approx|exact|random|static",
                   help="QDEC channel selections to compare (comma-separated; default approx)")


def evaluate_qdec(model: str, k_chunks: list[int], selects: list[str], ctx: int = 2048,
                  max_windows: int | None = None, reference: str | None = "auto") -> dict:
    import torch

    from engine import qdec
    from models.loader import load_model
    from quant.eval import evaluate_windows, token_windows, wikitext2_text
    from quant.eval_cli import default_reference

    t0 = time.perf_counter()
    lm = load_model(model)
    q = qdec.attach(lm.model, lm.path, mode="cpu", k_chunk=0)
    if not q.enabled:
        raise ValueError(f"QDEC unavailable for {model}: {q.reason}")
    q.all_positions = True
    qdec.dense_for_eval(lm.model)
    windows = token_windows(lm.tokenizer, wikitext2_text(), ctx, max_windows or None)
    ref_spec = default_reference(lm) if reference == "auto" else reference
    result: dict = {"model": model, "ctx": int(windows.shape[1]), "windows": int(windows.shape[0]),
                    "reference": ref_spec, "reference_perplexity": None, "runs": []}
    if ref_spec:
        result["reference_perplexity"] = evaluate_windows(load_model(ref_spec).model, windows).perplexity
    base = None
    with torch.inference_mode():
        for sel in selects:
            for k in k_chunks:
                if k == 0 and base is not None:
                    continue
                q.select, q.k_chunk = sel, {"default": k}
                q.measure_recall, q.recall_hits, q.recall_total = sel == "approx" and k > 0, 0, 0
                t1 = time.perf_counter()
                ppl = evaluate_windows(lm.model, windows).perplexity
                run = {"select": sel if k else "none", "k_chunk": k, "perplexity": ppl,
                       "seconds": round(time.perf_counter() - t1, 1)}
                if k == 0:
                    base = ppl
                if q.measure_recall and q.recall_total:
                    run["recall_vs_exact"] = q.recall_hits / q.recall_total
                result["runs"].append(run)
                log.info("qdec %s k_chunk %d: ppl %.4f", run["select"], k, ppl)
    fp = result["reference_perplexity"]
    for run in result["runs"]:
        if fp is not None and base is not None and base > fp:
            run["gap_recovered"] = (base - run["perplexity"]) / (base - fp)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def markdown(result: dict) -> str:
    rows = ["| selection | k_chunk | perplexity | gap recovered | approx recall |", "|---|---|---|---|---|"]
    if result["reference_perplexity"] is not None:
        rows.append(f"| unquantized ({result['reference']}) | - | {result['reference_perplexity']:.4f} | - | - |")
    for r in result["runs"]:
        gap = f"{100 * r['gap_recovered']:.1f}%" if "gap_recovered" in r else "-"
        rec = f"{100 * r['recall_vs_exact']:.1f}%" if "recall_vs_exact" in r else "-"
        rows.append(f"| {r['select']} | {r['k_chunk']} | {r['perplexity']:.4f} | {gap} | {rec} |")
    return "\n".join(rows)


def run(args: argparse.Namespace) -> int:
    from quant.eval import DataMissingError

    try:
        result = evaluate_qdec(args.model, args.qdec_k_chunk, args.qdec_select, ctx=args.ctx,
                               max_windows=args.max_windows, reference=args.reference)
    except (DataMissingError, ValueError) as e:
        print(f"fbserve eval: error: {e}", file=sys.stderr)
        return 2
    table = markdown(result)
    from quant.eval_report import write_outputs

    write_outputs(result, table, args.json, args.markdown)
    print(table)
    return 0
