"""The rows of bench/decode.py that run in the project's environment, one subprocess per row.

`python bench/_decode_workers.py` reads a JSON job on stdin and prints one JSON result line, so that
each engine's peak RSS is its own (ru_maxrss of this process: model load plus generation).

Kinds of job:
  ours          the real `Engine` (worker thread + asyncio stream) on `spec` ("default" = fp32, or a
                quantized checkpoint directory); optionally a torch.profiler table of bare decode steps
  transformers  `AutoModelForCausalLM.generate`, greedy, min_new_tokens = max_new_tokens

Timing, the same for every row: TTFT = request start to first token (prefill + first sample);
decode tok/s = (tokens - 1) / (time of last token - time of first token).
"""
from __future__ import annotations

import asyncio
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WARMUP_TOKENS = 8  # one short generation first: page in weights, size allocator caches


def _timing(start: float, stamps: list[float], token_ids: list[int]) -> dict:
    decode_s = stamps[-1] - stamps[0]
    return {"ttft_s": stamps[0] - start, "token_ids": token_ids,
            "decode_tok_s": (len(stamps) - 1) / decode_s if decode_s > 0 else None}


def _summary(runs: list[dict]) -> dict:
    return {
        "decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs),
        "decode_tok_s_runs": [r["decode_tok_s"] for r in runs],
        "ttft_s": statistics.median(r["ttft_s"] for r in runs),
        "token_ids": runs[-1]["token_ids"],
    }


def _memory() -> dict:
    """Peak RSS (ru_maxrss, KiB on Linux) and current RSS of this process, in MB."""
    rss = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_end_mb": rss / 1024}


