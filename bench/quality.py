"""Quality of every quantization method: perplexity, KL to fp, zero-shot accuracy vs bits per weight.

    .venv/bin/python bench/quality.py [--methods fp,rtn,gptq,svd,lqer,qera,fbquant] [--bits 4,3,2]
        [--ranks 16,32,64] [--group-size 128] [--tasks piqa,...|none] [--limit N] [--max-windows N]
        [--ctx 2048] [--out bench/out/quality] [--checkpoints DIR] [--base rtn|gptq] [--force]
        [--report-only] [--quantize-args "..."]

For each (method, bits, rank) it runs `fbserve quantize --model default --method M --bits B
--group-size G [--rank R] --out DIR` in-process (through `quant.cli.register`, the subcommand
`server/cli.py` mounts), then `fbserve eval` on DIR (KL against the embedded fp model), and writes
OUT/results/<run>.json. Methods without a branch (fp, rtn, gptq) run once per bit width (fp once).
`--base gptq` puts svd/lqer/qera on GPTQ codes (the strong baselines; fbquant's loop quantizer is GPTQ by
default) and names those runs e.g. `qera-gptq-w3g128-r32`; `--base rtn` also puts fbquant on RTN codes
(`fbquant-rtn-w3g128-r32`; fbquant runs on its GPTQ default carry no tag). Existing checkpoints and results are reused
unless --force. At the end it writes OUT/quality.md
(the table) and OUT/quality.png (perplexity vs bits per weight, a line per method and rank) and
prints the table. On 2 CPU cores a full eval of one model takes hours (bench/RESULTS.md, ## Quality):
use --limit / --max-windows / --tasks for a quick pass, and say so when quoting numbers.
"""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quant.eval_cli import _tasks_arg, evaluate  # noqa: E402  (bench/ is not an installed package)
from quant.eval_report import load_results, markdown_table, plot_results  # noqa: E402
from quant.tasks import TASK_NAMES  # noqa: E402

METHODS = ("fp", "rtn", "gptq", "svd", "lqer", "qera", "fbquant")
NO_BRANCH = {"fp", "rtn", "gptq"}


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def runs(methods: list[str], bits: list[int], ranks: list[int]) -> list[tuple[str, int | None, int]]:
    """(method, bits, rank) to evaluate: fp once, rtn/gptq per bit width, branch methods per bits x rank."""
    out: list[tuple[str, int | None, int]] = []
    for m in methods:
        if m == "fp":
            out.append(("fp", None, 0))
        else:
            out += [(m, b, 0) for b in bits] if m in NO_BRANCH else [(m, b, r) for b in bits for r in ranks]
    return out


SUB_BRANCH = {"svd", "lqer", "qera"}  # the methods whose base quantizer --base chooses
FBQUANT_BASE = "gptq"  # fbserve quantize's default base for fbquant: its runs carry no tag


def base_tag(method: str, base: str | None) -> str | None:
    """The base quantizer a run names and passes on: --base for svd/lqer/qera, and for fbquant only when
    it differs from fbquant's default (so `fbquant-rtn-w3g128-r32`, while GPTQ-based runs stay `fbquant-...`)."""
    if base and (method in SUB_BRANCH or (method == "fbquant" and base != FBQUANT_BASE)):
        return base
    return None


def run_name(method: str, bits: int | None, group_size: int, rank: int, base: str | None = None) -> str:
    if method == "fp":
        return "fp"
    tag = f"{method}-{base_tag(method, base)}" if base_tag(method, base) else method
    return f"{tag}-w{bits}g{group_size}" + (f"-r{rank}" if rank else "")


