"""`fbserve quantize`: quantize a model into a checkpoint directory.

    fbserve quantize --model default|PATH --method rtn|gptq|svd|lqer|qera|fbquant --bits 3 --group-size 128
                     --rank 32 --out DIR [--base rtn|gptq] [--calib FILE] [--n-samples N] [--seqlen L]
                     [--seed S] [--device D] [--rounds R] [--act-order] [--eval-windows W]
                     [--qdec-aware K_CHUNK [--qdec-mix L]]

server/cli.py calls `register(subparsers)`; `python -m quant.cli ...` runs it alone.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from quant.calibration import CalibrationDataError
from quant.checkpoint import CheckpointError
from quant.fbquant import FBQuantConfig
from quant.methods import BASES, METHODS, QuantConfig
from quant.quantizer import SUPPORTED_BITS, SUPPORTED_GROUPS

log = logging.getLogger("fbserve.quant")


def add_arguments(p: argparse.ArgumentParser) -> None:
    fb = FBQuantConfig()
    p.add_argument("--model", default="default", help="'default' (embedded SmolLM2-135M-Instruct), a HF directory or a .gguf file")
    p.add_argument("--method", choices=METHODS, default="fbquant")
    p.add_argument("--bits", type=int, choices=SUPPORTED_BITS, default=3)
    p.add_argument("--group-size", type=int, choices=SUPPORTED_GROUPS, default=128)
    p.add_argument("--rank", type=int, default=32, help="low-rank branch rank (svd, lqer, qera, fbquant)")
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    p.add_argument("--base", choices=BASES, default=None,
                   help="quantizer under the branch (default: rtn for svd/lqer/qera, gptq for fbquant)")
    p.add_argument("--calib", default=None, help="calibration text file (default: WikiText-2 validation "
                   "under $FBSERVE_DATA or ../shared/data)")
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="where layers are quantized: cpu, cuda, cuda:1, ...")
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ damping (share of mean diag H)")
    p.add_argument("--act-order", action="store_true", help="GPTQ columns by decreasing diag(H)")
    p.add_argument("--rounds", type=int, default=fb.rounds, help="FBQuant quantize/refit rounds")
    p.add_argument("--projection", type=float, default=fb.projection,
                   help="FBQuant: share of the branch directions projected out of GPTQ's Gram matrix")
    p.add_argument("--qdec-aware", type=int, default=0, metavar="K_CHUNK",
                   help="quantize for QDEC at this k_chunk: each token's K_CHUNK largest |x| per 1024 "
                   "channels leave the Gram matrix (their error is fetched back at decode); 0: off")
    p.add_argument("--qdec-mix", type=float, default=QuantConfig.qdec_mix,
                   help="with --qdec-aware: share of the full Gram matrix kept in the objective")
    p.add_argument("--eval-windows", type=int, default=8,
                   help="WikiText-2 test windows for the quality figures in quantization.json (0: skip)")
    p.add_argument("--eval-ctx", type=int, default=512)
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    try:
        cfg = QuantConfig(method=args.method, bits=args.bits, group_size=args.group_size, rank=args.rank,
                          base=args.base, damp=args.damp, act_order=args.act_order,
                          fb=FBQuantConfig(rounds=args.rounds, projection=args.projection),
                          qdec_k_chunk=args.qdec_aware, qdec_mix=args.qdec_mix)
    except ValueError as e:
        print(f"fbserve quantize: {e}", file=sys.stderr)
        return 2
    from quant.quantize import quantize_checkpoint

    try:
        out = quantize_checkpoint(args.model, cfg, args.out, calib=args.calib, n_samples=args.n_samples,
                                  seqlen=args.seqlen, seed=args.seed, device=args.device,
                                  batch_size=args.batch_size, eval_windows=args.eval_windows,
                                  eval_ctx=args.eval_ctx, progress=not args.no_progress)
    except (CalibrationDataError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"fbserve quantize: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


def register(subparsers) -> None:
    """Add `quantize` to the `fbserve` command's subparsers."""
    p = subparsers.add_parser("quantize", help="quantize a model into a checkpoint directory",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    """`python -m quant.cli ...`: the same as `fbserve quantize ...`."""
    from server.cli import main as fbserve

    return fbserve(["quantize", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