# ---- our engine -------------------------------------------------------------------------------------
async def _engine_run(engine, rid: str, prompt_ids: list[int], tokens: int) -> dict:
    from engine.types import GenerationRequest, SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    stamps, ids = [], []
    start = time.perf_counter()
    async for ev in engine.generate(GenerationRequest(rid, prompt_ids, params)):
        now = time.perf_counter()
        if ev.error:
            raise RuntimeError(f"engine error: {ev.error}")
        for tok in ev.token_ids:  # one token per event today; stamp each all the same
            stamps.append(now)
            ids.append(tok)
    if len(ids) != tokens:
        raise RuntimeError(f"engine produced {len(ids)} tokens, asked for {tokens}")
    return _timing(start, stamps, ids)


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def rtn_proxy(model, bits: int, group_size: int, rank: int) -> None:
    """Swap the decoder's projections for QuantLinear layers of the same shapes, in place: a SPEED proxy.

    Codes are plain min-max round-to-nearest of the fp32 weights and the rank-`rank` branch is zeros:
    the kernels, shapes and bytes are those of an FBQuant checkpoint of these settings, the accuracy is
    not. lm_head stays as it is (fp32), as in a checkpoint that leaves it unquantized.
    """
    from cuda_ext import pack
    from engine.quant_linear import QuantLinear

    maxq = (1 << bits) - 1
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in PROJECTIONS:
                lin = getattr(parent, name, None)
                if lin is None:
                    continue
                w = lin.weight.detach().float()  # (N, K)
                n, k = w.shape
                groups = -(-k // group_size)  # a partial last group when g does not divide K (576 = 4.5 x 128)
                g = torch.nn.functional.pad(w, (0, groups * group_size - k)).reshape(n, groups, group_size)
                lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
                scale = ((hi - lo) / maxq).clamp(min=1e-8)
                zero = (-lo / scale).round().clamp(0, maxq)
                codes = (g / scale[..., None] + zero[..., None]).round().clamp(0, maxq).reshape(n, -1)[:, :k]
                packed = pack(codes.to(torch.uint8), scale.half(), zero.half(), bits, group_size)
                a, b = torch.zeros(rank, k, dtype=torch.float16), torch.zeros(n, rank, dtype=torch.float16)
                setattr(parent, name, QuantLinear(packed, a, b, lin.bias))


def _linear_impl(model) -> dict:
    """Which module classes carry the decoder's projections (nn.Linear = unquantized fp path)."""
    kinds: dict[str, int] = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in PROJECTIONS:
            path = getattr(module, "path", None)  # QuantLinear's kernel path (cpu_int4, reference, ...)
            key = f"{type(module).__module__}.{type(module).__name__}" + (f"[{path}]" if path else "")
            kinds[key] = kinds.get(key, 0) + 1
    return kinds


def run_ours(job: dict) -> dict:
    from engine.engine import Engine
    from models.loader import load_model

    t0 = time.perf_counter()
    loaded = load_model(job["spec"])
    if job.get("proxy"):
        rtn_proxy(loaded.model, **job["proxy"])
    load_s = time.perf_counter() - t0
    prompt_ids, tokens = job["prompt_ids"], job["tokens"]
    engine = Engine(loaded, max_batch=1, max_seq_len=len(prompt_ids) + tokens + 8,
                    decode_threads=job.get("decode_threads"))
    engine.start()
    try:
        asyncio.run(_engine_run(engine, "warmup", prompt_ids, min(WARMUP_TOKENS, tokens)))
        runs = [asyncio.run(_engine_run(engine, f"r{i}", prompt_ids, tokens)) for i in range(job["repeats"])]
        weights = engine.weight_bytes() if hasattr(engine, "weight_bytes") else None
    finally:
        engine.shutdown()
    out = {**_summary(runs), "load_s": load_s, "linear_impl": _linear_impl(loaded.model),
           "engine_threads": engine.threads,
           "weight_bytes": weights, **_memory(),
           # the manifest's scalar fields (method, bits, group_size, rank, bits_per_weight...), not its tables
           "quantization": {k: v for k, v in (loaded.quantization or {}).items() if not isinstance(v, (dict, list))}}
    if job.get("profile"):  # after the memory reading: the profiler's trace takes GBs of its own
        out["profile"] = profile_decode(loaded.model, prompt_ids, tokens, job.get("profile_rows", 20))
    return out


# ---- profile of bare decode steps -------------------------------------------------------------------
def _prefill(model, prompt_ids: list[int]) -> int:
    """Fill cache slot 0 with the prompt; return the greedy first token (as Engine._prefill does)."""
    hidden = model.hidden_states(torch.tensor([prompt_ids]), torch.arange(len(prompt_ids))[None], torch.tensor([0]))
    return int(model.lm_head(hidden[0, -1]).argmax())


def _decode(model, tok: int, start: int, steps: int) -> float:
    """Seconds per token of the model's decode step alone (what Engine._decode_step calls), greedy."""
    slots = torch.tensor([0])
    t0 = time.perf_counter()
    for i in range(steps):
        tok = int(model(torch.tensor([[tok]]), torch.tensor([[start + i]]), slots, last_only=True)[0, 0].argmax())
    return (time.perf_counter() - t0) / steps


def profile_decode(model, prompt_ids: list[int], tokens: int, rows: int) -> dict:
    """Wall time per bare decode step, and torch.profiler's per-op self CPU time per decode step.

    Runs in cache slot 0 after the engine has shut down; the prefill stays outside the profiled region.
    """
    from torch.profiler import ProfilerActivity, profile

    steps, n = max(1, tokens - 1), len(prompt_ids)
    with torch.inference_mode():
        bare_s = _decode(model, _prefill(model, prompt_ids), n, steps)
        first = _prefill(model, prompt_ids)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            profiled_s = _decode(model, first, n, steps)
    events = prof.key_averages(group_by_input_shape=True)  # e.g. lm_head's mm apart from the layers' mm
    total_self = sum(e.self_cpu_time_total for e in events)
    ops = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    return {
        "steps": steps,
        "bare_ms_per_token": bare_s * 1e3,
        "profiled_ms_per_token": profiled_s * 1e3,
        "ops_self_ms_per_token": total_self / 1e3 / steps,
        "op_calls_per_token": sum(e.count for e in events) / steps,
        "ops": [{"name": e.key, "shapes": str(e.input_shapes), "self_ms_per_token": e.self_cpu_time_total / 1e3 / steps,
                 "calls_per_token": e.count / steps,
                 "share": e.self_cpu_time_total / total_self if total_self else 0.0} for e in ops],
    }


# ---- transformers -------------------------------------------------------------------------------------
class _Stamps:
    """A generate() streamer that only notes when each new token arrives (its first put is the prompt)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self.ids: list[int] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        now = time.perf_counter()
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for tok in value.reshape(-1).tolist():
            self.stamps.append(now)
            self.ids.append(int(tok))

    def end(self) -> None:
        pass


def _hf_run(model, prompt_ids: list[int], tokens: int) -> dict:
    ids = torch.tensor([prompt_ids])
    streamer = _Stamps()
    start = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=tokens,
                   min_new_tokens=tokens, streamer=streamer, pad_token_id=model.config.eos_token_id)
    if len(streamer.ids) != tokens:
        raise RuntimeError(f"generate produced {len(streamer.ids)} tokens, asked for {tokens}")
    return _timing(start, streamer.stamps, streamer.ids)


def run_transformers(job: dict) -> dict:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from models.loader import resolve_model_dir

    hf_logging.set_verbosity_error()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(resolve_model_dir(job["spec"])), dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    prompt_ids, tokens = job["prompt_ids"], job["tokens"]
    with torch.inference_mode():
        _hf_run(model, prompt_ids, min(WARMUP_TOKENS, tokens))
        runs = [_hf_run(model, prompt_ids, tokens) for _ in range(job["repeats"])]
    return {**_summary(runs), "load_s": load_s, "attn_implementation": model.config._attn_implementation}


def main() -> None:
    job = json.loads(sys.stdin.read())
    torch.set_num_threads(job["threads"])
    result = {"ours": run_ours, "transformers": run_transformers}[job["kind"]](job)
    result = {**_memory(), **result}  # a row's own reading (taken before profiling) wins
    result.update(torch_threads=torch.get_num_threads(), torch_version=torch.__version__)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
