"""Why QDEC recovers what it does: per linear, the share of the output error energy that a selection of
input channels removes, on real activations.

    python bench/qdec_analysis.py --model DIR [--tokens 512] [--k 8,16,32,64] --out bench/out/qdec/analysis.json

For each QuantLinear of the checkpoint, with X (T, K) its inputs in the quantized model on the first
`--tokens` tokens of WikiText-2 test, R = W - W_hat (fp32, the true residual) and R_q its stored 4-bit
version: E0 = ||X R^T||^2 is the output error energy without QDEC, and a selection mask M (per token)
leaves ||X R^T - (X * M) R_q^T||^2. Reported: 1 - left / E0 ("error energy removed") per selection, the
share of ||x||^2 in the selected channels ("xshare"), the per-token removal's median over tokens
("exact_median_token": the pooled figure is dominated by high-norm tokens), and the ceiling (every
channel corrected: only the 4-bit quantization error of R is left). Selections: exact per-chunk top-k
of |x| (QDEC), random, static (calibration mean |x|), and, as a diagnostic only, `weighted`: top-k of
|x_k| * ||R_q[:, k]|| (the channel's actual contribution scale).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    import torch

    from cuda_ext.qdec_reference import CHUNK, dequant_rows, exact_topk
    from engine import qdec
    from models.loader import load_model
    from quant.eval import token_windows, wikitext2_text
    from quant.qdec import served_weight

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--reference", default="default")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--k", default="8,16,32,64")
    p.add_argument("--out", default="bench/out/qdec/analysis.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    ks = [int(v) for v in args.k.split(",")]

    lm = load_model(args.model)
    q = qdec.attach(lm.model, lm.path, mode="cpu", k_chunk=0)
    assert q.enabled, q.reason
    ref = dict(load_model(args.reference).model.named_modules())
    toks = token_windows(lm.tokenizer, wikitext2_text(), args.tokens, 1)
    acts: dict[str, torch.Tensor] = {}
    mods = dict(lm.model.named_modules())
    hooks = [mods[n].register_forward_hook(
        lambda m, i, o, n=n: acts.__setitem__(n, i[0].detach().reshape(-1, i[0].shape[-1]).float()))
        for n in q.layers]
    with torch.inference_mode():
        lm.model(toks)
    for h in hooks:
        h.remove()

    def topk_by(score: torch.Tensor, k: int) -> torch.Tensor:
        parts = []
        for c0 in range(0, score.shape[1], CHUNK):
            seg = score[:, c0:c0 + CHUNK]
            parts.append(seg.topk(min(k, seg.shape[1]), dim=1).indices + c0)
        return torch.cat(parts, 1)

    gen = torch.Generator().manual_seed(0)
    per_layer = {}
    with torch.inference_mode():
        for name, layer in q.layers.items():
            x = acts[name]  # (T, K)
            w = ref[name].weight.detach().float()
            r = w - served_weight(mods[name])  # (N, K)
            rq_t = dequant_rows(layer.rcodes, layer.rscales.cpu())  # (K, N)
            e = x @ r.t()  # (T, N) the output error of the uncorrected layer
            e0 = float((e ** 2).sum())
            col = rq_t.norm(dim=1)  # (K,) ||R_q[:, k]||
            out = {"kind": layer.kind, "K": x.shape[1], "E0_rel": e0 / float(((x @ w.t()) ** 2).sum()),
                   "all": 1 - float(((e - x @ rq_t) ** 2).sum()) / e0}
            # what share of E0 each input channel carries on average (diagonal part): |x_k|^2 ||R[:,k]||^2
            for k in ks:
                sels = {"exact": exact_topk(x, k), "weighted": topk_by(x.abs() * col[None], k),
                        "random": topk_by(torch.rand(x.shape, generator=gen), k)}
                rank = layer.static_rank
                st = torch.cat([rank[(rank >= c0) & (rank < c0 + CHUNK)][:k] for c0 in range(0, x.shape[1], CHUNK)])
                sels["static"] = st[None].expand(x.shape[0], -1)
                for s, idx in sels.items():
                    xm = torch.zeros_like(x).scatter_(1, idx, x.gather(1, idx))
                    left = float(((e - xm @ rq_t) ** 2).sum())
                    out[f"{s}:{k}"] = 1 - left / e0
                    if s in ("exact", "random"):  # per token, then the median: not dominated by high-norm tokens
                        per_tok = 1 - ((e - xm @ rq_t) ** 2).sum(1) / (e ** 2).sum(1).clamp_min(1e-30)
                        out[f"{s}_median_token:{k}"] = float(per_tok.median())
                    if s == "exact":
                        out[f"xshare:{k}"] = float((xm ** 2).sum() / (x ** 2).sum())
            per_layer[name] = out
    # summaries: E0-weighted mean over layers, per layer type and overall
    by_kind: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for name, o in per_layer.items():
        for key, v in o.items():
            if key in ("kind", "K"):
                continue
            by_kind[o["kind"]][key].append(v)
            by_kind["all"][key].append(v)
    summary = {kind: {key: sum(v) / len(v) for key, v in d.items()} for kind, d in by_kind.items()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"tokens": args.tokens, "summary": summary, "layers": per_layer}, indent=1))
    cols = (["all"] + [f"{s}:{k}" for k in ks for s in ("exact", "weighted", "static", "random")]
            + [f"exact_median_token:{k}" for k in ks] + [f"xshare:{k}" for k in ks])
    print("| layer type | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for kind in ("qkv", "o", "gate_up", "down", "all"):
        print(f"| {kind} | " + " | ".join(f"{100 * summary[kind][c]:.1f}" for c in cols) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