def quantize(method: str, bits: int, group_size: int, rank: int, out: Path, extra: list[str],
             base: str | None = None) -> None:
    """`fbserve quantize ...` in-process; fails clearly while quant.cli does not exist yet."""
    try:
        import quant.cli as qcli
    except ModuleNotFoundError as e:
        raise SystemExit(f"bench/quality.py: `fbserve quantize` is unavailable ({e}); only --methods fp can run") from e
    parser = argparse.ArgumentParser(prog="fbserve")
    qcli.register(parser.add_subparsers(dest="command", required=True))
    argv = ["quantize", "--model", "default", "--method", method, "--bits", str(bits),
            "--group-size", str(group_size), "--out", str(out)] + (["--rank", str(rank)] if rank else []) \
        + (["--base", base_tag(method, base)] if base_tag(method, base) else []) + extra
    args = parser.parse_args(argv)
    rc = args.func(args)
    if rc not in (0, None) or not (out / "quantization.json").is_file():
        raise SystemExit(f"bench/quality.py: `fbserve {shlex.join(argv)}` failed (exit {rc})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--bits", type=_ints, default=[4, 3, 2])
    p.add_argument("--ranks", type=_ints, default=[16, 32, 64])
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--tasks", type=_tasks_arg, default=list(TASK_NAMES))
    p.add_argument("--limit", type=int, default=None, help="examples per zero-shot task")
    p.add_argument("--max-windows", type=int, default=None, help="WikiText-2 windows (0 skips perplexity)")
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "quality")
    p.add_argument("--checkpoints", type=Path, default=None, help="checkpoint folder (default OUT/checkpoints)")
    p.add_argument("--base", choices=("rtn", "gptq"), default=None,
                   help="base quantizer of svd/lqer/qera (default: fbserve quantize's, rtn), and of fbquant "
                        "when rtn (its default is gptq); named in the run")
    p.add_argument("--force", action="store_true", help="re-quantize and re-evaluate existing runs")
    p.add_argument("--report-only", action="store_true", help="only rebuild the table and plot from OUT/results")
    p.add_argument("--quantize-args", default="--eval-windows 0",
                   help="extra arguments for fbserve quantize (default skips its quick quality figure: this bench "
                        "measures the full one), e.g. '--eval-windows 0 --n-samples 32'")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")  # eval/quantize progress

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        p.error(f"unknown methods {unknown}; known: {','.join(METHODS)}")
    results_dir = args.out / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        todo = runs(methods, args.bits, args.ranks)
        print(f"{len(todo)} runs: {', '.join(run_name(m, b, args.group_size, r, args.base) for m, b, r in todo)}",
              flush=True)
        for method, bits, rank in todo:
            name = run_name(method, bits, args.group_size, rank, args.base)
            result_file = results_dir / f"{name}.json"
            wanted = {"ctx": args.ctx, "max_windows": args.max_windows, "limit": args.limit, "tasks": args.tasks}
            if result_file.is_file() and not args.force:
                had = json.loads(result_file.read_text()).get("settings", {})
                if all(had.get(k) == v for k, v in wanted.items()):
                    print(f"{name}: reusing {result_file}", flush=True)
                    continue
                print(f"{name}: {result_file} has other settings ({had}): evaluating again", flush=True)
            t0 = time.perf_counter()
            model = "default"
            if method != "fp":
                ckpt = (args.checkpoints or args.out / "checkpoints") / name
                if args.force or not (ckpt / "quantization.json").is_file():
                    quantize(method, bits, args.group_size, rank, ckpt, shlex.split(args.quantize_args), args.base)
                model = str(ckpt)
            result = evaluate(model, tasks=args.tasks, limit=args.limit, ctx=args.ctx, max_windows=args.max_windows)
            result["run"] = name
            if base_tag(method, args.base):  # its own line in the table and plot, e.g. "qera-gptq r32"
                result["method"] = f"{method}-{base_tag(method, args.base)}"
            if method != "fp":  # how it was quantized: calibration, base quantizer, FBQuant rounds, time
                man = json.loads((ckpt / "quantization.json").read_text())
                result["quantization"] = {k: man.get(k) for k in
                                          ("base_quantizer", "calibration", "options", "seconds")}
                errs = [v["error"] for v in man.get("layers", {}).values()]
                result["quantization"]["mean_layer_error"] = sum(errs) / len(errs) if errs else None
            result_file.write_text(json.dumps(result, indent=2) + "\n")
            print(f"{name}: ppl {result['perplexity'].get('wikitext2', float('nan')):.3f}, "
                  f"{result['bits_per_weight']:.2f} bits/weight ({time.perf_counter() - t0:.0f} s)", flush=True)

    results = load_results([results_dir])
    if not results:
        print(f"no results in {results_dir}", file=sys.stderr)
        return 1
    table = markdown_table(results)
    (args.out / "quality.md").write_text(table + "\n")
    plot = plot_results(results, args.out / "quality.png")
    print(table)
    print(f"\ntable: {args.out / 'quality.md'}\nplot: {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
