"""Linear-stack benchmark of the quantized kernels (needs a CUDA GPU; exits 0 without one).

One decode step's linear stack, 32 layers x {qkv, o, gate_up, down} each with its own weights,
captured in a CUDA graph, median of --reps replays, for x of m = 1, 4, 16 rows:
  fp16 cuBLAS (F.linear), torch int4 g128 (torch._weight_int4pack_mm, bf16 activations),
  ours at 4/3/2 bits g128 with no branch and rank-32/64 branches, and 3-bit with q/k/v and gate/up
  apart (own launches and branches: the model's layers before the Engine merges them) and merged with a
  branch per part (what the Engine serves: A holds one block per part, `segments`).
Reports ms per token, ratios to fp16 and to torch int4, and the fraction of the read roofline
(ideal bytes / time, divided by the device-to-device copy bandwidth, read + write, measured in the
same run; the H100 anchor found fp16 cuBLAS reading weights at about that rate).

Usage: python bench/kernels.py [--model Llama-2-7B] [--m 1 4 16] [--reps 20] [--json out.json]
       python bench/kernels.py --cpu   # the CPU serving path on SmolLM2-135M's layers (no GPU needed)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cuda_ext import cpu_matmul, prepare_cpu, quant_matmul  # noqa: E402
from cuda_ext.configs import GemmConfig  # noqa: E402
from cuda_ext.roofline import MODELS, ideal_parts  # noqa: E402
from cuda_ext.testing import cuda_graph_ms, random_layer, random_packed  # noqa: E402

LAYERS = 32
GROUP = 128
# The stack's merged shapes as the model's separate layers (models/llama.py: q, k, v and gate, up, each with
# its own launch and FBQuant branch; the Engine merges them on CUDA where engine.merge allows)
SPLITS = {"Llama-2-7B": {12288: [4096, 4096, 4096], 22016: [11008, 11008]},
                 "Llama-3-8B": {6144: [4096, 1024, 1024], 28672: [14336, 14336]},
                 "SmolLM2-135M": {960: [576, 192, 192], 3072: [1536, 1536]}}


def apart_shapes(model: str) -> list[tuple[int, int]]:
    """MODELS[model] with q/k/v and gate/up apart (7 layers per decoder layer instead of 4)."""
    return [(part, k) for n, k in MODELS[model] for part in SPLITS[model].get(n, [n])]


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth, bytes read + written per second."""
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize()
    return 2 * nbytes * 10 / (time.perf_counter() - t0)


def fp16_stack(shapes: list[tuple[int, int]]) -> list[Callable]:
    ws = [torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02 for _ in range(LAYERS) for n, k in shapes]
    return [lambda x, w=w: F.linear(x, w) for w in ws]


