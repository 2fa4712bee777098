"""Summarise one `bench/gpu_session.sh` run as markdown ready for bench/RESULTS.md (summary.md in $OUT).

Reads from --out: env.json, tests.log, errors.jsonl, qdec.json, engine.json; merges the per-model
bench/kernels.py JSON files given with --kernels into kernels.json; --steps is the session's step table
(name, rc, seconds, limit; tab-separated).  Standard library only; never fails on a missing input (says
"not produced" instead).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench.qdec's tables, run as a script


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def steps_md(path: Path | None) -> list[str]:
    out = ["| step | exit | seconds | limit s |", "|---|---|---|---|"]
    if path and path.exists():
        for line in path.read_text().splitlines():
            f = line.split("\t")
            if len(f) >= 4:
                note = {"124": " (timed out)", "137": " (killed)"}.get(f[1], "")
                out.append(f"| {f[0]} | {f[1]}{note} | {f[2]} | {f[3]} |")
    return out


def env_md(env: dict | None) -> list[str]:
    if not env:
        return ["env.json not produced"]
    gpu = env.get("gpu") or {}
    return [f"- GPU: {gpu.get('name', 'none')} (cc {gpu.get('capability')}, {gpu.get('sms')} SMs, "
            f"{gpu.get('memory_GiB')} GiB, L2 {gpu.get('l2_MB')} MB); driver/clocks: "
            f"`{(env.get('nvidia_smi_query') or '').splitlines()[-1:]}`",
            f"- python {env.get('python')} ({env.get('executable')}), torch {env.get('torch')} (CUDA "
            f"{env.get('torch_cuda')}), triton {env.get('triton')}, ptxas {str(env.get('ptxas')).splitlines()[-1:]}",
            f"- missing packages: {', '.join(env.get('missing') or []) or 'none'}",
            f"- TRITON_INTERPRET={env.get('env', {}).get('TRITON_INTERPRET')!r}"]


def tests_md(log: Path) -> list[str]:
    if not log.exists():
        return ["tests.log not produced"]
    text = log.read_text(errors="replace")
    final = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|error|skipped)", ln)
             and ("==" in ln or " in " in ln)]
    bad = [ln for ln in text.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    out = [f"- pytest: `{ln.strip('= ')}`" for ln in final] or ["- pytest: no final line (timed out or crashed?)"]
    out += [f"  - {ln[:300]}" for ln in bad[:40]]
    if len(bad) > 40:
        out.append(f"  - ... {len(bad) - 40} more in tests.log")
    return out


def errors_md(path: Path) -> list[str]:
    if not path.exists():
        return ["errors.jsonl not produced"]
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    extra = []
    for r in rows:
        if r["check"] == "target":
            extra.append(f"- target: {r.get('gpu')} arch {r.get('arch')}, {r.get('num_sms')} SMs, "
                         f"tf32 {r.get('tf32')}, triton {r.get('triton')}, torch {r.get('torch')}")
            continue
        key = (r["check"], r.get("dtype", ""), r.get("bits", ""), r.get("where", ""))
        groups[key].append(r)
    out = extra + ["| check | dtype | bits | where | cases | max rel err | max worst-element err | bound |",
                   "|---|---|---|---|---|---|---|---|"]
    for key in sorted(groups, key=str):
        g = groups[key]
        rel = [r.get("rel_err", r.get("rel_max_err")) for r in g if r.get("rel_err", r.get("rel_max_err")) is not None]
        worst = [r["max_err"] for r in g if "max_err" in r]
        out.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {len(g)} | {max(rel):.2e} | "
                   f"{(f'{max(worst):.2e}' if worst else '-')} | {g[0].get('bound', '-')} |" if rel else
                   f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {len(g)} | - | - | - |")
    splits = sorted({(r.get("kind"), r.get("m"), r.get("n"), r.get("k"), r.get("split_k")) for r in rows
                     if r["check"] in ("decode", "llama", "prefill") and r.get("split_k", 1) > 1}, key=str)
    if splits:
        out.append(f"- split-K exercised (kind, m, N, K, split): {', '.join(map(str, splits[:12]))}"
                   + (" ..." if len(splits) > 12 else ""))
    return out


def kernels_md(data: dict | None) -> list[str]:
    if not data or not data.get("rows"):
        return ["kernels.json not produced (bench/kernels.py did not finish)"]
    rows = data["rows"]
    out = [f"Device {data.get('device')}; d2d copy {data.get('copy_bw', 0) / 1e12:.2f} TB/s (read + write), "
           f"per model: {data.get('per_model_copy_bw', '')}", "",
           "| model | variant | m | ms/token | x fp16 | x torch int4 | of read roofline |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['variant']} | {r['m']} | {r['ms']:.3f} | {r['vs_fp16']:.2f} | "
                   f"{r['vs_int4']:.2f} | {r['roofline']:.0%} |")
    ms = {(r["model"], r["variant"], r["m"]): r for r in rows}
    out += ["", "Targets (issue 8, H100):", "| model | check | value | target | met |", "|---|---|---|---|---|"]
    for model in sorted({r["model"] for r in rows}):
        def get(v, m, key="ms"):
            r = ms.get((model, v, m))
            return None if r is None else r[key]

        checks = [("m=1 3-bit r64 vs fp16", get("ours 3-bit g128 r64", 1, "vs_fp16"), 3.5),
                  ("m=1 3-bit r64 vs torch int4", get("ours 3-bit g128 r64", 1, "vs_int4"), 1.6),
                  ("m=16 3-bit r64 vs fp16", get("ours 3-bit g128 r64", 16, "vs_fp16"), 2.5),
                  ("m=16 3-bit r0 vs fp16", get("ours 3-bit g128 r0", 16, "vs_fp16"), 2.5)]
        for label, val, tgt in checks:
            out.append(f"| {model} | {label} | {'-' if val is None else f'{val:.2f}x'} | >= {tgt}x | "
                       f"{'-' if val is None else ('yes' if val >= tgt else 'NO')} |")
        for bits in (4, 3, 2):
            for m in (1, 4, 16):
                base = get(f"ours {bits}-bit g128 r0", m)
                for r in (32, 64):
                    t = get(f"ours {bits}-bit g128 r{r}", m)
                    if base and t:
                        over = t / base - 1
                        out.append(f"| {model} | branch r{r} over none, {bits}-bit m={m} | {over:+.1%} | <= +10% | "
                                   f"{'yes' if over <= 0.10 else 'NO'} |")
        for r in (0, 64):  # what q/k/v and gate/up apart cost over merged (engine.merge; no target)
            for m in (1, 4, 16):
                merged, apart = get(f"ours 3-bit g128 r{r}", m), get(f"ours 3-bit g128 r{r} q,k,v,gate,up apart", m)
                if merged and apart:
                    out.append(f"| {model} | 7 layers apart over 4 merged, 3-bit r{r} m={m} | "
                               f"{apart / merged - 1:+.1%} | - | - |")
        for r in (32, 64):  # the served merged layers: a rank-r branch per part (segments), against none
            for m in (1, 4, 16):
                base, served = get("ours 3-bit g128 r0", m), get(f"ours 3-bit g128 r{r} merged, a branch per part (as served)", m)
                if base and served:
                    over = served / base - 1
                    out.append(f"| {model} | branch r{r} per part (as served) over none, 3-bit m={m} | {over:+.1%} | "
                               f"<= +10% | {'yes' if over <= 0.10 else 'NO'} |")
    return out


def qdec_md(data: dict | None) -> list[str]:
    if not data:
        return ["qdec.json not produced (bench/qdec.py did not finish)"]
    from bench.qdec import markdown

    return [f"Device {data.get('device')}", "", *markdown(data)]


def engine_md(data: dict | None) -> list[str]:
    if not data:
        return ["engine.json not produced (bench/gpu_engine.py did not finish)"]
    c = data.get("consistency", {})
    runs = [(k, v) for k, v in data.items() if k.startswith("engine") and isinstance(v, dict)]
    return [f"- {data.get('device')}: {data.get('model')}; all layers on triton: {data.get('all_triton')}; "
            f"ok: {data.get('ok')}",
            *(f"- {k}: rel err {v['rel_err']:.2e}, top-1 agreement {v['top1_agree']:.0%}" for k, v in c.items()
              if isinstance(v, dict)),
            f"- graphed vs eager step: {data.get('graph_vs_eager')}",
            f"- eager decode tokens/s (model forward): {data.get('eager_tokens_per_s')}",
            *(f"- {k}: {e.get('requests')} requests x {e.get('max_tokens')} tokens, "
              f"{e.get('tokens_per_s', 0):.1f} tok/s, finish {e.get('finish_reasons')}, errors {e.get('errors')}, "
              f"CUDA graph {e.get('cuda_graph')}, merged projections {e.get('merged_projections')}" for k, e in runs),
            *profile_md(data.get("decode_profile"), "eager decode step (profiled)"),
            *profile_md(data.get("graphed_profile"), "graphed decode step")]


def profile_md(prof: dict | None, name: str) -> list[str]:
    """A decode step's profile (bench/gpu_engine.py decode_profile or graphed_profile) as short tables."""
    if not prof:
        return []
    if "error" in prof:
        return [f"- {name} profile failed: {prof['error']}"]
    wall = prof.get("wall_ms_per_step", prof.get("wall_ms_per_step_profiled", float("nan")))
    facts = [f"{wall:.2f} ms wall per step", f"device busy {prof['device_busy_ms_per_step']:.2f} ms"]
    if "kernels_per_step" in prof:
        facts.append(f"{prof['kernels_per_step']:.0f} kernels per step")
    out = [f"- {name}: " + ", ".join(facts)]
    for key, title in (("by_cpu", "top ops by self CPU us/step"), ("by_device", "top ops by device us/step")):
        if prof.get(key):
            out += ["", f"| {title} | calls/step | self CPU us | device us |", "|---|---|---|---|"]
            out += [f"| {r['op']} | {r['calls_per_step']:.0f} | "
                    f"{'-' if r.get('self_cpu_us') is None else format(r['self_cpu_us'], '.0f')} | "
                    f"{r['device_us']:.0f} |" for r in prof[key]]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=Path)
    ap.add_argument("--kernels", type=Path, nargs="*", default=[], help="per-model bench/kernels.py JSON files")
    ap.add_argument("--title", default="GPU session")
    args = ap.parse_args(argv)
    out = args.out
    merged = None
    for p in args.kernels:
        d = _load(p)
        if not d:
            continue
        if merged is None:
            merged = {"device": d.get("device"), "copy_bw": d.get("copy_bw"), "rows": [], "per_model_copy_bw": {}}
        merged["rows"] += d.get("rows", [])
        for r in d.get("rows", [])[:1]:
            merged["per_model_copy_bw"][r["model"]] = f"{d.get('copy_bw', 0) / 1e12:.2f} TB/s"
    if merged:
        (out / "kernels.json").write_text(json.dumps(merged, indent=1))
    env = _load(out / "env.json")
    lines = [f"# {args.title}", "", "## Steps", *steps_md(args.steps), "", "## Environment", *env_md(env), "",
             "## Correctness on the GPU (compiled Triton vs cuda_ext.reference)", *tests_md(out / "tests.log"), "",
             *errors_md(out / "errors.jsonl"), "", "## Linear-stack benchmark (bench/kernels.py)",
             *kernels_md(merged or _load(out / "kernels.json")), "", "## QDEC (bench/qdec.py)",
             *qdec_md(_load(out / "qdec.json")), "", "## Engine smoke (bench/gpu_engine.py)",
             *engine_md(_load(out / "engine.json")), ""]
    (out / "summary.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
