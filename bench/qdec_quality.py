"""QDEC quality on the CPU: WikiText-2 test perplexity of a quantized checkpoint with error compensation
at several k_chunk values and selections, the unquantized reference on the same windows, gap recovered.

    python bench/qdec_quality.py --model DIR [--ctx 2048] [--windows 16] [--shard 0/2]
        [--configs fp,none:0,approx:8,approx:16,approx:32,approx:64,exact:8,random:8,static:8,...]
        --out bench/out/qdec/shard0.json
    python bench/qdec_quality.py --report bench/out/qdec/shard*.json [--markdown OUT.md] [--plot OUT.png]
        [--standard bench/out/qdec/stdnow_shard*.json]

The same computation as `fbserve eval --model DIR --qdec-k-chunk K --qdec-select S` (quant.qdec_eval:
the paper's protocol, every position corrected as a decode step with the true history, no cache), but
window-major: each window runs every configuration before the next window, and the per-window negative
log-likelihoods are written after each window. So a run that is stopped early still gives every row on
the same windows, and windows can be split over processes (`--shard I/S`: windows I, I+S, ...).
Configurations: `fp` (the unquantized source model), `none:0` (the quantized model alone),
`SEL:K` (selection SEL in engine.qdec.SELECTIONS at k_chunk K; `approx` also counts its recall of the
exact per-chunk top-k), `SEL:K:TYPE[+TYPE]` (only those layer types corrected: qkv, o, gate_up, down).
`--standard FILES` (with --report): another checkpoint's result files (e.g. the standard FBQuant beside a
`--qdec-aware` one); its `none:0` becomes the row `standard:0` and every row also gets its gap recovered
against that checkpoint's uncorrected perplexity on the same windows ("vs standard").
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_CONFIGS = "fp,none:0,approx:8,exact:8,random:8,static:8,approx:16,approx:32,approx:64"


def run(args: argparse.Namespace) -> int:
    import torch

    from engine import qdec
    from models.loader import load_model
    from quant.eval import evaluate_windows, token_windows, wikitext2_text
    from quant.eval_cli import default_reference

    torch.set_num_threads(args.threads)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    lm = load_model(args.model)
    q = qdec.attach(lm.model, lm.path, mode="cpu", k_chunk=0)
    if not q.enabled:
        print(f"QDEC unavailable: {q.reason}", file=sys.stderr)
        return 2
    q.all_positions = True
    qdec.dense_for_eval(lm.model)
    ref_spec = default_reference(lm) if args.reference == "auto" else args.reference
    ref = load_model(ref_spec).model if "fp" in configs else None
    windows = token_windows(lm.tokenizer, wikitext2_text(), args.ctx, args.windows)
    shard, shards = (int(v) for v in args.shard.split("/"))
    out = Path(args.out)
    res = json.loads(out.read_text()) if out.is_file() else {}
    res.update(model=str(args.model), reference=ref_spec, ctx=int(windows.shape[1]),
               windows_total=int(windows.shape[0]), threads=args.threads)
    per = res.setdefault("windows", {})  # window index -> config -> {"nll", "positions", ...}
    for i in range(shard, windows.shape[0], shards):
        row = per.setdefault(str(i), {})
        w = windows[i:i + 1]
        for c in configs:
            if c in row:
                continue
            t0 = time.perf_counter()
            with torch.inference_mode():
                if c == "fp":
                    m = evaluate_windows(ref, w)
                    extra = {}
                else:
                    sel, k, *types = c.split(":")  # SEL:K or SEL:K:type+type (only those layer types)
                    kc = ({"default": int(k)} if not types
                          else {"default": 0, **{t: int(k) for t in types[0].split("+")}})
                    q.select, q.k_chunk = (sel if sel != "none" else "exact"), kc
                    q.measure_recall, q.recall_hits, q.recall_total = sel == "approx" and int(k) > 0, 0, 0
                    m = evaluate_windows(lm.model, w)
                    extra = {"recall_hits": q.recall_hits, "recall_total": q.recall_total} if q.measure_recall else {}
            row[c] = {"nll": m.nll, "positions": m.positions, "seconds": round(time.perf_counter() - t0, 2), **extra}
            print(f"window {i} {c}: ppl {math.exp(m.nll / m.positions):.4f} ({row[c]['seconds']} s)", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=1) + "\n")
        tmp.replace(out)
    return 0


def aggregate(paths: list[str], standard: list[str] | None = None) -> dict:
    """Merge shard files. Each row is pooled over the windows where it, `fp` and `none:0` all ran, so
    every gap is paired (the same windows for the row and its baselines); rows whose window set differs
    from the main one say so (`windows`). The main set: windows where every configuration ran.
    `standard`: result files of another checkpoint whose `none:0` (as `standard:0`) and `fp` join the rows."""
    merged: dict[str, dict] = {}
    meta: dict = {}
    for p in paths:
        r = json.loads(Path(p).read_text())
        meta = {k: r[k] for k in ("model", "reference", "ctx", "windows_total")}
        for i, row in r["windows"].items():  # files may hold different configurations of one window
            merged.setdefault(i, {}).update(row)
    for p in standard or []:
        r = json.loads(Path(p).read_text())
        meta["standard"] = r["model"]
        for i, row in r["windows"].items():
            if i in merged:
                merged[i].update({"standard:0": row["none:0"]} if "none:0" in row else {})
                if "fp" in row:
                    merged[i].setdefault("fp", row["fp"])
    configs = sorted({c for row in merged.values() for c in row})
    complete = sorted(int(i) for i, row in merged.items() if all(c in row for c in configs))
    rows = {}
    for c in configs:
        need = {c, "fp", "none:0"} & set(configs)
        wins = sorted(int(i) for i, row in merged.items() if all(x in row for x in need))
        if not wins:
            continue
        def ppl(x, ws=wins):
            return math.exp(sum(merged[str(i)][x]["nll"] for i in ws) / sum(merged[str(i)][x]["positions"] for i in ws))
        r = {"perplexity": ppl(c), "windows": wins,
             "seconds_per_window": sum(merged[str(i)][c]["seconds"] for i in wins) / len(wins)}
        hits = sum(merged[str(i)][c].get("recall_hits", 0) for i in wins)
        tot = sum(merged[str(i)][c].get("recall_total", 0) for i in wins)
        if tot:
            r["recall_vs_exact"] = hits / tot
        if "standard:0" in configs and c not in ("fp", "standard:0"):
            both = [i for i in wins if "standard:0" in merged[str(i)]]
            fp_b, std_b = ppl("fp", both), ppl("standard:0", both)
            r["gap_recovered_vs_standard"] = (std_b - ppl(c, both)) / (std_b - fp_b)
            r["windows_vs_standard"] = len(both)
        if c not in ("fp", "none:0", "standard:0") and "fp" in configs and "none:0" in configs:
            fp, base = ppl("fp"), ppl("none:0")
            r["fp_same_windows"], r["base_same_windows"] = fp, base
            r["gap_recovered"] = (base - r["perplexity"]) / (base - fp)
            g = []  # per-window gap recovered: its spread judges differences between selections
            for i in wins:
                w = merged[str(i)]
                pf, pb, pc = (math.exp(w[x]["nll"] / w[x]["positions"]) for x in ("fp", "none:0", c))
                g.append((pb - pc) / (pb - pf))
            if len(g) > 1:
                mu = sum(g) / len(g)
                sd = math.sqrt(sum((v - mu) ** 2 for v in g) / (len(g) - 1))
                r["gap_recovered_window_mean"], r["gap_recovered_window_se"] = mu, sd / math.sqrt(len(g))
        rows[c] = r
    main = max((r["windows"] for r in rows.values()), key=len)
    return {**meta, "windows_used": main, "complete_windows": complete, "rows": rows}


def _key(c: str) -> tuple:
    order = {"fp": 0, "none": 1, "approx": 2, "exact": 3, "random": 4, "static": 5}
    if c == "fp":
        return (0, 0)
    sel, k, *types = c.split(":")
    return (int(k), order.get(sel, 9), types)


def markdown(agg: dict) -> str:
    vs_std = "standard" in agg
    lines = ["| selection | k_chunk | perplexity | gap recovered (pooled) | per-window mean +- s.e. "
             + ("| vs standard k0 (pooled) " if vs_std else "") + "| approx recall vs exact | windows |",
             "|---|---|---|---|---|---|---|" + ("---|" if vs_std else "")]
    for c in sorted(agg["rows"], key=_key):
        r = agg["rows"][c]
        parts = c.split(":")
        name = {"fp": "unquantized", "none:0": "3-bit, no QDEC",
                "standard:0": "standard checkpoint, no QDEC"}.get(c, parts[0])
        if len(parts) > 2:
            name += f" ({parts[2]} only)"
        k = "-" if c == "fp" else parts[1]
        gap = f"{100 * r['gap_recovered']:.1f}%" if "gap_recovered" in r else "-"
        pw = (f"{100 * r['gap_recovered_window_mean']:.1f} +- {100 * r['gap_recovered_window_se']:.1f}%"
              if "gap_recovered_window_mean" in r else "-")
        rec = f"{100 * r['recall_vs_exact']:.1f}%" if "recall_vs_exact" in r else "-"
        if vs_std:
            rec = (f"{100 * r['gap_recovered_vs_standard']:.1f}%" if "gap_recovered_vs_standard" in r else "-") + " | " + rec
        ws = "main" if r["windows"] == agg["windows_used"] else (
            f"{len(r['windows'])} ({r['fp_same_windows']:.2f} / {r['base_same_windows']:.2f})" if "fp_same_windows" in r
            else str(len(r["windows"])))
        lines.append(f"| {name} | {k} | {r['perplexity']:.4f} | {gap} | {pw} | {rec} | {ws} |")
    return "\n".join(lines)


def plot(agg: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = agg["rows"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    base, fp = rows["none:0"]["perplexity"], rows.get("fp", {}).get("perplexity")
    main = agg["windows_used"]
    pos = lambda k: k if k > 0 else 4  # noqa: E731  (k_chunk 0 drawn at 4 on the log axis)
    styles = {"approx": "o-", "exact": "s--", "random": "x:", "static": "^:"}
    for sel, style in styles.items():
        pts = sorted((int(c.split(":")[1]), r) for c, r in rows.items()
                     if c.startswith(sel + ":") and c.count(":") == 1 and int(c.split(":")[1]) < 1024)
        if not pts:
            continue
        same = [(k, r) for k, r in pts if r["windows"] == main]  # perplexity: only rows on the main windows
        if same:
            a1.plot([pos(k) for k in [0] + [k for k, _ in same]], [base] + [r["perplexity"] for _, r in same],
                    style, label=sel)
        if fp is not None:  # gap recovered is paired (each row against fp / k0 on its own windows)
            line = a2.plot([pos(k) for k in [0] + [k for k, _ in pts]],
                           [0] + [100 * r.get("gap_recovered", float("nan")) for _, r in pts], style, label=sel)
            other = [(k, r) for k, r in pts if r["windows"] != main]
            if other:
                a2.plot([pos(k) for k, _ in other], [100 * r["gap_recovered"] for _, r in other], style[0],
                        mfc="white", color=line[0].get_color(), ms=9,
                        label=f"{sel}, windows {','.join(map(str, other[0][1]['windows']))} only")
    a1.axhline(base, color="gray", lw=0.8, ls="--", label="3-bit FBQuant, no QDEC")
    if fp is not None:
        a1.axhline(fp, color="k", lw=0.8, label="unquantized")
    full = next((r for c, r in rows.items() if c.endswith(":1024")), None)
    if full is not None:
        if full["windows"] == main:
            a1.axhline(full["perplexity"], color="purple", lw=0.8, ls="-.", label="every channel corrected")
        where = "" if full["windows"] == main else f", windows {','.join(map(str, full['windows']))} only"
        a2.axhline(100 * full["gap_recovered"], color="purple", lw=0.8, ls="-.",
                   label="every channel corrected" + where)
    a2.plot([8], [30], "r*", ms=12, label="target: 30% at k_chunk 8")
    for a in (a1, a2):
        a.set_xscale("log", base=2)
        a.set_xticks([4, 8, 16, 32, 64])
        a.set_xticklabels(["0", "8", "16", "32", "64"])
        a.set_xlabel("k_chunk (of 576 channels: qkv/o/gate/up; of 1024 + 512: down)")
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    a1.set_ylabel("WikiText-2 test perplexity")
    a2.set_ylabel("gap to unquantized recovered (%)")
    fig.suptitle(f"QDEC on 3-bit FBQuant SmolLM2-135M (w3 g128 r32): WikiText-2 test, first windows "
                 f"{min(main)}-{max(main)} ({len(main)} x {agg['ctx']} tokens)", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model")
    p.add_argument("--reference", default="auto")
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--windows", type=int, default=None, help="first N windows of WikiText-2 test")
    p.add_argument("--shard", default="0/1", metavar="I/S")
    p.add_argument("--configs", default=DEFAULT_CONFIGS)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench/out/qdec/quality.json")
    p.add_argument("--report", nargs="+", metavar="JSON", help="merge these result files and print the table")
    p.add_argument("--markdown")
    p.add_argument("--plot")
    p.add_argument("--summary", help="write the merged summary JSON here")
    p.add_argument("--standard", nargs="+", metavar="JSON",
                   help="with --report: another checkpoint's result files; gaps also against its none:0")
    args = p.parse_args(argv)
    if args.report:
        agg = aggregate(args.report, args.standard)
        table = markdown(agg)
        print(f"{len(agg['windows_used'])} windows x {agg['ctx']}: {agg['windows_used']}")
        print(table)
        if args.markdown:
            Path(args.markdown).write_text(table + "\n")
        if args.summary:
            Path(args.summary).write_text(json.dumps(agg, indent=1) + "\n")
        if args.plot:
            plot(agg, args.plot)
        return 0
    if not args.model:
        p.error("--model is required unless --report")
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
