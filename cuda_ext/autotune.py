"""Offline autotune: time candidate configs on this GPU and write the winners into
cuda_ext/configs/<arch>.json.  Never runs on the serving path.

Usage (needs a CUDA GPU): python -m cuda_ext.autotune [--model Llama-2-7B] [--bits 3] [--write]
Without --write it prints the winning rules only.
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
from .testing import cuda_median_ms, random_layer


def gemm_candidates(decode: bool, m: int = 16) -> list[GemmConfig]:
    """Candidate configs: qgemm_kernel decode tiles for m <= 16, plus gemv_kernel tiles for m <= 4
    (block_m = the smallest GEMV_ROWS >= m); prefill tiles above."""
    if decode:
        grid = itertools.product([64, 128, 256], [4, 8], [1, 2], [1, 2, 4], [8, 16])
        tiles = [GemmConfig(16, n, w, s, wv, sk) for n, w, s, wv, sk in grid if not (n == 256 and w == 4)]
        if m <= max(configs.GEMV_ROWS):
            mr = min(r for r in configs.GEMV_ROWS if r >= m)
            grid = itertools.product([32, 64, 128], [2, 4, 8], [2, 4])
            tiles = [GemmConfig(mr, n, w, 1, wv, 16) for n, w, wv in grid if n * 16 // (32 * w) >= 4] + tiles
        return tiles
    grid = itertools.product([(64, 64), (64, 128), (128, 128)], [4, 8], [1, 2, 3], [1, 4])
    return [GemmConfig(bm, bn, w, s, 1.0, sk) for (bm, bn), w, s, sk in grid]


def tune_gemm(shapes: list[tuple[int, int]], m: int, bits: int, group: int = 128) -> tuple[GemmConfig, float]:
    """Best GemmConfig for x with m rows over a layer stack's shapes (summed median time)."""
    layers = [random_layer(n, k, bits, group, seed=i, device="cuda")[0] for i, (n, k) in enumerate(shapes)]
    xs = [torch.randn(m, k, device="cuda", dtype=torch.float16) for _, k in shapes]
    best: tuple[GemmConfig, float] | None = None
    for cfg in gemm_candidates(m <= configs.DECODE_M_MAX, m):
        try:
            ms = sum(cuda_median_ms(lambda p=p, x=x: quant_matmul(x, p, config=cfg)) for p, x in zip(layers, xs))
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
        cfg, ms = tune_gemm(shapes, m, args.bits)
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
