"""`fbserve tune-qdec` and the QDEC flags of `fbserve serve`.

    fbserve tune-qdec --model CHECKPOINT [--budget 2.5] [--device auto|cpu|cuda] [--k 0,8,16,32,64,128] [--steps 20]

measures the decode step time (batch 1) with QDEC at each k_chunk for one layer type at a time (QKV,
O, gate/up, down; the others off) on the device in use, chooses per layer type the largest k_chunk whose
summed added time stays within --budget % of the base step (engine.qdec_tuning.choose_k), and writes
both to CHECKPOINT/qdec_tuning.json (schema engine.qdec_tuning.QdecTuning).

`fbserve serve` on that checkpoint and device type then runs QDEC with the saved choice; `--residuals
off|cpu` overrides whether QDEC runs, `--qdec-budget PCT` re-chooses from the saved measurements and
`--qdec-k-chunk K` sets one k_chunk for every layer type. CPU timings are CPU timings (the correction
is a gather + matmul in torch there): a file measured on one device type is not used on the other.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

from engine import qdec
from engine.qdec_tuning import DEFAULT_BUDGET_PCT, TUNING_FILE, LayerTypeTiming, QdecTuning, TunedChoice, choose_k

log = logging.getLogger("fbserve.qdec")
TYPES = ("qkv", "o", "gate_up", "down")


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """`fbserve serve` flags (server/cli.py's add_serve_parser calls this)."""
    p.add_argument("--residuals", choices=["off", "cpu"], default=None,
                   help="QDEC: keep the checkpoint's 4-bit residuals in host memory and correct each decode "
                        "step (cpu), or not (off). Default: cpu when the checkpoint holds a `fbserve tune-qdec` "
                        "choice measured on this device type, else off")
    p.add_argument("--qdec-k-chunk", type=int, default=None, help="QDEC channels per 1024 input channels, "
                   f"every layer type (default: the tune-qdec choice, else {qdec.DEFAULT_K_CHUNK})")
    p.add_argument("--qdec-budget", type=_positive_pct, default=None, metavar="PCT",
                   help="QDEC: target slowdown in percent; k_chunk per layer type chosen from the measurements "
                        "in qdec_tuning.json (overrides the saved choice and --qdec-k-chunk)")


def attach_for_serving(loaded, args: argparse.Namespace) -> qdec.Qdec:
    """Attach QDEC to a LoadedModel per the serve flags; never raises for bad residuals (see engine.qdec)."""
    return qdec.attach(loaded.model, loaded.path if loaded.quantization else None,
                       mode=getattr(args, "residuals", None) or "auto", k_chunk=getattr(args, "qdec_k_chunk", None),
                       budget_pct=getattr(args, "qdec_budget", None))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def step_time(model, device: torch.device, steps: int, graphs=None) -> float:
    """Median seconds of one batch-1 decode step at position 64 (after a 64-token prefill); with `graphs`
    (an engine.cuda_graph_decode.GraphDecoder) replayed as the engine serves it, captured afresh."""
    slots = torch.tensor([0], device=device)
    tok = torch.tensor([[1]], device=device)
    pos = torch.tensor([[64]], device=device)
    if graphs is not None:
        graphs.graphs.clear()  # k_chunk is read when a graph is captured
    times = []
    for i in range(steps + 3):
        _sync(device)
        t0 = time.perf_counter()
        if graphs is not None:
            graphs.step([1], [64], [0])
        else:
            model(tok, pos, slots, last_only=True)
        _sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _measure(model, q: qdec.Qdec, dev: torch.device, ks, steps: int, graphs
             ) -> tuple[float, dict[str, LayerTypeTiming], str | None]:
    """(base step seconds, timings per layer type, why a graph capture failed or None)."""
    if graphs is None:
        model.setup_cache(1, 128)  # a GraphDecoder sets up its own (with a scratch slot)
    with torch.inference_mode():
        model(torch.arange(64, device=dev)[None] % model.config.vocab_size, torch.arange(64, device=dev)[None],
              torch.tensor([0], device=dev))
    q.k_chunk = {t: 0 for t in TYPES}
    base = step_time(model, dev, steps, graphs)
    timings = {}
    for t in TYPES:
        added = []
        for k in ks:
            q.k_chunk = {**{u: 0 for u in TYPES}, t: k}
            added.append(max(0.0, step_time(model, dev, steps, graphs) - base) if k else 0.0)
            if graphs is not None and graphs.failed:
                return base, timings, f"graph capture failed with k_chunk {k} on {t}: {graphs.failed}"
        for i in range(1, len(added)):  # noise: time never falls with k
            added[i] = max(added[i], added[i - 1])
        timings[t] = LayerTypeTiming(k_chunk=list(ks), added_s=added)
        log.info("%s: added seconds %s at k_chunk %s (base step %.4f s)", t, [f"{a:.5f}" for a in added], list(ks), base)
    return base, timings, None


def tune(model_dir: str, device: str = "auto", ks: list[int] = (0, 8, 16, 32, 64, 128), steps: int = 20,
         budget_pct: float = DEFAULT_BUDGET_PCT) -> QdecTuning:
    """Measure, choose for `budget_pct` and write CHECKPOINT/qdec_tuning.json; returns what was written."""
    from models.loader import load_model

    if not ks or ks[0] != 0:
        raise ValueError(f"--k must start with 0 (the base step): {list(ks)}")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    lm = load_model(model_dir, device=dev)
    q = qdec.attach(lm.model, lm.path if lm.quantization else None, mode="cpu", k_chunk=0)
    if not q.enabled:
        raise ValueError(f"QDEC unavailable for {model_dir}: {q.reason}")
    graphs, how = None, "eager"
    if dev.type == "cuda":  # time what serving runs: merged projections (QDEC follows them), graphed step
        from engine.cuda_graph_decode import install
        from engine.merge import merge_projections

        merge_projections(lm.model)

        graphs, why = install(lm.model, 1, 128)
        how = "CUDA graph" if graphs is not None else f"eager (no CUDA graph: {why})"
    base, timings, failed = _measure(lm.model, q, dev, ks, steps, graphs)
    if failed:  # a capture failed: the timings would mix graphed and eager steps, so all are taken eagerly
        log.warning("tune-qdec: %s; timing every configuration eagerly", failed)
        how = f"eager ({failed})"
        base, timings, _ = _measure(lm.model, q, dev, ks, steps, None)
    out = QdecTuning(device=dev.type, device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                     torch_threads=torch.get_num_threads(), selection=q.select, steps=steps, base_step_s=base,
                     layer_types=timings,
                     note=f"median decode step (batch 1, {how}); added_s = step with QDEC on this layer type only - base")
    out.chosen = TunedChoice(budget_pct=budget_pct, k_chunk=choose_k(out, budget_pct))
    (Path(lm.path) / TUNING_FILE).write_text(out.model_dump_json(indent=2) + "\n")
    return out


def run(args: argparse.Namespace) -> int:
    try:
        out = tune(args.model, args.device, args.k, args.steps, args.budget)
    except (ValueError, FileNotFoundError) as e:
        print(f"fbserve tune-qdec: error: {e}", file=sys.stderr)
        return 2
    print(f"base decode step {1000 * out.base_step_s:.3f} ms on {out.device_name}")
    for pct in sorted({out.chosen.budget_pct, 2.5, 5, 10, 20}):
        mark = "   <- saved, used by `fbserve serve`" if pct == out.chosen.budget_pct else ""
        print(f"budget {pct:g}%: k_chunk {choose_k(out, pct)}{mark}")
    return 0


def _positive_pct(s: str) -> float:
    v = float(s)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {s}")
    return v


def register(subparsers) -> None:
    """Add `tune-qdec` to the `fbserve` command's subparsers."""
    p = subparsers.add_parser("tune-qdec", help="measure decode time vs QDEC k_chunk per layer type",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="quantized checkpoint directory with residuals")
    p.add_argument("--budget", type=_positive_pct, default=DEFAULT_BUDGET_PCT, metavar="PCT",
                   help="target decode slowdown in percent for the saved choice (default %(default)s)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--k", type=lambda s: [int(v) for v in s.split(",")], default=[0, 8, 16, 32, 64, 128])
    p.add_argument("--steps", type=int, default=20)
    p.set_defaults(func=run)