def torch_int4_stack(shapes: list[tuple[int, int]]) -> list[Callable]:
    """torch's CUDA int4 kernel (tinygemm): bf16 activations, g128, innerKTiles 8."""
    ops = []
    for _ in range(LAYERS):
        for n, k in shapes:
            q = torch.randint(0, 16, (n, k), dtype=torch.int32, device="cuda")
            packed_u8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
            wq = torch.ops.aten._convert_weight_to_int4pack(packed_u8, 8)
            sz = (torch.rand(k // GROUP, n, 2, device="cuda") * 0.01).to(torch.bfloat16)
            ops.append(lambda x, wq=wq, sz=sz: torch.ops.aten._weight_int4pack_mm(x, wq, GROUP, sz))
    return ops


# qgemm_kernel (tensor cores) forced at m <= 16: the decode path before gemv_kernel, for comparison
TENSOR_CORE_DECODE = GemmConfig(block_m=16, block_n=128, num_warps=4, num_stages=1, waves=2, max_split_k=16)


def m1_config(**change: bool) -> GemmConfig:
    """This GPU's table config for m = 1 at 3 bits with fields changed (the comparison row
    `fused_branch=True` makes t inside gemv's launch)."""
    from dataclasses import replace

    from cuda_ext import configs
    arch = configs.arch_of(torch.cuda.get_device_capability())
    return replace(configs.gemm_config(arch, 1, 3)[1], **change)


def with_config_patch(ops: list[Callable], name: str, patch: Callable[[Callable], Callable]) -> list[Callable]:
    """ops that run with cuda_ext.configs.<name> replaced by patch(original) (also inside a CUDA graph
    capture): how the comparison rows force a path the tables would not choose."""
    from cuda_ext import configs

    orig = getattr(configs, name)
    patched = patch(orig)

    def wrap(op: Callable) -> Callable:
        def call(x):
            setattr(configs, name, patched)
            try:
                return op(x)
            finally:
                setattr(configs, name, orig)
        return call
    return [wrap(op) for op in ops]


def without_half2(ops: list[Callable]) -> list[Callable]:
    """ops whose table configs have `half2` off (the fp32 gemv form at m = 1, chunk-by-chunk K = 16 dots at
    m = 2..16): the same-run baseline of the half2 paths."""
    from dataclasses import replace

    def patch(orig: Callable) -> Callable:
        def no_half2(arch: str, m: int, bits: int) -> tuple[str, GemmConfig]:
            kind, cfg = orig(arch, m, bits)
            return kind, replace(cfg, half2=False)
        return no_half2
    return with_config_patch(ops, "gemm_config", patch)


def ours_stack(shapes: list[tuple[int, int]], bits: int, rank: int, config: GemmConfig | None = None,
               layers: int = LAYERS, splits: dict[int, list[int]] | None = None) -> list[Callable]:
    """Our kernels on `layers` copies of the shapes. splits: merged shapes as engine.merge serves them
    (one rank-r branch per part: A stacks a block per part, each output column its own: `segments`);
    without it a merged shape has one rank-r branch."""
    ops = []
    for _ in range(layers):
        for n, k in shapes:
            p = random_packed(n, k, bits, GROUP, device="cuda")
            segments = tuple(splits[n]) if splits and n in splits else None
            a = b = None
            if rank:
                a = (torch.randn(len(segments or (n,)) * rank, k, device="cuda") * 0.05).half()
                b = (torch.randn(n, rank, device="cuda") * 0.05).half()
            ops.append(lambda x, p=p, a=a, b=b, s=segments: quant_matmul(x, p, a, b, config=config, segments=s))
    return ops


# Measured in this order (rows print as they are measured, so a run cut short by its time limit keeps the
# first): the baselines, the 3-bit kernel as served and its targets' rows, the same-run comparisons of the
# untimed changes, then the other bit widths and the older comparison paths.
PRIORITY = ("fp16 cuBLAS", "torch int4 g128", "ours 3-bit g128 r0", "ours 3-bit g128 r64",
            "ours 3-bit g128 r64 merged, a branch per part (as served)", "ours 3-bit g128 r64 q,k,v,gate,up apart",
            "ours 3-bit g128 r0 q,k,v,gate,up apart", "ours 3-bit g128 r64 fused branch (m=1)",
            "ours 3-bit g128 r0 without half2", "ours 3-bit g128 r64 without half2")


def variant_priority(name: str) -> tuple[int, int]:
    """Sort key: PRIORITY's rows first in its order, then 3-bit rows, then the rest (stable)."""
    if name in PRIORITY:
        return 0, PRIORITY.index(name)
    return (1 if name.startswith("ours 3-bit") else 2), 0


def with_tile_branch(ops: list[Callable]) -> list[Callable]:
    """ops whose m = 1 branch runs branch_down_kernel's 16-row tile (the path before branch_gemv_kernel),
    for comparison rows: configs.branch_config is asked for 2 rows while each op runs."""
    return with_config_patch(ops, "branch_config", lambda orig: lambda arch, m: orig(arch, max(m, 2)))


Variant = tuple[str, Callable[[], list[Callable]], torch.dtype, int, int]  # name, build, dtype, bits, rank


def variant_specs(model: str) -> tuple[list[Variant], dict[str, list[tuple[int, int]]], dict[str, dict[int, list[int]]]]:
    """(the rows to time in measuring order, shapes of the rows that differ from MODELS[model], splits of
    the rows served as merged layers with a branch per part); nothing is built until a row's build() runs."""
    shapes = MODELS[model]
    variants: list[Variant] = [
        ("fp16 cuBLAS", lambda: fp16_stack(shapes), torch.float16, 16, 0),
        ("torch int4 g128", lambda: torch_int4_stack(shapes), torch.bfloat16, 4, 0)]
    variants += [(f"ours {b}-bit g128 r{r}", lambda b=b, r=r: ours_stack(shapes, b, r), torch.float16, b, r)
                 for b in (4, 3, 2) for r in (0, 32, 64)]
    variants += [(f"ours 3-bit g128 r{r} tensor-core decode",
                  lambda r=r: ours_stack(shapes, 3, r, TENSOR_CORE_DECODE), torch.float16, 3, r) for r in (0, 64)]
    variants += [("ours 3-bit g128 r64 16-row branch_down",
                  lambda: with_tile_branch(ours_stack(shapes, 3, 64)), torch.float16, 3, 64)]
    # m = 1 only (a one-row config): the same-run baselines of the untimed changes
    variants += [(f"ours 3-bit g128 r{r} without half2",
                  lambda r=r: without_half2(ours_stack(shapes, 3, r)), torch.float16, 3, r) for r in (0, 64)]
    variants += [("ours 3-bit g128 r64 fused branch (m=1)",
                  lambda: ours_stack(shapes, 3, 64, m1_config(fused_branch=True)), torch.float16, 3, 64)]
    # the layers apart (7 per decoder layer): what the Engine runs where engine.merge declines
    apart = apart_shapes(model)
    variants += [(f"ours 3-bit g128 r{r} q,k,v,gate,up apart",
                  lambda r=r: ours_stack(apart, 3, r), torch.float16, 3, r) for r in (0, 64)]
    # the merged layers as the Engine serves them: each part keeps its rank-r branch (segments)
    variants += [(f"ours 3-bit g128 r{r} merged, a branch per part (as served)",
                  lambda r=r: ours_stack(shapes, 3, r, splits=SPLITS[model]), torch.float16, 3, r)
                 for r in (32, 64)]
    variants.sort(key=lambda v: variant_priority(v[0]))  # a step cut short keeps the rows that matter most
    return (variants, {name: apart for name, *_ in variants if name.endswith(" apart")},
            {name: SPLITS[model] for name, *_ in variants if name.endswith("(as served)")})


def run_stack(ops: list[Callable], shapes: list[tuple[int, int]], m: int, dtype: torch.dtype, reps: int) -> float:
    xs = {k: torch.randn(m, k, device="cuda", dtype=dtype) for _, k in shapes}
    ks = [k for _ in range(LAYERS) for _, k in shapes]

    def step() -> None:
        for op, k in zip(ops, ks):
            op(xs[k])

    return cuda_graph_ms(step, reps)


def stack_ideal_bytes(shapes: list[tuple[int, int]], m: int, bits: int, rank: int,
                      splits: dict[int, list[int]] | None = None) -> int:
    """Bytes a perfect kernel moves for the stack; a split shape reads one (rank, K) A per part."""
    extra_a = sum((len(splits[n]) - 1) * rank * k * 2 for n, k in shapes if splits and n in splits)
    return LAYERS * (sum(sum(ideal_parts(n, k, m, bits, GROUP, rank).values()) for n, k in shapes) + extra_a)


def cpu_us(fn: Callable[[], object], reps: int = 300) -> float:
    """Fastest of `reps` calls of fn() in microseconds (after 20 warm-ups): on a shared machine the
    minimum is the figure least disturbed by other processes."""
    for _ in range(20):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e6


def native_builds_us(x: torch.Tensor, layer: tuple) -> list[str]:
    """Microseconds per call of each build of fbserve's CPU kernel (cuda_ext.cpu_native.ISAS) on one layer,
    or why it cannot run here."""
    from cuda_ext import cpu_native

    before = os.environ.get(cpu_native.ISA_ENV)
    cols = []
    try:
        for isa in cpu_native.ISAS:
            os.environ[cpu_native.ISA_ENV] = isa
            cpu_native._load.cache_clear()
            why = cpu_native.native_reason()
            if why is not None:
                cols.append(f"n/a ({why})")
                continue
            group = cpu_native.NativeGroup([cpu_native.prepare_native(*layer)])
            cols.append(f"{cpu_us(lambda group=group: group(x)):.0f}")
    finally:
        if before is None:
            os.environ.pop(cpu_native.ISA_ENV, None)
        else:
            os.environ[cpu_native.ISA_ENV] = before
        cpu_native._load.cache_clear()
    return cols


def cpu_bench(m: int = 1) -> None:
    """CPU paths (torch's int4 CPU op + fp32 branch; each build of fbserve's own kernel) vs fp32 F.linear on
    SmolLM2-135M's linears."""
    from cuda_ext.cpu_native import ISAS

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# CPU: {torch.get_num_threads()} threads, torch {torch.__version__}, m={m}, fastest of 300 calls, "
          f"load average {load:.1f}")
    builds = " | ".join(f"fbserve-{isa} 3-bit + r32 us" for isa in ISAS)
    print(f"| layer (N x K) | fp32 F.linear us | torch int4 4-bit us | 3-bit us | 3-bit + rank-32 us | {builds} |")
    print("|---|---|---|---|---|" + "---|" * len(ISAS))
    for n, k in MODELS["SmolLM2-135M"]:
        x = torch.randn(m, k)
        w = torch.randn(n, k) * 0.02
        cols = [f"{cpu_us(lambda: F.linear(x, w)):.0f}"]
        for bits, rank in ((4, 0), (3, 0), (3, 32)):
            p, a, b = random_layer(n, k, bits, GROUP, rank=rank)
            cw = prepare_cpu(p)
            a_t = None if a is None else a.float().t().contiguous()
            b_t = None if b is None else b.float().t().contiguous()
            cols.append(f"{cpu_us(lambda cw=cw, a_t=a_t, b_t=b_t: cpu_matmul(x, cw, a_t, b_t)):.0f}")
        cols += native_builds_us(x, (p, a, b))
        print(f"| {n} x {k} | " + " | ".join(cols) + " |")


def kernel_profile(model: str, bits: int = 3, rank: int = 64, calls: int = 50) -> list[dict]:
    """Device time per kernel (torch.profiler) of one layer of each shape of `model`, m = 1, with and
    without the branch: which launch the branch's extra time is spent in."""
    from torch.profiler import ProfilerActivity, profile

    rows = []
    for n, k in MODELS[model]:
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        for r in (0, rank):
            op = ours_stack([(n, k)], bits, r, layers=1)[0]
            for _ in range(3):
                op(x)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(calls):
                    op(x)
                torch.cuda.synchronize()
            for e in prof.key_averages():
                us = getattr(e, "self_device_time_total", 0) / calls
                if us > 0:
                    rows.append({"shape": f"{n}x{k}", "rank": r, "kernel": e.key[:48], "us_per_call": us,
                                 "launches_per_call": e.count / calls})
            del op
            torch.cuda.empty_cache()
    print("| layer N x K | rank | kernel | device us per call | launches per call |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['rank']} | {r['kernel']} | {r['us_per_call']:.2f} | {r['launches_per_call']:.1f} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", nargs="+", default=["Llama-2-7B", "Llama-3-8B"], choices=sorted(MODELS))
    ap.add_argument("--m", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", type=Path, help="also write the rows as JSON")
    ap.add_argument("--variants", nargs="+", metavar="TEXT",
                    help="only the variants whose name contains one of these (e.g. 'fp16' 'ours 3-bit')")
    ap.add_argument("--cpu", action="store_true", help="time the CPU serving path instead")
    ap.add_argument("--profile", action="store_true",
                    help="device time per kernel of one layer per shape, 3-bit, rank 0 vs 64 (torch.profiler)")
    args = ap.parse_args(argv)
    if args.cpu:
        cpu_bench()
        return 0
    if not torch.cuda.is_available():
        print("bench/kernels.py needs a CUDA GPU; none found, nothing measured.")
        return 0
    dev = torch.cuda.get_device_name()
    if args.profile:
        prof = {m: kernel_profile(m) for m in args.model}
        if args.json:
            args.json.write_text(json.dumps({"device": dev, "profile": prof}, indent=1))
        return 0
    bw = copy_bandwidth()
    print(f"# {dev}, torch {torch.__version__}; d2d copy {bw / 1e12:.2f} TB/s (read + write)")
    rows = []
    for model in args.model:
        shapes = MODELS[model]
        variants, variant_shapes, variant_splits = variant_specs(model)
        if args.variants:
            variants = [v for v in variants if any(t in v[0] for t in args.variants)]
        base: dict[tuple[str, int], float] = {}
        for name, build, dtype, bits, rank in variants:
            try:
                ops = build()
            except Exception as e:  # noqa: BLE001 - a baseline torch lacks is reported, not fatal
                print(f"{model} {name}: unavailable ({type(e).__name__}: {e})")
                continue
            for m in args.m:
                if ("tensor-core" in name and m > 16) or ("(m=1)" in name and m > 1):
                    continue
                vshapes = variant_shapes.get(name, shapes)
                ms = run_stack(ops, vshapes, m, dtype, args.reps)
                ideal = stack_ideal_bytes(vshapes, m, bits, rank, variant_splits.get(name))
                base[(name, m)] = ms
                rows.append({"model": model, "variant": name, "m": m, "ms": ms,
                             "vs_fp16": base.get(("fp16 cuBLAS", m), float("nan")) / ms,
                             "vs_int4": base.get(("torch int4 g128", m), float("nan")) / ms,
                             "roofline": ideal / (ms * 1e-3) / bw})
                print(f"  measured: {model} {name} m={m}: {ms:.3f} ms", flush=True)  # survives a timeout
            del ops
            torch.cuda.empty_cache()
    print("| model | variant | m | ms/token | x fp16 | x torch int4 | of read roofline |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['variant']} | {r['m']} | {r['ms']:.3f} | {r['vs_fp16']:.2f} | "
              f"{r['vs_int4']:.2f} | {r['roofline']:.0%} |")
    if args.json:
        args.json.write_text(json.dumps({"device": dev, "copy_bw": bw, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
