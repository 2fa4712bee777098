"""Decode speed on CPU: our engine (fp32 and quantized checkpoints) vs transformers vs llama.cpp.

    .venv/bin/python bench/decode.py [--tokens 128] [--threads 2] [--decode-threads N] [--only ours,transformers,llamacpp]
        [--checkpoint DIR ...] [--quantize] [--proxy 4,3] [--repeats 3] [--profile] [--json OUT] [--markdown OUT]

Every row greedy-decodes the default model (SmolLM2-135M-Instruct) for `--tokens` tokens (EOS ignored)
from the same prompt token ids: the opening of WikiText-2's test split ($FBSERVE_DATA or ../shared/data, beside the
repository), cut to `--prompt-tokens`. Each row runs in its own subprocess, so its peak RSS
(ru_maxrss: model load plus generation) is its own; each does one short warm-up generation, then
`--repeats` measured ones, and reports the median.

  ours fp32        the real `Engine` (worker thread, asyncio stream) on the fp32 model
  ours <ckpt>      the same on a quantized checkpoint (`fbserve quantize ... --out DIR`), CPU int path
  ours RTN proxy   with --proxy: the fp32 model's projections swapped for QuantLinear (round-to-nearest
                   codes, zero rank-32 branch): the speed of a checkpoint of that shape, not its accuracy
  transformers     AutoModelForCausalLM.generate on the same fp32 weights (the converted GGUF)
  llama.cpp        llama-cpp-python on the embedded Q4_1 GGUF, in its own venv (bench/_llamacpp_env.py)

decode tok/s = (tokens - 1) / (last token time - first token time); TTFT (prefill + first token) is
separate. Rows that cannot run print `skipped: <reason>`; no number is ever filled in for them.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import _llamacpp_env  # noqa: E402  (after the path set-up: bench/ is not an installed package)

WORKERS = Path(__file__).with_name("_decode_workers.py")
ENGINES = ("ours", "transformers", "llamacpp")
# The issue's targets: llama.cpp on the Q4_1 GGUF measured 57.7 tok/s on this machine type (2 cores).
REFERENCE_LLAMACPP_TOK_S = 57.7
TARGET_VS_TRANSFORMERS = 3.0
QUANT_DEFAULTS = [(4, 128, 32), (3, 128, 32)]
# --module-path rows: the same engine with engine.cpu_decode's fast decode step turned off
MODULE_PATH = "[module path]"
NO_FAST = {"FBSERVE_CPU_DECODE": "0"}  # (bits, group size, rank) of the FBQuant checkpoints


@dataclass
class Row:
    engine: str
    weights: str
    status: str = "ok"  # ok | skipped | failed
    reason: str = ""
    result: dict = field(default_factory=dict)

    @property
    def tok_s(self) -> float | None:
        return self.result.get("decode_tok_s") if self.status == "ok" else None


# ---- inputs -------------------------------------------------------------------------------------------
def prompt_text(path: Path | None = None) -> str:
    """The first article's body paragraphs (headings `= ... =` dropped) of WikiText-2 test, from the shared
    data folder ($FBSERVE_DATA, else ../shared/data beside the repository: quant.calibration.data_dir)."""
    from quant.calibration import data_dir

    path = path or data_dir() / "wikitext-2-raw" / "wiki.test.raw"
    if not path.is_file():
        raise SystemExit(f"bench/decode.py: prompt data missing: {path} (WikiText-2 raw test split; set "
                         "FBSERVE_DATA to the folder holding wikitext-2-raw/, or put it in ../shared/data)")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()[:200]]
    return "\n".join(ln for ln in lines if ln and not ln.startswith("="))


def prompt_ids(n: int) -> list[int]:
    from transformers import AutoTokenizer

    from models.loader import resolve_model_dir

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_dir("default")))
    ids = tokenizer.encode(prompt_text(), add_special_tokens=False)
    if len(ids) < n:
        raise SystemExit(f"bench/decode.py: the prompt text has only {len(ids)} tokens, asked for {n}")
    return ids[:n]


# ---- quantized checkpoints ----------------------------------------------------------------------------
def default_checkpoint(bits: int, group_size: int, rank: int) -> Path:
    from models.loader import fbserve_home

    return fbserve_home() / "bench" / "checkpoints" / f"smollm2-135m-fbquant-w{bits}-g{group_size}-r{rank}"


def _quantize_command() -> list[str] | None:
    """`fbserve quantize`, run by module from the repository root (so this tree's packages are the ones
    imported, whatever the environment's install of fbserve), else `python -m quant.cli`."""
    for cmd in ([sys.executable, "-m", "server.cli", "quantize"], [sys.executable, "-m", "quant.cli"]):
        if subprocess.run(cmd + ["--help"], capture_output=True, cwd=ROOT).returncode == 0:
            return cmd
    return None


def quantize(out: Path, bits: int, group_size: int, rank: int, timeout_s: float) -> str | None:
    """Create an FBQuant checkpoint at `out` unless there; return None on success, else the reason."""
    if (out / "quantization.json").is_file():
        return None
    cmd = _quantize_command()
    if cmd is None:
        return "no quantize command in this tree (neither `fbserve quantize` nor `python -m quant.cli`)"
    args = cmd + ["--model", "default", "--method", "fbquant", "--bits", str(bits), "--group-size", str(group_size),
                  "--rank", str(rank), "--out", str(out)]
    print(f"quantizing: {' '.join(args)}", flush=True)
    try:
        proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"quantizing took over {timeout_s:.0f} s"
    if proc.returncode != 0 or not (out / "quantization.json").is_file():
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        return f"quantize exited {proc.returncode}: {tail}"
    return None


def checkpoint_label(path: Path) -> str:
    """`fbquant w3 g128 r32` from quantization.json (keys looked for at its top level), else the dir name."""
    try:
        m = json.loads((path / "quantization.json").read_text())
    except (OSError, ValueError):
        return path.name
    parts = [str(m.get("method", ""))] + [f"{p}{m[k]}" for p, k in (("w", "bits"), ("g", "group_size"), ("r", "rank"))
                                          if k in m]
    return " ".join(p for p in parts if p) or path.name


def checkpoint_problem(path: Path) -> str | None:
    if not (path / "quantization.json").is_file():
        return f"no quantized checkpoint at {path} (make it with --quantize or `fbserve quantize ... --out DIR`)"
    if importlib.util.find_spec("quant.checkpoint") is None:
        return "quant.checkpoint (the quantized-checkpoint loader) is not in this tree"
    return None


# ---- running the rows ---------------------------------------------------------------------------------
def run_worker(job: dict, timeout_s: float) -> dict:
    env = {**os.environ, **job.get("env", {})}
    proc = subprocess.run([sys.executable, str(WORKERS)], input=json.dumps(job), capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout_s, env=env)
    if proc.returncode != 0:
        raise RuntimeError("\n    ".join(proc.stderr.strip().splitlines()[-8:]))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(row: Row, fn) -> Row:
    print(f"running {row.engine} ({row.weights}) ...", flush=True)
    start = time.monotonic()
    try:
        row.result = fn()
    except _llamacpp_env.Unavailable as e:
        row.status, row.reason = "skipped", str(e)
    except (RuntimeError, subprocess.SubprocessError, OSError, ValueError) as e:
        row.status, row.reason = "failed", str(e)
    print(f"  {row.status} in {time.monotonic() - start:.0f} s"
          + (f": {row.tok_s:.1f} tok/s" if row.tok_s else f": {row.reason}"), flush=True)
    return row


def quant_rows(args, base: dict) -> list[Row]:
    dirs = [Path(d).expanduser() for d in args.checkpoint]
    made: dict[Path, str | None] = {}
    if not dirs:
        for bits, g, r in QUANT_DEFAULTS:
            d = default_checkpoint(bits, g, r)
            dirs.append(d)
            if args.quantize:
                made[d] = quantize(d, bits, g, r, args.quantize_timeout)
    rows = []
    for d in dirs:
        row = Row("ours", checkpoint_label(d) if (d / "quantization.json").is_file() else d.name)
        if any(r.weights == row.weights for r in rows):  # two checkpoints of the same settings
            row.weights += f" ({d.name})"
        reason = made.get(d) or checkpoint_problem(d)
        if reason:
            row.status, row.reason = "skipped", reason
            print(f"ours ({row.weights}): skipped: {reason}", flush=True)
        else:
            measure(row, lambda d=d: run_worker({**base, "kind": "ours", "spec": str(d)}, args.timeout))
        rows.append(row)
        if args.module_path and not reason:
            rows.append(measure(Row("ours", f"{row.weights} {MODULE_PATH}"),
                                lambda d=d: run_worker({**base, "kind": "ours", "spec": str(d), "env": NO_FAST},
                                                       args.timeout)))
    return rows


def run_all(args, ids: list[int]) -> list[Row]:
    base = {"prompt_ids": ids, "tokens": args.tokens, "threads": args.threads, "decode_threads": args.decode_threads,
            "repeats": args.repeats,
            "profile": args.profile, "profile_rows": args.profile_rows}
    rows = []
    if "transformers" in args.only:
        rows.append(measure(Row("transformers", "fp32"),
                            lambda: run_worker({**base, "kind": "transformers", "spec": "default"}, args.timeout)))
    if "llamacpp" in args.only:
        def llamacpp() -> dict:
            from models.embedded import default_gguf_path

            python = _llamacpp_env.ensure(install=not args.no_install, timeout_s=args.build_timeout)
            return _llamacpp_env.run(python, default_gguf_path(), ids, args.tokens, args.threads, args.repeats,
                                     timeout_s=args.timeout)
        rows.append(measure(Row("llama.cpp", "GGUF Q4_1"), llamacpp))
    if "ours" in args.only:
        rows.append(measure(Row("ours", "fp32"),
                            lambda: run_worker({**base, "kind": "ours", "spec": "default"}, args.timeout)))
        if args.module_path:
            rows.append(measure(Row("ours", f"fp32 {MODULE_PATH}"),
                                lambda: run_worker({**base, "kind": "ours", "spec": "default", "env": NO_FAST},
                                                   args.timeout)))
        rows.extend(quant_rows(args, base))
        for bits in args.proxy:
            proxy = {"bits": bits, "group_size": 128, "rank": 32}
            rows.append(measure(Row("ours", f"RTN proxy w{bits} g128 r32 (speed only)"),
                                lambda p=proxy: run_worker({**base, "kind": "ours", "spec": "default", "proxy": p},
                                                           args.timeout)))
    return rows


# ---- report -------------------------------------------------------------------------------------------
def _fmt(x: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "—" if x is None else f"{x:{spec}}{suffix}"


def _agreement(row: Row, reference: Row | None) -> str:
    """How many leading greedy tokens equal the transformers row's (a correctness check, fp32 rows should agree)."""
    if reference is None or reference.tok_s is None or row.tok_s is None or row is reference:
        return "—"
    a, b = row.result["token_ids"], reference.result["token_ids"]
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"{same}/{len(b)}"


def table(rows: list[Row]) -> str:
    hf = next((r for r in rows if r.engine == "transformers" and r.tok_s), None)
    lcpp = next((r for r in rows if r.engine == "llama.cpp" and r.tok_s), None)
    lines = ["| engine | weights | decode tok/s | runs tok/s | TTFT ms | vs transformers | vs llama.cpp "
             "| peak RSS MB | RSS end MB | threads | greedy = transformers | greedy = module path |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for i, r in enumerate(rows):
        if r.tok_s is None:
            lines.append(f"| {r.engine} | {r.weights} | {r.status}: {r.reason.splitlines()[0] if r.reason else ''} "
                         "| | | | | | | | | |")
            continue
        # the --module-path row of the same model is the one right after it
        twin = rows[i + 1] if i + 1 < len(rows) and rows[i + 1].weights == f"{r.weights} {MODULE_PATH}" else None
        res = r.result
        runs = ", ".join(f"{x:.1f}" for x in res.get("decode_tok_s_runs", []))
        lines.append(
            f"| {r.engine} | {r.weights} | {r.tok_s:.1f} | {runs} | {_fmt(res.get('ttft_s', 0) * 1e3, '.0f')} "
            f"| {_fmt(r.tok_s / hf.tok_s if hf else None, '.2f', 'x')} "
            f"| {_fmt(r.tok_s / lcpp.tok_s if lcpp else None, '.2f', 'x')} "
            f"| {_fmt(res.get('peak_rss_mb'), '.0f')} | {_fmt(res.get('rss_end_mb'), '.0f')} "
            f"| {_threads(res)} "
            f"| {_agreement(r, hf)} | {_agreement(r, twin)} |")
    return "\n".join(lines)


def _threads(res: dict) -> str:
    """Threads of a row: ours "prefill/decode" (the engine switches per phase), others one count."""
    eng = res.get("engine_threads")
    if eng:
        return f"{eng['prefill']}/{eng['decode']}"
    return str(res.get("torch_threads", res.get("threads", "—")))


def targets(rows: list[Row]) -> list[str]:
    """The issue's targets for the 3-bit FBQuant row: >= llama.cpp and >= 3x transformers."""
    hf = next((r.tok_s for r in rows if r.engine == "transformers" and r.tok_s), None)
    lcpp = next((r.tok_s for r in rows if r.engine == "llama.cpp" and r.tok_s), None)
    three = [r for r in rows if r.engine == "ours" and " w3" in f" {r.weights}" and MODULE_PATH not in r.weights]
    if not three:
        return ["targets: unknown (no 3-bit checkpoint row)"]
    out = []
    for r in three:
        if r.tok_s is None:
            out.append(f"targets ({r.weights}): unknown, the row was {r.status}: {r.reason.splitlines()[0]}")
            continue
        checks = [(f"llama.cpp measured now ({_fmt(lcpp)} tok/s)", lcpp),
                  (f"llama.cpp reference ({REFERENCE_LLAMACPP_TOK_S} tok/s)", REFERENCE_LLAMACPP_TOK_S),
                  (f"{TARGET_VS_TRANSFORMERS:g}x transformers ({_fmt(hf and hf * TARGET_VS_TRANSFORMERS)} tok/s)",
                   hf and hf * TARGET_VS_TRANSFORMERS)]
        for what, goal in checks:
            verdict = "unknown" if goal is None else ("met" if r.tok_s >= goal else "NOT met")
            out.append(f"target {r.weights} {r.tok_s:.1f} tok/s >= {what}: {verdict}")
    return out


def profile_summary(rows: list[Row]) -> str:
    parts = []
    for r in rows:
        p = r.result.get("profile") if r.tok_s else None
        if not p:
            continue
        engine_ms = 1e3 / r.tok_s
        parts.append(
            f"profile, ours {r.weights}: engine {engine_ms:.1f} ms/token; bare model decode step "
            f"{p['bare_ms_per_token']:.1f} ms/token (engine overhead {engine_ms - p['bare_ms_per_token']:.1f} ms); "
            f"under the profiler {p['profiled_ms_per_token']:.1f} ms/token, of which torch ops' self CPU time "
            f"{p['ops_self_ms_per_token']:.1f} ms in {p['op_calls_per_token']:.0f} op calls "
            "(the rest: Python, module calls, profiler)\n\n"
            "| op | input shapes | self ms/token | calls/token | share of op time |\n|---|---|---:|---:|---:|\n"
            + "\n".join(f"| {o['name']} | {o.get('shapes', '')} | {o['self_ms_per_token']:.2f} "
                        f"| {o['calls_per_token']:.0f} | {o['share']:.0%} |" for o in p["ops"]))
    return "\n\n".join(parts)


def header(args, load_start: tuple, load_end: tuple, ids: list[int]) -> list[str]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    return [
        f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"command: {' '.join([Path(sys.executable).name, 'bench/decode.py', *sys.argv[1:]])}",
        f"machine: {cpu}, {os.cpu_count()} logical CPUs; threads per engine: {args.threads}",
        "load average (1/5/15 min): start " + " ".join(f"{x:.2f}" for x in load_start)
        + ", end " + " ".join(f"{x:.2f}" for x in load_end),
        f"workload: greedy, prompt {len(ids)} tokens (WikiText-2 test opening), {args.tokens} new tokens, "
        f"EOS ignored; median of {args.repeats} runs after one warm-up",
    ] + ([f"WARNING: load average {busiest:.1f} on {os.cpu_count()} CPUs: other work shared the cores, so these "
          "timings (and the ratios and targets below) are not representative; rerun on a quiet machine"]
         if (busiest := max(load_start[0], load_end[0])) > 0.5 * (os.cpu_count() or 1) else [])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/decode.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=128, help="new tokens per generation (default 128)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length in tokens (default 128)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="threads of every engine: torch intra-op threads, llama.cpp n_threads (default: all CPUs)")
    p.add_argument("--decode-threads", type=int, default=None,
                   help="our engine's decode-step threads (default: the engine's rule, threads - 1, at least 1)")
    p.add_argument("--only", default=",".join(ENGINES), help=f"comma-separated subset of {','.join(ENGINES)}")
    p.add_argument("--checkpoint", action="append", default=[], metavar="DIR",
                   help="quantized checkpoint to run through our engine (repeatable; default: the bench's "
                        "FBQuant w4/w3 g128 r32 checkpoints under $FBSERVE_HOME/bench/checkpoints if there)")
    p.add_argument("--quantize", action="store_true", help="create the default FBQuant checkpoints if missing")
    p.add_argument("--proxy", default="", metavar="BITS,...",
                   help="also run speed proxies: the fp32 model with its projections swapped for QuantLinear "
                        "(round-to-nearest codes, zero rank-32 branch, g128) at these bit widths, e.g. 4,3; "
                        "same kernels and bytes as an FBQuant checkpoint, not its accuracy")
    p.add_argument("--repeats", type=int, default=3, help="measured generations per engine (median reported)")
    p.add_argument("--module-path", action="store_true",
                   help="also run each of our rows with the CPU fast decode step off (FBSERVE_CPU_DECODE=0): "
                        "before/after in one run")
    p.add_argument("--profile", action="store_true", help="torch.profiler per-op table of our decode steps")
    p.add_argument("--profile-rows", type=int, default=15, help="ops in the profile table")
    p.add_argument("--json", metavar="OUT", help="write all results as JSON")
    p.add_argument("--markdown", metavar="OUT", help="write the report (header, table, profile) as markdown")
    p.add_argument("--no-install", action="store_true", help="do not build llama-cpp-python if missing (skip it)")
    p.add_argument("--build-timeout", type=float, default=3600, help="seconds allowed to build llama-cpp-python")
    p.add_argument("--quantize-timeout", type=float, default=3600, help="seconds allowed per quantization")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per engine row")
    args = p.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    try:
        args.proxy = [int(b) for b in args.proxy.split(",") if b.strip()]
    except ValueError:
        p.error(f"--proxy: expected bit widths like 4,3, got {args.proxy!r}")
    unknown = set(args.only) - set(ENGINES)
    if unknown:
        p.error(f"--only: unknown engine(s) {sorted(unknown)}; choose from {','.join(ENGINES)}")
    if args.tokens < 2:
        p.error("--tokens must be at least 2 (decode speed is measured between the first and the last token)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ids = prompt_ids(args.prompt_tokens)
    load_start = os.getloadavg()
    rows = run_all(args, ids)
    report = "\n".join(header(args, load_start, os.getloadavg(), ids)) + "\n\n" + table(rows)
    report += "\n\n" + "\n".join(targets(rows))
    prof = profile_summary(rows)
    if prof:
        report += "\n\n" + prof
    print("\n" + report)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(report + "\n")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": header(args, load_start, os.getloadavg(), ids),
                                               "prompt_ids": ids, "rows": [asdict(r) for r in rows]}, indent=1))
    return 0 if all(r.status != "failed" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
