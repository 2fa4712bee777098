"""Offline autotune: time candidate configs on this GPU and write the winners into
cuda_ext/configs/<arch>.json.  Never runs on the serving path.

Usage (needs a CUDA GPU): python -m cuda_ext.autotune [--model Llama-2-7B] [--bits 3] [--rank 64] [--write]
Without --write it prints the winning rules only.  Each candidate is timed as a served decode step runs
it: the model's layer stack (one layer per shape) with its rank-`--rank` branch, captured in a CUDA graph
(no launch overhead, which hid the differences when candidates were timed call by call).  For one row
the candidates include gemv_kernel's half2 / fp32 forms and the fused branch, so `--decode-m 1 --write`
sets those fields of the m = 1 rule from measurements on this GPU.
"""
from __future__ import annotations

import argparse
import itertools
import sys

import torch

from . import configs
from .configs import BranchConfig, GemmConfig
from .launch import quant_matmul, target_for
from .roofline import MODELS
from .testing import cuda_graph_ms, cuda_median_ms, random_layer


def gemm_candidates(decode: bool, m: int = 16) -> list[GemmConfig]:
    """Candidate configs: qgemm_kernel decode tiles for m <= 16, plus gemv_kernel tiles for m <= 4
    (block_m = the smallest GEMV_ROWS >= m; for one row also without half2 and with the fused branch);
    prefill tiles above."""
    if decode:
        grid = itertools.product([64, 128, 256], [4, 8], [1, 2], [1, 2, 4], [8, 16])
        tiles = [GemmConfig(16, n, w, s, wv, sk) for n, w, s, wv, sk in grid if not (n == 256 and w == 4)]
        if m <= max(configs.GEMV_ROWS):
            mr = min(r for r in configs.GEMV_ROWS if r >= m)
            grid = itertools.product([32, 64, 128], [2, 4, 8], [2, 4])
            gemv = [GemmConfig(mr, n, w, 1, wv, 16) for n, w, wv in grid if n * 16 // (32 * w) >= 4]
            if mr == 1:  # the one-row forms, on the tile that keeps one register layout (cuda_ext/README.md)
                gemv += [GemmConfig(1, 64, 4, 1, wv, 16, fused_branch=f, half2=h)
                         for wv, f, h in itertools.product([2, 4], [False, True], [True, False]) if f or not h]
            tiles = gemv + tiles
        return tiles
    grid = itertools.product([(64, 64), (64, 128), (128, 128)], [4, 8], [1, 2, 3], [1, 4])
    return [GemmConfig(bm, bn, w, s, 1.0, sk) for (bm, bn), w, s, sk in grid]


def tune_gemm(shapes: list[tuple[int, int]], m: int, bits: int, group: int = 128,
              rank: int = 64) -> tuple[GemmConfig, float]:
    """Best GemmConfig for x with m rows over a layer stack's shapes with rank-`rank` branches (one
    layer per shape, the stack captured in a CUDA graph: median ms of a replay)."""
    layers = [random_layer(n, k, bits, group, rank=rank, seed=i, device="cuda") for i, (n, k) in enumerate(shapes)]
    xs = [torch.randn(m, k, device="cuda", dtype=torch.float16) for _, k in shapes]
    best: tuple[GemmConfig, float] | None = None
    for cfg in gemm_candidates(m <= configs.DECODE_M_MAX, m):
        def stack(cfg=cfg) -> None:
            for (p, a, b), x in zip(layers, xs):
                quant_matmul(x, p, a, b, config=cfg)
        try:
            ms = cuda_graph_ms(stack)
        except Exception as e:  # noqa: BLE001 - a config that fails to compile/launch is skipped, loudly
            print(f"  skip {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:120]}", file=sys.stderr)
            continue
        print(f"  {cfg}: {ms:.3f} ms", file=sys.stderr)
        if best is None or ms < best[1]:
            best = (cfg, ms)
    if best is None:
        raise RuntimeError("no candidate config ran")
    return best


def tune_branch(shapes: list[tuple[int, int]], m: int, rank: int = 64) -> tuple[BranchConfig, float]:
    """Best BranchConfig for t = x @ A^T over the stack's K values (patches the table in memory)."""
    arch = target_for(torch.device("cuda")).arch
    from .launch import branch_down
    a_s = [torch.randn(rank, k, device="cuda", dtype=torch.float16) for _, k in shapes]
    xs = [torch.randn(m, k, device="cuda", dtype=torch.float16) for _, k in shapes]
    best: tuple[BranchConfig, float] | None = None
    table = configs.load_table(arch)
    saved = table["branch_down"]
    try:
        rows = [1] if m == 1 else [16] if m <= 16 else [32, 64]  # 1: branch_gemv_kernel
        for bm, bk, w, sp in itertools.product(rows, [64, 128, 256], [4, 8], [16, 64, 128]):
            cfg = BranchConfig(bm, bk, w, 1, sp)
            table["branch_down"] = [configs.as_rule(cfg)]
            ms = sum(cuda_median_ms(lambda a=a, x=x: branch_down(x, a)) for a, x in zip(a_s, xs))
            if best is None or ms < best[1]:
                best = (cfg, ms)
    finally:
        table["branch_down"] = saved
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cuda_ext.autotune", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="Llama-2-7B", choices=sorted(MODELS))
    ap.add_argument("--bits", type=int, default=3, choices=(2, 3, 4))
    ap.add_argument("--rank", type=int, default=64, help="the layers' FBQuant branch rank (0: none)")
    ap.add_argument("--write", action="store_true", help="write the winners into this arch's JSON table")
    ap.add_argument("--decode-m", type=int, nargs="+", metavar="M",
                    help="tune only the decode rules for these row counts (e.g. 1 4), nothing else")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("autotune needs a CUDA GPU; none found (the shipped tables stay as they are)", file=sys.stderr)
        return 1
    arch = target_for(torch.device("cuda")).arch
    shapes = MODELS[args.model]
    rules: list[tuple[str, dict]] = []
    plan = (("decode", 1, 1), ("decode", 2, 2), ("decode", 4, 4), ("decode", 16, 16), ("prefill", 64, 64),
            ("prefill", 512, None))
    if args.decode_m:
        plan = tuple(("decode", m, m) for m in args.decode_m)
    for kind, m, m_max in plan:
        cfg, ms = tune_gemm(shapes, m, args.bits, rank=args.rank)
        print(f"{arch} {kind} m={m}: {cfg} {ms:.3f} ms per layer stack")
        rules.append((kind, configs.as_rule(cfg, m_max=m_max)))
    for m, m_max in ((1, 1), (16, 16), (512, None)) if not args.decode_m else ():
        bcfg, ms = tune_branch(shapes, m)
        print(f"{arch} branch_down m={m}: {bcfg} {ms:.3f} ms")
        rules.append(("branch_down", configs.as_rule(bcfg, m_max=m_max)))
    if args.write:
        for kind, rule in rules:
            path = configs.write_rule(arch, kind, rule)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
