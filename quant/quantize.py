"""Quantize a model into a checkpoint directory: calibrate, quantize layer by layer, pack, save, measure.

    quantize_checkpoint("default", QuantConfig(method="fbquant", bits=3, group_size=128, rank=32), out)

Packing into the kernels' layout is cuda_ext's (`cuda_ext.pack`); this module only hands it codes,
fp16 scales and integer zeros, and stores the fp16 factors next to them.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
from pathlib import Path

import torch

from quant.calibration import calibration_tokens, resolve_calibration_file
from quant.checkpoint import update_quality, write_checkpoint
from quant.methods import QuantConfig, QuantizedLinear
from quant.sequential import quantize_model

log = logging.getLogger("fbserve.quant")
REST_DTYPE = torch.float16  # embeddings, norms, lm_head: fp16 in the file (the loader casts them)


def quantize_checkpoint(model: str, cfg: QuantConfig, out: Path, *, calib: str | Path | None = None,
                        n_samples: int = 128, seqlen: int = 512, seed: int = 0, device: str = "cpu",
                        batch_size: int = 8, eval_windows: int = 0, eval_ctx: int = 512,
                        progress: bool = True) -> Path:
    """Quantize `model` ("default", a HF directory or a GGUF file) with `cfg` into the directory `out`.

    Calibration: `n_samples` windows of `seqlen` tokens of `calib` (default WikiText-2 validation) drawn
    with `seed`. `eval_windows` > 0 then measures perplexity and KL to the unquantized model on that
    many WikiText-2 test windows of `eval_ctx` tokens, through the saved checkpoint, into "quality".
    """
    from cuda_ext import FORMAT_VERSION as PACKING_VERSION
    from cuda_ext import pack
    from models.loader import load_model

    t0 = time.perf_counter()
    calib_file = resolve_calibration_file(calib)  # fail before loading anything
    torch.manual_seed(seed)
    # The model stays on the CPU and one layer at a time visits `device`: fp32 when that is the CPU
    # (fast CPU matmuls), fp16 otherwise (a 7-8B model's CPU copy then takes 2 bytes a weight).
    dtype = torch.float32 if torch.device(device).type == "cpu" else torch.float16
    lm = load_model(model, device="cpu", dtype=dtype)
    tokens = calibration_tokens(lm.tokenizer, calib_file, n_samples, seqlen, seed)
    tensors: dict[str, torch.Tensor] = {}

    def keep(name: str, res: QuantizedLinear) -> None:
        q = res.qweight.to("cpu")
        tensors.update(pack(q.codes, q.scales, q.zeros, q.bits, q.group_size).state_dict(name + "."))
        if res.a is not None:
            tensors[name + ".A"] = res.a.to("cpu").contiguous()
            tensors[name + ".B"] = res.b.to("cpu").contiguous()

    reports = quantize_model(lm.model, tokens, cfg, device=device, batch_size=batch_size, on_linear=keep,
                             progress=progress)
    quantized = [r.name for r in reports]
    config = lm.model.config
    for k, v in lm.model.state_dict().items():
        owner, _, leaf = k.rpartition(".")
        if owner in quantized and leaf == "weight":
            continue
        if config.tie_word_embeddings and k == "lm_head.weight":
            continue
        tensors[k] = v.to(REST_DTYPE) if v.is_floating_point() else v
    weights = sum(r.shape[0] * r.shape[1] for r in reports)
    bpw = sum(r.bits_per_weight * r.shape[0] * r.shape[1] for r in reports) / weights
    manifest = {
        "packing": f"fbq{PACKING_VERSION}",
        "model": model,
        "method": cfg.method,
        "base_quantizer": cfg.base_quantizer,
        "bits": cfg.bits,
        "group_size": cfg.group_size,
        "rank": cfg.rank,
        "options": {"damp": cfg.damp, "act_order": cfg.act_order, "clip_search": True,
                    **({"qdec_aware": {"k_chunk": cfg.qdec_k_chunk, "mix": cfg.qdec_mix}} if cfg.qdec_k_chunk else {}),
                    **({"fbquant": dataclasses.asdict(cfg.fb)} if cfg.method == "fbquant" else {})},
        "calibration": {"file": str(calib_file), "n_samples": n_samples, "seqlen": seqlen, "seed": seed},
        "bits_per_weight": round(bpw, 4),
        "quantized_modules": quantized,
        "layers": {r.name: {"shape": r.shape, "error": r.error, "start_error": r.start_error,
                            "bits_per_weight": round(r.bits_per_weight, 4), "seconds": round(r.seconds, 3)}
                   for r in reports},
        "quality": None,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - t0, 1),
        "versions": {"torch": torch.__version__},
    }
    out = write_checkpoint(Path(out), lm.path, tensors, manifest)
    mean_err = sum(r.error for r in reports) / len(reports)
    log.info("wrote %s: %d linears, %.3f bits/weight, mean relative output error %.5f (%.0f s)",
             out, len(reports), bpw, mean_err, time.perf_counter() - t0)
    del lm, tensors
    if eval_windows > 0:
        try:
            update_quality(out, measure_quality(out, model, eval_windows, eval_ctx, device))
        except (ImportError, FileNotFoundError) as e:  # no quant.eval or no WikiText-2 test: quality stays null
            log.warning("quality figures skipped: %s", e)
    return out


def measure_quality(checkpoint: Path, reference: str, windows: int, ctx: int, device: str = "cpu") -> dict:
    """Perplexity on WikiText-2 test and KL / top-1 agreement to the unquantized `reference`, using the
    evaluation engineer's quant.eval on the first `windows` windows of `ctx` tokens (a quick figure; the
    full protocol is `fbserve eval`). Runs the saved checkpoint, i.e. what serving runs."""
    from models.loader import load_model
    from quant.eval import evaluate_windows, token_windows, wikitext2_text

    t0 = time.perf_counter()
    q = load_model(str(checkpoint), device=device)
    ref = load_model(reference, device=device)
    wins = token_windows(q.tokenizer, wikitext2_text(), ctx, max_windows=windows)
    m = evaluate_windows(q.model, wins, reference=ref.model)
    base = evaluate_windows(ref.model, wins)
    return {"wikitext2": {"perplexity": m.perplexity, "reference_perplexity": base.perplexity,
                          "kl_divergence": m.kl_mean, "top1_agreement": m.top1_agreement,
                          "windows": m.windows, "ctx": ctx, "reference": reference,
                          "seconds": round(time.perf_counter() - t0, 1),
                          "note": "quick figure at quantize time; `fbserve eval` runs the full protocol"}}

