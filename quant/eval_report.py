"""Report evaluation results (the JSON dicts `quant.eval_cli.evaluate` returns): markdown table and plot."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from quant.tasks import HEADLINE_METRIC, TASK_NAMES

PRIMARY_TEXT = "wikitext2"
_SHORT = {"piqa": "PIQA", "arc_easy": "ARC-e", "arc_challenge": "ARC-c", "winogrande": "Wino", "boolq": "BoolQ"}


def write_outputs(result: dict, table: str, json_path: str | None, markdown_path: str | None) -> None:
    """Write an evaluation's result as JSON and its table as markdown where asked (parent folders made)."""
    for path, text in ((json_path, json.dumps(result, indent=2)), (markdown_path, table)):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text + "\n")


def load_results(paths: list[str | Path]) -> list[dict]:
    """Result dicts from JSON files (a folder stands for every *.json in it)."""
    files: list[Path] = []
    for p in map(Path, paths):
        files.extend(sorted(p.glob("*.json")) if p.is_dir() else [p])
    return [json.loads(f.read_text()) for f in files]


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _sort_key(r: dict) -> tuple:
    return (r["method"] != "fp", r["method"], -(r.get("bits") or 99), r.get("rank") or 0)


def markdown_table(results: list[dict]) -> str:
    """One row per result; zero-shot columns show lm-eval's headline metric (acc_norm or acc) in %."""
    texts = sorted({k for r in results for k in r.get("perplexity", {})} - {PRIMARY_TEXT})
    tasks = [t for t in TASK_NAMES if any(t in r.get("tasks", {}) for r in results)]
    head = (["method", "bits", "group", "rank", "bits/weight", f"ppl {PRIMARY_TEXT}"] + [f"ppl {t}" for t in texts]
            + ["KL to fp", "top-1 agree"] + [f"{_SHORT[t]} {HEADLINE_METRIC[t]}" for t in tasks]
            + (["zero-shot mean"] if tasks else []))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(results, key=_sort_key):
        ppl = r.get("perplexity", {})
        cells = [r["method"], str(r.get("bits") or "-"), str(r.get("group_size") or "-"), str(r.get("rank") or "-"),
                 _fmt(r["bits_per_weight"]), _fmt(ppl.get(PRIMARY_TEXT))]
        cells += [_fmt(ppl.get(t)) for t in texts]
        cells += [_fmt(r.get("kl_divergence"), 4), _fmt(r.get("top1_agreement"), 3)]
        for t in tasks:
            res = r.get("tasks", {}).get(t)
            cells.append(_fmt(100 * res[HEADLINE_METRIC[t]], 1) if res else "-")
        if tasks:
            mean = r.get("zero_shot_mean")
            cells.append(_fmt(None if mean is None else 100 * mean, 1))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_results(results: list[dict], out: str | Path, text: str = PRIMARY_TEXT) -> Path:
    """Perplexity on `text` against bits per weight, one line per method and rank (colour: method, line
    style and marker: rank); the fp model dashed. With an fp reference the axis stops at 20x its
    perplexity and points beyond (a collapsed 2-bit RTN) sit on the top edge with their value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[tuple[str, int], list[tuple[float, float]]] = defaultdict(list)
    fp = [r for r in results if r["method"] == "fp" and text in r.get("perplexity", {})]
    for r in results:
        if r["method"] != "fp" and text in r.get("perplexity", {}):
            curves[(r["method"], r.get("rank") or 0)].append((r["bits_per_weight"], r["perplexity"][text]))
    methods = sorted({m for m, _ in curves})
    palette = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    styles = {0: ("-", "o"), 16: (":", "s"), 32: ("-", "o"), 64: ("--", "^")}
    top = 20 * fp[0]["perplexity"][text] if fp else None
    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    for method, rank in sorted(curves):
        xs, ys = zip(*sorted(curves[(method, rank)]))
        style, marker = styles.get(rank, ("-.", "d"))
        shown = [min(y, top) if top else y for y in ys]
        ax.plot(xs, shown, linestyle=style, marker=marker, color=palette(methods.index(method)),
                label=f"{method} r{rank}" if rank else method)
        for x, y in zip(xs, ys):
            if top and y > top:
                ax.annotate(f"{y:.3g} (off scale)", (x, top), textcoords="offset points", xytext=(7, 0),
                            fontsize=7, va="center")
    for r in fp[:1]:
        ax.axhline(r["perplexity"][text], color="k", linestyle="--", linewidth=1,
                   label=f"fp ({r['perplexity'][text]:.2f})")
    ax.set_xlabel("bits per weight")
    ax.set_ylabel(f"perplexity ({text}, lower is better)")
    ax.set_yscale("log")
    if top:
        ax.set_ylim(top=top * 1.05)
    ax.grid(True, which="both", alpha=0.3)
    if curves or fp:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
