"""Layer-by-layer (GPTQ-style, "true sequential") quantization of a Llama-family Transformer.

Decoder layers are processed one at a time: the layer is moved to `device`, its linears are quantized
group by group in the order the layer calls them (linears reading the same input, such as q/k/v or
gate/up, form one group and share one Gram matrix), and the inputs of each group are recomputed with the
already-quantized linears in front of it. The quantized layer then produces the next layer's inputs, so
later layers see the quantized outputs of earlier ones. Only one layer's inputs (n_samples, seqlen,
hidden) and one group's statistics live on the device; the rest of the model stays where it is, which
is what lets a 7-8B model go through one laptop GPU.

Each quantized nn.Linear keeps its class and gets the served weight dequant(codes) (+ B A) in place;
the codes, scales, zeros and factors go to `on_linear` (e.g. the checkpoint writer packs them).
"""
from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from models.llama import Transformer
from quant.methods import LinearStats, QuantConfig, QuantizedLinear, quantize_linear
from quant.qdec import qdec_gram

log = logging.getLogger("fbserve.quant")


class _Stop(Exception):
    """Raised from a forward pre-hook once a group's inputs are captured: the rest of the layer is skipped."""


@dataclass
class LinearReport:
    name: str  # HF name, e.g. model.layers.3.mlp.down_proj
    shape: tuple[int, int]  # (out, in)
    # relative output error on this linear's (quantized-prefix) calibration inputs (with --qdec-aware:
    # under QDEC's Gram matrix, the objective it minimised)
    error: float
    start_error: float | None  # FBQuant: its GPTQ+QERA (or RTN+QERA) start
    bits_per_weight: float
    seconds: float


def rope_tables(model: Transformer, seqlen: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin (1, T, D) for positions 0..T-1, as Transformer.forward builds them."""
    pos = torch.arange(seqlen, device=device, dtype=torch.float32)
    freqs = pos[:, None] * model.inv_freq.to(device)[None, :]  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)[None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def run_layer(layer: nn.Module, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """One decoder layer on a causal window x (B, T, hidden) without a KV cache.

    The cache arguments of DecoderLayer.forward (positions, slots, rows, ...) are passed as None and
    `length` as T, so added cache parameters do not break calibration.
    """
    names = list(inspect.signature(layer.forward).parameters)[3:]
    extra = {name: (x.shape[1] if name == "length" else None) for name in names}
    return layer(x, cos, sin, **extra)


def linear_groups(layer: nn.Module, x: Tensor, cos: Tensor, sin: Tensor) -> list[list[str]]:
    """Names of `layer`'s nn.Linear modules grouped by shared input, in call order (a probe forward on x)."""
    calls: list[tuple[str, Tensor]] = []  # the input tensors are kept alive: identity, not a reusable id()
    handles = [m.register_forward_pre_hook(lambda _m, args, name=name: calls.append((name, args[0])))
               for name, m in layer.named_modules() if isinstance(m, nn.Linear)]
    try:
        run_layer(layer, x, cos, sin)
    finally:
        for hd in handles:
            hd.remove()
    groups: list[list[str]] = []
    last = None
    for name, inp in calls:
        if inp is last:
            groups[-1].append(name)
        else:
            groups.append([name])
        last = inp
    return groups


def _group_stats(layer: nn.Module, first: nn.Module, xs: list[Tensor], cos: Tensor, sin: Tensor,
                 cfg: QuantConfig) -> LinearStats:
    """Gram matrix (and, for LQER, the activation scale) of `first`'s input over all calibration batches.

    With `cfg.qdec_k_chunk` the Gram matrix is QDEC's (quant.qdec.qdec_gram).
    """
    acc: dict[str, Tensor | int] = {"h": 0, "s": 0, "tokens": 0}
    act_scale = cfg.method == "lqer"

    def hook(_m: nn.Module, args: tuple) -> None:
        x = args[0].float()  # (B, T, K)
        flat = x.reshape(-1, x.shape[-1])
        gram = qdec_gram(flat, cfg.qdec_k_chunk, cfg.qdec_mix) if cfg.qdec_k_chunk else flat.T @ flat
        acc["h"] = acc["h"] + gram
        if act_scale:  # LQER's statistic: max over samples of mean |x_k|
            per_sample = x.abs().mean(dim=1).amax(dim=0)  # (K,)
            acc["s"] = torch.maximum(acc["s"], per_sample) if torch.is_tensor(acc["s"]) else per_sample
        acc["tokens"] += flat.shape[0]
        raise _Stop

    handle = first.register_forward_pre_hook(hook)
    try:
        for x in xs:
            try:
                run_layer(layer, x, cos, sin)
            except _Stop:
                pass
    finally:
        handle.remove()
    return LinearStats(acc["h"] / acc["tokens"], acc["s"] if act_scale else None, int(acc["tokens"]))


@torch.no_grad()
def quantize_model(model: Transformer, tokens: Tensor, cfg: QuantConfig, device: str | torch.device = "cpu",
                   batch_size: int = 8, on_linear: Callable[[str, QuantizedLinear], None] | None = None,
                   progress: bool = True) -> list[LinearReport]:
    """Quantize every decoder-layer linear of `model` in place with `cfg` on calibration `tokens` (n, T).

    Returns one report per linear in processing order; `on_linear(name, result)` receives the codes and
    factors as soon as each linear is done (on the quantization device).
    """
    device = torch.device(device)
    layers = model.model.layers
    dtype = model.model.embed_tokens.weight.dtype
    n, seqlen = tokens.shape
    emb = model.model.embed_tokens
    xs = [emb(tokens[i:i + batch_size].to(emb.weight.device)).to(device) for i in range(0, n, batch_size)]
    cos, sin = rope_tables(model, seqlen, device, dtype)
    total = sum(sum(isinstance(m, nn.Linear) for m in layer.modules()) for layer in layers)
    reports: list[LinearReport] = []
    bar = tqdm(total=total, desc=f"quantize {cfg.method} w{cfg.bits}g{cfg.group_size}"
               + (f"r{cfg.rank}" if cfg.rank else ""), unit="linear", disable=not progress)
    for li, layer in enumerate(layers):
        home = next(layer.parameters()).device
        layer.to(device)
        probe = min(seqlen, 8)
        for group in linear_groups(layer, xs[0][:1, :probe], cos[:, :probe], sin[:, :probe]):
            stats = _group_stats(layer, layer.get_submodule(group[0]), xs, cos, sin, cfg)
            for name in group:
                t0 = time.perf_counter()
                lin = layer.get_submodule(name)
                res = quantize_linear(lin.weight.data, stats, cfg)
                lin.weight.data = res.weight().to(device=lin.weight.device, dtype=lin.weight.dtype)
                full = f"model.layers.{li}.{name}"
                reports.append(LinearReport(full, tuple(lin.weight.shape), res.error,
                                            res.history[0] if res.history else None, res.bits_per_weight(),
                                            time.perf_counter() - t0))
                if on_linear is not None:
                    on_linear(full, res)
                bar.set_postfix_str(f"L{li} {name.split('.')[-1]} err {res.error:.4f}")
                bar.update(1)
            del stats
        xs = [run_layer(layer, x, cos, sin) for x in xs]  # the next layer's (quantized) inputs
        layer.to(home)
        errs = [r.error for r in reports[-len(list(_linears(layer))):]]
        log.info("layer %d: mean relative output error %.5f", li, sum(errs) / len(errs))
    bar.close()
    return reports


def _linears(layer: nn.Module):
    return (m for m in layer.modules() if isinstance(m, nn.Linear))
