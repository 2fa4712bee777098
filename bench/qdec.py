"""QDEC on a GPU: what the CPU-only sessions could not measure (run on a CUDA machine).

    python bench/qdec.py [--model llama2-7b|llama3-8b] [--bits 3] [--json OUT]

1. zero-copy gather: time of cuda_ext.qdec_kernel.qdec_correction reading k rows of a pinned host
   residual (one layer, 4096 outputs -> 2 KB rows) for k = 16..1024; effective PCIe bandwidth;
   pinned cudaMemcpy of 256 MB for comparison.
2. slowdown: one decode step's linear stack (per layer qkv, o, gate_up, down; base quant_matmul,
   3-bit g128, rank 0) alone vs with QDEC on each linear as served (selection + gather in one launch on
   the side stream, one add after the base kernel; cuda_ext.qdec_kernel) at k_chunk 1..128 (and the
   two-launch form at 1, 8, 32), in a CUDA graph and eagerly: the % slowdown
   per k_chunk, the tuned k_chunk (largest within 2.5 %) and the knee (first over 2.5 %), and the extra
   GPU memory, with the residual scales in pinned host memory and on the device.
Times: CUDA events, median of the repetitions after warm-ups.  Nothing is estimated: on a machine
without CUDA it exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

SHAPES = {  # per decoder layer: (name, N out, K in); 32 layers
    "llama2-7b": [("qkv", 3 * 4096, 4096), ("o", 4096, 4096), ("gate_up", 2 * 11008, 4096), ("down", 4096, 11008)],
    "llama3-8b": [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 2 * 14336, 4096), ("down", 4096, 14336)],
}


def cuda_time(fn, reps: int = 50, warm: int = 10) -> float:
    """Median seconds of fn() (CUDA events)."""
    from cuda_ext.testing import cuda_median_ms

    return cuda_median_ms(fn, reps, warm) / 1e3


def gather_table(n: int = 4096, k_in: int = 11008) -> list[dict]:
    from cuda_ext.qdec_kernel import qdec_correction

    rc = torch.randint(0, 256, (k_in, n // 2), dtype=torch.uint8).pin_memory()
    rs = (torch.rand(n) * 0.01).half().cuda()
    x = torch.randn(1, k_in, device="cuda", dtype=torch.float16)
    rows = []
    for k in (16, 64, 256, 1024):
        idx = torch.randperm(k_in, device="cuda")[:k][None]
        t = cuda_time(lambda: qdec_correction(x, idx, rc, rs))
        rows.append({"rows": k, "row_bytes": n // 2, "us": t * 1e6, "GB_s": k * n / 2 / t / 1e9})
    host = torch.empty(256 << 20, dtype=torch.uint8).pin_memory()
    dev = torch.empty_like(host, device="cuda")
    t = cuda_time(lambda: dev.copy_(host, non_blocking=True), reps=10, warm=2)
    rows.append({"rows": "memcpy 256 MB", "row_bytes": None, "us": t * 1e6, "GB_s": host.numel() / t / 1e9})
    return rows


def slowdown_table(model: str, bits: int, layers: int = 32, scales_on: str = "host") -> dict:
    """One decode step's linear stack (base kernel, rank 0) alone vs with QDEC on every linear, as the
    served model runs it: the fused selection (qdec_select) and the zero-copy gather on the side stream,
    forked before and joined after the base kernel. Timed inside a CUDA graph (how the engine decodes) and
    eagerly (Python launches). Extra GPU memory: the resident per-output scales (none when they stay in
    pinned host memory) and the peak of one eager step's temporaries, against the stack's weight bytes."""
    from cuda_ext.testing import cuda_graph_ms
    from cuda_ext import quant_matmul
    from cuda_ext.qdec_kernel import (FUSED_CONFIG, GATHER_CONFIG, SELECT_CONFIG, SideStream, qdec_add,
                                      qdec_correction, qdec_select, qdec_select_gather)
    from cuda_ext.testing import random_packed

    lo, hi = 0.05, 3.0  # selection thresholds for N(0, 1) activations (calibrated per layer when served)
    torch.manual_seed(0)
    stack, weight_bytes, scale_bytes = [], 0, 0
    for _ in range(layers):
        for name, n, k in SHAPES[model]:
            w = random_packed(n, k, bits, 128)
            weight_bytes += sum(t.numel() * t.element_size() for t in (w.qweight, w.scales, w.zeros))
            rc = torch.randint(0, 256, (k, (n + 1) // 2), dtype=torch.uint8).pin_memory()
            rs = (torch.rand(n) * 0.01).half()
            rs = rs.pin_memory() if scales_on == "host" else rs.cuda()
            scale_bytes += rs.numel() * 2 if scales_on == "device" else 0
            stack.append((w, rc, rs, torch.randn(1, k, device="cuda").half()))
    side = SideStream(torch.device("cuda"))

    def step(k_chunk: int, fused: bool = True) -> None:
        for w, rc, rs, x in stack:
            if k_chunk and fused:  # as engine.qdec's hooks: one launch beside the base kernel, one add after
                part = side.launch(x, lambda v: qdec_select_gather(v, k_chunk, lo, hi, rc, rs))
            elif k_chunk:  # the form timed in the second GPU session: select + zeroed acc + gather, then add
                acc = side.launch(x, lambda v: qdec_correction(v, qdec_select(v, k_chunk, lo, hi), rc, rs))
            y = quant_matmul(x, w)
            if k_chunk and fused:
                qdec_add(y, side.join(part))
            elif k_chunk:
                y.add_(side.join(acc))

    def peak_bytes(k_chunk: int) -> int:
        step(k_chunk)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(k_chunk)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    def graphed(fn, what: str) -> float:  # NaN (with the error printed) if the capture fails
        try:
            return cuda_graph_ms(fn, 50)
        except Exception as e:  # noqa: BLE001 - reported in the table, the other columns still measured
            print(f"graph capture failed ({what}): {e!r}", flush=True)
            torch.cuda.synchronize()
            return float("nan")

    def graphed_step(k_chunk: int) -> float:
        return graphed(lambda: step(k_chunk), f"step, k_chunk {k_chunk}")

    def graphed_chain(k_chunk: int, gather: bool = True, fused: bool = False) -> float:
        def chain() -> None:
            for _, rc, rs, x in stack:
                if fused:
                    qdec_select_gather(x, k_chunk, lo, hi, rc, rs)
                    continue
                idx = qdec_select(x, k_chunk, lo, hi)
                if gather:
                    qdec_correction(x, idx, rc, rs)
        return graphed(chain, f"QDEC alone, k_chunk {k_chunk}, gather {gather}, fused {fused}")

    out = {"model": model, "bits": bits, "scales_on": scales_on, "weight_bytes": weight_bytes,
           "resident_scale_bytes": scale_bytes, "graph_base_ms": graphed_step(0),
           "eager_base_ms": cuda_time(lambda: step(0), reps=20, warm=3) * 1e3, "k_chunk": {}}
    base_peak = peak_bytes(0)
    for kc in (1, 2, 4, 8, 16, 32, 64, 128):
        g = graphed_step(kc)
        e = cuda_time(lambda: step(kc), reps=20, warm=3) * 1e3
        extra = scale_bytes + max(0, peak_bytes(kc) - base_peak)
        out["k_chunk"][kc] = {"graph_ms": g, "slowdown_pct": 100 * (g / out["graph_base_ms"] - 1),
                              "eager_ms": e, "eager_slowdown_pct": 100 * (e / out["eager_base_ms"] - 1),
                              "extra_gpu_bytes": extra, "extra_gpu_pct": 100 * extra / weight_bytes}
        if kc in (1, 8, 32):  # the same step with the two-launch form, same run
            out["k_chunk"][kc]["two_launch_graph_ms"] = graphed(lambda: step(kc, fused=False), f"two-launch {kc}")
    # where the time goes: QDEC's own work alone, serially on one stream (no base kernel, no overlap)
    out["alone"] = {}
    for kc in (8, 32):
        out["alone"][kc] = {"select_ms": graphed_chain(kc, gather=False), "select_gather_ms": graphed_chain(kc),
                            "fused_ms": graphed_chain(kc, fused=True)}
    # launch parameters of both kernels (cuda_ext.qdec_kernel's shipped ones first), alone at k_chunk 8
    out["sweep"] = []
    for what, cfg, values in (("select", SELECT_CONFIG, [{"num_warps": w} for w in (16, 4, 8, 32)]),
                              ("gather", GATHER_CONFIG, [{"block_s": s_, "block_b": b_} for s_, b_ in
                                                         ((8, 256), (4, 512), (16, 256), (2, 1024), (32, 64))]),
                              ("fused", FUSED_CONFIG, [{"num_warps": w, "block_s": s_} for w, s_ in
                                                       ((4, 8), (8, 16), (16, 32), (4, 16), (8, 32))])):
        shipped = dict(cfg)
        for v in values:
            cfg.update(v)  # a config that fails to compile or run times as NaN (the error is printed)
            out["sweep"].append({"kernel": what, **v, "ms": graphed_chain(8, gather=what != "select",
                                                                          fused=what == "fused")})
            cfg.clear()
            cfg.update(shipped)
    within = [kc for kc, v in out["k_chunk"].items() if v["slowdown_pct"] <= 2.5]
    over = [kc for kc, v in out["k_chunk"].items() if v["slowdown_pct"] > 2.5]
    out["tuned_k_chunk_2.5pct"] = max(within) if within else 0
    out["knee_k_chunk_2.5pct"] = over[0] if over else None
    return out


def slowdown_md(s: dict) -> list[str]:
    """Markdown lines of one slowdown_table result."""
    out = ["", f"{s['model']} {s['bits']}-bit linear stack, residual scales on the {s['scales_on']}: base "
               f"{s['graph_base_ms']:.3f} ms graphed, {s['eager_base_ms']:.3f} ms eager", "",
           "| k_chunk | graphed ms | slowdown | eager ms | eager slowdown | extra GPU memory |",
           "|---|---|---|---|---|---|"]
    for kc, v in s["k_chunk"].items():
        mem = f"{v['extra_gpu_bytes'] / 1e6:.3f} MB ({v['extra_gpu_pct']:.4f}%)"
        out.append(f"| {kc} | {v['graph_ms']:.3f} | {v['slowdown_pct']:.2f}% | {v['eager_ms']:.3f} | "
                   f"{v['eager_slowdown_pct']:.1f}% | {mem} |")
    out.append(f"- tuned k_chunk (largest within 2.5%, graphed): {s['tuned_k_chunk_2.5pct']}; "
               f"knee (first over 2.5%): {s['knee_k_chunk_2.5pct']}")
    for kc, v in s["k_chunk"].items():
        if "two_launch_graph_ms" in v:
            out.append(f"- k_chunk {kc}, the same step with the two-launch form (select, zeroed acc, gather, add): "
                       f"{v['two_launch_graph_ms']:.3f} ms graphed (fused: {v['graph_ms']:.3f})")
    for kc, v in s.get("alone", {}).items():
        out.append(f"- QDEC's work alone (one stream, graphed) at k_chunk {kc}: selection {v['select_ms']:.3f} ms, "
                   f"selection + gather {v['select_gather_ms']:.3f} ms, fused {v.get('fused_ms', float('nan')):.3f} ms")
    if s.get("sweep"):
        out += ["", "Launch parameters, QDEC alone at k_chunk 8 (graphed; the first row of each kernel is shipped; "
                "gather rows include the selection):", "", "| kernel | parameters | ms |", "|---|---|---|"]
        for r in s["sweep"]:
            params = ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("kernel", "ms"))
            out.append(f"| {r['kernel']} | {params} | {r['ms']:.3f} |")
    return out


def markdown(res: dict) -> list[str]:
    """Markdown lines of a bench/qdec.py result (its --json): the gather table, then each slowdown table."""
    out = ["| rows | us | GB/s |", "|---|---|---|"]
    out += [f"| {r['rows']} | {r['us']:.1f} | {r['GB_s']:.1f} |" for r in res.get("gather", [])]
    for s in res.get("slowdown", []):
        out += slowdown_md(s)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(SHAPES), default="llama2-7b")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--scales", nargs="+", choices=["host", "device"], default=["host"],
                   help="where the per-output residual scales live (pinned host: zero-copy, no GPU memory)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/qdec.py needs a CUDA GPU (zero-copy PCIe reads, side-stream overlap); nothing measured",
              file=sys.stderr)
        return 2
    res = {"device": torch.cuda.get_device_name(), "gather": gather_table(), "slowdown": []}
    print("\n".join(markdown({"gather": res["gather"]})), flush=True)
    for scales_on in args.scales:
        res["slowdown"].append(slowdown_table(args.model, args.bits, scales_on=scales_on))
        print("\n".join(slowdown_md(res["slowdown"][-1])), flush=True)
        if args.json:  # written after each table: a later timeout keeps what was measured
            with open(args.json, "w") as f:
                json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
