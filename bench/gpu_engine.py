"""Engine smoke test on CUDA with a RANDOM-weights Llama (SmolLM2-135M's shape; no checkpoint, no network).

Every decoder linear is RTN-quantized (3-bit g64 by default) with a rank-32 SVD branch of its error and
becomes an engine.quant_linear.QuantLinear, so the model runs the Triton kernels on CUDA.  Checks:
  1. every QuantLinear is on the `triton` path, none fell back;
  2. consistency: logits of a 24-token prompt + 16 greedy tokens, decoded step by step through the KV
     cache (decode kernel, m = 1), vs one cache-less forward of the whole sequence (prefill kernel,
     m = 40), vs the same forward on the `reference` path (cuda_ext.reference in fp32): relative error
     and top-1 agreement;
  3. eager decode speed of the model's forward (batch 1 and 4, tokens/s), where a batch-1 step's time
     goes (torch.profiler: ops by self CPU time and by device time), and the Engine end to end
     (1 and 4 concurrent greedy requests of 64 tokens through Engine.generate), decode steps eager and
     replayed from CUDA graphs (engine.cuda_graph_decode): tokens/s, no errors, graphs captured;
  4. graphed vs eager: logits of GraphDecoder.step (captured and replayed) vs the module path, batch 1-3.

    python bench/gpu_engine.py [--json OUT] [--layers 30] [--bits 3]
Without CUDA it runs a tiny 2-layer model on CPU through the Triton interpreter (only with
TRITON_INTERPRET=1 set before start: a dry run of the code, no numbers worth keeping).
Imports torch, cuda_ext, engine, models, quant.quantizer only (no server/, no fastapi/pydantic).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engine  # noqa: E402,F401  (before torch: OpenMP wait policy, see engine/__init__.py)
import torch  # noqa: E402
from torch import nn  # noqa: E402

from cuda_ext import pack  # noqa: E402
from engine.quant_linear import QuantLinear, kernel_paths  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from models.llama import Transformer, rope_inverse_frequencies  # noqa: E402
from quant.quantizer import quantize_rtn  # noqa: E402

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ByteTokenizer:
    """Minimal tokenizer for the Engine: token id -> one character; no EOS (requests run to max_tokens)."""

    eos_token_id = None

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab

    def __len__(self) -> int:
        return self.vocab

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) % self.vocab for c in text]

    def decode(self, ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool = False) -> str:
        return "".join(chr(32 + int(i) % 90) for i in ids)


def quantize_model(model: Transformer, bits: int, group: int, rank: int, dev: torch.device) -> int:
    """Replace every decoder nn.Linear by a QuantLinear (RTN codes + rank-`rank` SVD branch of the error)."""
    n = 0
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in LINEARS:
                lin = getattr(parent, name, None)
                if not isinstance(lin, nn.Linear):
                    continue
                w = lin.weight.detach().float()  # on dev: RTN, packing and the SVD run there (fast on a GPU)
                q = quantize_rtn(w, bits, group, clip_search=False)
                packed = pack(q.codes, q.scales, q.zeros, bits, group)
                a = b = None
                if rank:
                    u, s, vh = torch.linalg.svd(w - q.dequantize(), full_matrices=False)
                    root = s[:rank].sqrt()
                    a = (root[:, None] * vh[:rank]).half()
                    b = (u[:, :rank] * root[None, :]).half()
                bias = None if lin.bias is None else lin.bias.detach()
                setattr(parent, name, QuantLinear(packed, a, b, bias).to(dev))
                n += 1
    return n


def set_path(model: nn.Module, path: str) -> None:
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.requested_path = path
            m._select_path()  # noqa: SLF001 - a benchmark toggling the path of a built model


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.float(), b.float()
    return {"rel_err": float((a - b).abs().mean() / b.abs().mean()),
            "top1_agree": float((a.argmax(-1) == b.argmax(-1)).float().mean())}


@torch.no_grad()
def consistency(model: Transformer, dev: torch.device, vocab: int, path: str, prompt_len: int = 24,
                new: int = 16) -> dict:
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=g).to(dev)
    slots = torch.tensor([0], device=dev)
    tokens = prompt
    logits = model(prompt, torch.arange(prompt_len, device=dev)[None], slots)[:, -1:]  # prefill through the cache
    steps = [logits]
    for i in range(new):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], 1)
        pos = torch.tensor([[prompt_len + i]], device=dev)
        logits = model(nxt, pos, slots)  # decode kernel, m = 1
        steps.append(logits)
    dec = torch.cat(steps, 1)[:, :-1]  # predictions for positions prompt_len-1 .. end-1
    full = model(tokens)[:, prompt_len - 1:-1]  # one cache-less forward: prefill kernel
    set_path(model, "reference")
    ref = model(tokens)[:, prompt_len - 1:-1]
    set_path(model, path)
    return {"decode_vs_prefill": compare(dec, full), "triton_vs_reference": compare(full, ref),
            "decode_vs_reference": compare(dec, ref), "tokens": int(tokens.shape[1])}


@torch.no_grad()
def eager_speed(model: Transformer, dev: torch.device, vocab: int, batch: int, steps: int) -> float:
    slots = torch.arange(batch, device=dev)
    tok = torch.randint(0, vocab, (batch, 8), device=dev)
    model(tok, torch.arange(8, device=dev).expand(batch, 8), slots)
    nxt = tok[:, -1:]
    for warm in (True, False):
        sync(dev)
        t0 = time.perf_counter()
        for i in range(3 if warm else steps):
            pos = torch.full((batch, 1), 8 + i, device=dev)
            nxt = model(nxt, pos, slots, last_only=True)[:, -1].argmax(-1, keepdim=True)
        sync(dev)
    return batch * steps / (time.perf_counter() - t0)


@torch.no_grad()
def decode_profile(model: Transformer, dev: torch.device, vocab: int, steps: int = 8, rows: int = 12) -> dict:
    """Where an eager batch-1 decode step's time goes: torch.profiler over `steps` steps; the ops with
    the most self CPU time (Python-side launch cost) and the most device time, per step."""
    from torch.profiler import ProfilerActivity, profile

    slots = torch.arange(1, device=dev)
    nxt = torch.randint(0, vocab, (1, 1), device=dev)
    for i in range(3):  # warm (compiles) outside the profile
        nxt = model(nxt, torch.full((1, 1), 100 + i, device=dev), slots, last_only=True)[:, -1].argmax(-1, keepdim=True)
    sync(dev)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            logits = model(nxt, torch.full((1, 1), 110 + i, device=dev), slots, last_only=True)
            nxt = logits[:, -1].argmax(-1, keepdim=True)
        sync(dev)
    wall = (time.perf_counter() - t0) / steps
    events = prof.key_averages()

    def top(key: str) -> list[dict]:
        ranked = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:rows]
        return [{"op": e.key[:60], "calls_per_step": e.count / steps, "self_cpu_us": e.self_cpu_time_total / steps,
                 "device_us": getattr(e, "self_device_time_total", 0) / steps} for e in ranked]

    device_us = sum(getattr(e, "self_device_time_total", 0) for e in events) / steps
    return {"steps": steps, "wall_ms_per_step_profiled": wall * 1e3, "device_busy_ms_per_step": device_us / 1e3,
            "by_cpu": top("self_cpu_time_total"), "by_device": top("self_device_time_total")}


def engine_run(model: Transformer, vocab: int, requests: int, max_tokens: int, warm: bool = True,
               decode_graphs: bool | None = None, merge_projections: bool | None = None) -> dict:
    """Engine tokens/s.  The Engine merges q/k/v and gate/up on CUDA in place (engine.merge): every run
    after the first default one sees the merged model."""
    from engine.engine import Engine
    from engine.types import GenerationRequest, SamplingParams
    from models.loader import LoadedModel

    eng = Engine(LoadedModel(model, ByteTokenizer(vocab), "random-smollm2-shape", Path(".")), max_batch=requests,
                 max_seq_len=256, decode_graphs=decode_graphs, merge_projections=merge_projections)
    eng.start()
    g = torch.Generator().manual_seed(1)

    async def one(i: int):
        ids = torch.randint(0, vocab, (16,), generator=g).tolist()
        req = GenerationRequest(f"r{i}", ids, SamplingParams(max_tokens=max_tokens, temperature=0.0))
        return [ev async for ev in eng.generate(req)]

    async def all_():
        return await asyncio.gather(*[one(i) for i in range(requests)])

    try:
        if warm:
            asyncio.run(all_())  # warm-up (first launches compile, graphs capture)
        t0 = time.perf_counter()
        runs = asyncio.run(all_())
        dt = time.perf_counter() - t0
    finally:
        eng.shutdown()
    finish = [r[-1].finish_reason for r in runs]
    errors = [r[-1].error for r in runs if r[-1].error]
    ntok = sum(r[-1].completion_tokens or 0 for r in runs)
    return {"requests": requests, "max_tokens": max_tokens, "finish_reasons": finish, "errors": errors,
            "completion_tokens": ntok, "seconds": dt, "tokens_per_s": ntok / dt,
            "cuda_graph": eng.cuda_graph_status(), "merged_projections": eng.merged_projections_status()}


@torch.no_grad()
def graphed_profile(model: Transformer, dev: torch.device, vocab: int, steps: int = 20, rows: int = 12) -> dict:
    """A batch-1 decode step replayed from its CUDA graph: wall ms per step (replay + logits to the host),
    device busy ms, kernels launched per step and the kernels with the most device time (torch.profiler
    sees the kernels inside a graph replay)."""
    from torch.profiler import ProfilerActivity, profile

    from engine.cuda_graph_decode import GraphDecoder

    dec = GraphDecoder(model, max_batch=1, max_seq_len=256, capture=True)
    model(torch.randint(0, vocab, (1, 100), device=dev), torch.arange(100, device=dev)[None],
          torch.tensor([0], device=dev))
    for i in range(3):  # capture, then warm replays
        dec.step([1], [100], [0])
    sync(dev)
    t0 = time.perf_counter()
    for i in range(steps):
        dec.step([1 + i % 7], [100], [0])  # rewrites position 100: every step the same length
    wall = (time.perf_counter() - t0) / steps
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            dec.step([1 + i % 7], [100], [0])
        sync(dev)
    events = [e for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) > 0]
    ranked = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:rows]
    return {"wall_ms_per_step": wall * 1e3, "steps": steps,
            "device_busy_ms_per_step": sum(e.self_device_time_total for e in events) / steps / 1e3,
            "kernels_per_step": sum(e.count for e in events) / steps,
            "by_device": [{"op": e.key[:60], "calls_per_step": e.count / steps,
                           "device_us": e.self_device_time_total / steps} for e in ranked], **dec.status()}


@torch.no_grad()
def graph_consistency(model: Transformer, dev: torch.device, vocab: int, capture: bool) -> dict:
    """GraphDecoder.step (replayed graphs; `capture` False: the same static step eager) vs the module path
    on a second cache of the same model state: worst rel_err / top-1 agreement over batch 1, 2, 3."""
    from engine.cuda_graph_decode import GraphDecoder

    dec = GraphDecoder(model, max_batch=4, max_seq_len=256, capture=capture)  # cache: 5 slots
    g = torch.Generator().manual_seed(2)
    lengths = {0: 20, 1: 9, 2: 140, 3: 31} if capture else {0: 5, 1: 3, 2: 9, 3: 4}  # 140: the 256 bucket
    caches = {}
    for slot, n in lengths.items():
        model(torch.randint(0, vocab, (1, n), generator=g).to(dev), torch.arange(n, device=dev)[None],
              torch.tensor([slot], device=dev))
    worst = {"rel_err": 0.0, "top1_agree": 1.0}
    for slots in ([2], [0, 3], [3, 1, 2], [2], [0, 3]):  # the repeated batches replay their graphs
        toks = torch.randint(0, vocab, (len(slots),), generator=g).tolist()
        pos = [lengths[s] for s in slots]
        for layer in model.model.layers:  # the module path reads and writes the same cache: save it
            caches[id(layer)] = (layer.self_attn.kv_cache.k.clone(), layer.self_attn.kv_cache.v.clone())
        got = dec.step(toks, pos, slots)
        for layer in model.model.layers:
            layer.self_attn.kv_cache.k.copy_(caches[id(layer)][0])
            layer.self_attn.kv_cache.v.copy_(caches[id(layer)][1])
        want = model(torch.tensor(toks, device=dev)[:, None], torch.tensor(pos, device=dev)[:, None],
                     torch.tensor(slots, device=dev), last_only=True)[:, 0].cpu()
        c = compare(got, want)
        worst = {"rel_err": max(worst["rel_err"], c["rel_err"]), "top1_agree": min(worst["top1_agree"], c["top1_agree"])}
        for s in slots:
            lengths[s] += 1
    return {**worst, **dec.status()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 30 on CUDA, 2 on CPU)")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--rank", type=int, default=32)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    from cuda_ext import interpreting
    if not cuda and not interpreting():
        print("bench/gpu_engine.py needs CUDA (or TRITON_INTERPRET=1 for a CPU dry run); nothing run")
        return 0
    dev = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    cfg = ModelConfig() if cuda else ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=256,
                                                 num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    cfg.num_hidden_layers = args.layers or (30 if cuda else 2)
    dtype = torch.float16 if cuda else torch.float32
    t0 = time.perf_counter()
    with torch.device(dev):
        model = Transformer(cfg)
    model = model.to(dtype).eval()
    model.register_buffer("inv_freq", rope_inverse_frequencies(cfg).to(dev), persistent=False)  # fp32, as loaded
    nq = quantize_model(model, args.bits, 64, args.rank, dev)
    path = "auto" if cuda else "triton"
    if not cuda:
        set_path(model, path)  # CPU dry run: the interpreter instead of the cpu_int4 path
        os.environ["FBSERVE_CPU_DECODE"] = "0"  # the engine's CPU fast path wants cpu_int4 layers
    model.setup_cache(4, 256)
    out: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu (interpreter dry run)",
                 "model": {"shape": "SmolLM2-135M" if cuda else "tiny", "layers": cfg.num_hidden_layers,
                           "bits": args.bits, "group": 64, "rank": args.rank, "quant_linears": nq,
                           "dtype": str(dtype).replace("torch.", ""), "build_s": time.perf_counter() - t0}}
    paths = kernel_paths()
    out["kernel_paths"] = paths
    want = "triton"
    out["all_triton"] = all(r["path"] == want and r["fallback"] is None for r in paths if r["device"] != "cpu") \
        if cuda else all(r["path"] == want for r in paths)
    out["consistency"] = consistency(model, dev, cfg.vocab_size, path, new=16 if cuda else 3)
    if cuda:
        out["eager_tokens_per_s"] = {f"batch{b}": eager_speed(model, dev, cfg.vocab_size, b, 32) for b in (1, 4)}
        try:  # diagnostics only: a profiler problem must not hide the checks above
            out["decode_profile"] = decode_profile(model, dev, cfg.vocab_size)
        except Exception as e:  # noqa: BLE001 - reported in the JSON
            out["decode_profile"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    try:  # a failed capture must not hide the eager checks: reported, and `ok` is false
        out["graph_vs_eager"] = graph_consistency(model, dev, cfg.vocab_size, capture=cuda)
    except Exception as e:  # noqa: BLE001 - reported in the JSON
        out["graph_vs_eager"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    if cuda:
        try:  # diagnostics only, as decode_profile
            out["graphed_profile"] = graphed_profile(model, dev, cfg.vocab_size)
        except Exception as e:  # noqa: BLE001 - reported in the JSON
            out["graphed_profile"] = {"error": f"{type(e).__name__}: {e}"[:300]}
        # q/k/v and gate/up apart, then (every later Engine) merged: the same run times both layouts
        out["engine_graphs_batch1_apart"] = engine_run(model, cfg.vocab_size, 1, 64, merge_projections=False)
        out["engine"] = engine_run(model, cfg.vocab_size, 4, 64, decode_graphs=False)
        out["engine_batch1"] = engine_run(model, cfg.vocab_size, 1, 64, warm=False, decode_graphs=False)  # compiled
        out["engine_graphs"] = engine_run(model, cfg.vocab_size, 4, 64)
        out["engine_graphs_batch1"] = engine_run(model, cfg.vocab_size, 1, 64)
    else:
        out["engine"] = engine_run(model, cfg.vocab_size, 1, 2, warm=False)
        out["engine_graphs"] = engine_run(model, cfg.vocab_size, 1, 2, warm=False, decode_graphs=True,
                                          merge_projections=True)  # the static step on merged layers
    runs = [v for k, v in out.items() if k.startswith("engine")]
    out["ok"] = bool(out["all_triton"] and not any(r["errors"] for r in runs)
                     and all(f == "length" for r in runs for f in r["finish_reasons"])
                     and out["consistency"]["triton_vs_reference"]["rel_err"] < 0.05
                     and out["graph_vs_eager"].get("rel_err", 1.0) < 0.01
                     and (not cuda or out["engine_graphs"]["cuda_graph"]["enabled"]))
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
