"""Ablation of FBQuant's optimisation on real layers of a model (one layer at a time, full-precision inputs).

    python -m quant.ablation [--model default] [--layers 3.self_attn.q_proj,15.mlp.gate_proj,...]
                             [--bits 3,2] [--group-size 64] [--rank 32] [--rounds 6] [--n-samples 16] [--seqlen 512]

Prints a markdown table of relative output errors tr(E H E^T) / tr(W H W^T) (lower is better) for:
  rtn, gptq                      no branch
  gptq+qera                      the strongest no-feedback baseline, and FBQuant's start
  naive-ste (rtn)                gradient descent on A, B through a straight-through estimator of a
                                 min-max RTN, from the RTN+QERA branch: the gradient is exactly 0
  sg-gd (rtn)                    Adam on A, B with Q = RTN(W - BA) re-evaluated each step, stop-gradient
  alt (rtn)                      C = RTN(W - S), S = wSVD(W - C)
  alt (gptq)                     C = GPTQ(W - S), S = wSVD(W - C)                 (FB-GPTQ)
  alt + scales                   ... + least-squares scales given the codes
  fbquant                        ... + GPTQ on the Gram matrix with the branch directions projected out
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import Tensor

from quant.calibration import calibration_tokens
from quant.fbquant import FBQuantConfig, fbquant, ste_gradient
from quant.gptq import gptq, small_op_threads
from quant.lowrank import Whitener, branch_product, relative_output_error, whitened_branch
from quant.quantizer import quantize_rtn

DEFAULT_LAYERS = ("3.self_attn.q_proj", "15.self_attn.o_proj", "15.mlp.gate_proj", "15.mlp.down_proj")


class _Stop(Exception):
    pass


@torch.no_grad()
def linear_input_grams(model, tokens: Tensor, names: list[str], batch_size: int = 4) -> dict[str, Tensor]:
    """H = X^T X / tokens (K, K) of the inputs of the named linears (HF names) under the unquantized model.

    Each forward stops once every named linear has seen its input.
    """
    mods = dict(model.named_modules())
    sums: dict[str, Tensor] = {}
    count = {"tokens": 0}
    seen: set[str] = set()  # named linears reached in the current batch; stop once all are
    handles = []
    for name in names:
        def hook(_m, args, name=name):
            x = args[0].float().reshape(-1, args[0].shape[-1])
            if name not in seen:
                sums[name] = sums.get(name, 0) + x.T @ x
                seen.add(name)
            if len(seen) == 1:
                count["tokens"] += x.shape[0]
            if len(seen) == len(names):
                raise _Stop
        handles.append(mods[name].register_forward_pre_hook(hook))
    try:
        for i in range(0, tokens.shape[0], batch_size):
            seen.clear()
            try:
                model(tokens[i:i + batch_size])
            except _Stop:
                pass
    finally:
        for hd in handles:
            hd.remove()
    return {n: s / count["tokens"] for n, s in sums.items()}


def _sg_gd(w: Tensor, h: Tensor, bits: int, g: int, a: Tensor, b: Tensor, steps: int, lr: float) -> float:
    """Adam on A, B with W_F = stopgrad(RTN(W - BA)) + BA, Q re-evaluated every step; best error."""
    a = a.float().clone().requires_grad_(True)
    b = b.float().clone().requires_grad_(True)
    opt = torch.optim.Adam([a, b], lr=lr)
    ref = float(((w @ h) * w).sum())
    best = float("inf")
    for _ in range(steps):
        with torch.no_grad():
            s = b @ a
            c = quantize_rtn(w - s, bits, g).dequantize()
            best = min(best, relative_output_error(c + branch_product(a.half(), b.half()), w, h))
        e = c + b @ a - w
        loss = ((e @ h) * e).sum() / ref
        opt.zero_grad()
        loss.backward()
        opt.step()
    return best


def _naive_ste(w: Tensor, h: Tensor, bits: int, g: int, a: Tensor, b: Tensor, steps: int, lr: float) -> tuple[float, float]:
    """Gradient descent with momentum on A, B through the STE of a min-max RTN (nothing clips) from
    (a, b); returns (largest |gradient| seen, final error of RTN(W - BA) + BA): nothing ever moves."""
    a, b = a.float().clone(), b.float().clone()
    m = {"a": torch.zeros_like(a), "b": torch.zeros_like(b)}
    biggest = 0.0
    for _ in range(steps):
        da, db, _clipped = ste_gradient(w, h, a, b, bits, g, clip_search=False)
        biggest = max(biggest, float(da.abs().max()), float(db.abs().max()))
        m["a"], m["b"] = 0.9 * m["a"] + da, 0.9 * m["b"] + db
        a, b = a - lr * m["a"], b - lr * m["b"]
    c = quantize_rtn(w - b @ a, bits, g, clip_search=False).dequantize()
    return biggest, relative_output_error(c + branch_product(a.half(), b.half()), w, h)


def ablate_layer(w: Tensor, h: Tensor, bits: int, g: int, rank: int, rounds: int) -> dict[str, float]:
    w = w.float()
    wh = Whitener(h)
    out: dict[str, float] = {}
    timing: dict[str, float] = {}
    rtn = quantize_rtn(w, bits, g)
    out["rtn"] = relative_output_error(rtn.dequantize(), w, h)
    q = gptq(w, h, bits, g)
    out["gptq"] = relative_output_error(q.dequantize(), w, h)
    a, b = whitened_branch(w - q.dequantize(), rank, wh)
    out["gptq+qera"] = relative_output_error(q.dequantize() + branch_product(a, b), w, h)
    ra, rb = whitened_branch(w - rtn.dequantize(), rank, wh)
    out["rtn+qera"] = relative_output_error(rtn.dequantize() + branch_product(ra, rb), w, h)
    grad, out["naive-ste (rtn)"] = _naive_ste(w, h, bits, g, ra, rb, steps=20, lr=1e-3)
    out["_ste_max_grad"] = grad
    out["sg-gd (rtn)"] = _sg_gd(w, h, bits, g, ra, rb, steps=60, lr=1e-3)
    variants = {
        "alt (rtn)": FBQuantConfig(rounds=rounds, base="rtn", projection=0.0, refit_scales=False),
        "alt (gptq)": FBQuantConfig(rounds=rounds, projection=0.0, refit_scales=False),
        "alt + scales": FBQuantConfig(rounds=rounds, projection=0.0),
        "fbquant": FBQuantConfig(rounds=rounds),
    }
    for name, cfg in variants.items():
        t0 = time.perf_counter()
        start = rtn if cfg.base == "rtn" else q
        out[name] = fbquant(w, h, bits, g, rank, cfg, wh, start=start).error
        timing[name] = time.perf_counter() - t0
    out["_seconds_fbquant"] = timing["fbquant"]
    return out


def main(argv: list[str] | None = None) -> int:
    from models.loader import load_model

    p = argparse.ArgumentParser(prog="python -m quant.ablation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--layers", default=",".join(DEFAULT_LAYERS))
    p.add_argument("--bits", default="3,2")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--rounds", type=int, default=FBQuantConfig().rounds)
    p.add_argument("--n-samples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    lm = load_model(args.model)
    names = [f"model.layers.{s}" for s in args.layers.split(",")]
    tokens = calibration_tokens(lm.tokenizer, None, args.n_samples, args.seqlen, args.seed)
    grams = linear_input_grams(lm.model, tokens, names)
    mods = dict(lm.model.named_modules())
    print(f"model {args.model}, g{args.group_size}, rank {args.rank}, {args.rounds} rounds, "
          f"calibration {args.n_samples}x{args.seqlen} WikiText-2 valid; relative output error (lower is better)\n")
    header = None
    notes: list[str] = []
    for name in names:
        for bits in (int(b) for b in args.bits.split(",")):
            with small_op_threads(torch.device("cpu")):
                r = ablate_layer(mods[name].weight.data, grams[name], bits, args.group_size, args.rank, args.rounds)
            cols = [k for k in r if not k.startswith("_")]
            if header is None:
                header = cols
                print("| layer, bits | " + " | ".join(cols) + " | fbquant vs gptq+qera |")
                print("|---" * (len(cols) + 2) + "|")
            gain = 1 - r["fbquant"] / r["gptq+qera"]
            print(f"| {name.removeprefix('model.layers.')}, {bits} | "
                  + " | ".join(f"{r[c]:.5f}" for c in cols) + f" | -{100 * gain:.1f}% |", flush=True)
            notes.append(f"{name} {bits}-bit: naive-STE max |grad| {r['_ste_max_grad']:.1e}, "
                         f"fbquant {r['_seconds_fbquant']:.1f} s")
    print()
    for line in notes:
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
