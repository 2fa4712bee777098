"""Merged projections on CUDA: each decoder layer's q/k/v and gate/up as ONE QuantLinear each.

The model's q_proj, k_proj, v_proj (and gate_proj, up_proj) read the same x. Apart, each is a kernel launch
(two with an FBQuant branch: branch_down, then the GEMV) and a read of x; merged, a decode step launches
4 quantized layers per decoder layer instead of 7 (the CPU fast path, engine/cpu_decode.py, concatenates
them its own way).

    merged packed weight = the layers' packed columns side by side (cuda_ext's layout keeps columns
                           independent; each out_features must be a multiple of 16, so nothing is padded)
    A = [A_q; A_k; A_v]   (L x r rows: the merged branch's t = x @ A^T holds every layer's t)
    B = [B_q; B_k; B_v]   (N_total x r) with segments = (N_q, N_k, N_v): the kernels' epilogue gives
                          each output column its own layer's slice of t, i.e. blockdiag(B_q, B_k, B_v)
                          without reading its zeros (cuda_ext.launch.quant_matmul's `segments`)
    bias = [b_q; b_k; b_v]  (zeros for a layer without one)

Layers of different ranks are padded to the largest (zero rows of A, zero columns of B). y_merged =
[y_q, y_k, y_v] up to the kernels' fp16 rounding. Declined, with the reason, when the layers differ in
bits, group size, input size or device, an out_features is not a multiple of 16, the rank passes MAX_RANK
or rank x layers passes MAX_T (q/k/v at rank 128), a layer is not on the Triton path, forward hooks other
than QDEC's are attached, or QDEC cannot follow (engine.qdec.merge_reason). With QDEC on, the merged
layer carries one QDEC residual (the parts' columns side by side): one selection and gather per step for
q/k/v instead of three (engine.qdec.merge_layers).
"""
from __future__ import annotations

import logging
import os

import torch
from torch import nn

from cuda_ext import PackedWeight
from cuda_ext.launch import MAX_RANK, MAX_T  # the kernels' largest branch rank and width of t
from engine.quant_linear import QuantLinear

log = logging.getLogger("fbserve.engine")
ENV = "FBSERVE_MERGE_PROJ"  # 0: keep the layers apart


def merge_quant_linears(layers: list[nn.Module]) -> tuple[QuantLinear | None, str | None]:
    """(one QuantLinear computing the layers' outputs side by side, None) or (None, why not)."""
    if not all(isinstance(m, QuantLinear) for m in layers):
        return None, "not all quantized"
    first = layers[0]
    key = (first.bits, first.group_size, first.in_features, first.qweight.device)
    if any((m.bits, m.group_size, m.in_features, m.qweight.device) != key for m in layers):
        return None, "bits, group size, input size or device differ"
    if any(m.out_features % 16 for m in layers):
        return None, "an out_features is not a multiple of 16"
    if any(m.path != "triton" or m.fallback_reason for m in layers):
        return None, "not on the Triton path"
    rank = max(m.rank for m in layers)
    if rank > MAX_RANK or rank * len(layers) > MAX_T:
        return None, f"rank {rank} x {len(layers)} layers > {MAX_T}"
    packed = PackedWeight(torch.cat([m.qweight for m in layers], 1), torch.cat([m.scales for m in layers], 1),
                          torch.cat([m.zeros for m in layers], 1), first.bits, first.group_size,
                          first.in_features, sum(m.out_features for m in layers))
    a = b = None
    if rank:
        dev = first.qweight.device
        a = torch.zeros(len(layers) * rank, first.in_features, dtype=torch.float16, device=dev)
        b = torch.zeros(packed.out_features, rank, dtype=torch.float16, device=dev)
        row = 0
        for i, m in enumerate(layers):
            if m.A is not None:
                a[i * rank:i * rank + m.rank] = m.A
                b[row:row + m.out_features, :m.rank] = m.B
            row += m.out_features
    bias = None
    if any(m.bias is not None for m in layers):
        dtype = next(m.bias.dtype for m in layers if m.bias is not None)
        bias = torch.cat([m.bias.to(dtype) if m.bias is not None else
                          torch.zeros(m.out_features, dtype=dtype, device=first.qweight.device) for m in layers])
    segments = tuple(m.out_features for m in layers)
    return QuantLinear(packed, a, b, bias, path="triton", segments=segments), None


def _foreign_hooks(model: nn.Module) -> bool:
    """Forward hooks other than QDEC's (which engine.qdec.merge_layers moves to the merged layer)."""
    q = getattr(model, "qdec", None)
    ours = {h.id for h in q.handles} if q is not None else set()
    return any(key not in ours for m in model.modules() for hooks in (m._forward_hooks, m._forward_pre_hooks)
               for key in hooks)


def merge_projections(model: nn.Module) -> dict[str, object]:
    """Merge every decoder layer's q/k/v into `qkv_proj` and gate/up into `gate_up_proj` where
    merge_quant_linears allows (the originals are dropped); /health's `merged_projections`."""
    if os.environ.get(ENV, "1") == "0":
        return {"enabled": False, "reason": f"{ENV}=0"}
    if _foreign_hooks(model):
        return {"enabled": False, "reason": "forward hooks other than QDEC's are attached (per-layer)"}
    from engine import qdec
    from models.llama import MLP, Attention

    merged = {"qkv": 0, "gate_up": 0}
    declined: dict[str, int] = {}
    for prefix, mod in list(model.named_modules()):  # a list: the loop replaces submodules
        if isinstance(mod, Attention):
            names, target, kind = ("q_proj", "k_proj", "v_proj"), "qkv_proj", "qkv"
        elif isinstance(mod, MLP):
            names, target, kind = ("gate_proj", "up_proj"), "gate_up_proj", "gate_up"
        else:
            continue
        if getattr(mod, target) is not None:  # merged before (another Engine on the same model)
            merged[kind] += 1
            continue
        parts = [getattr(mod, n) for n in names]
        full = [f"{prefix}.{n}" if prefix else n for n in names]
        why = qdec.merge_reason(model, full)
        one = None
        if why is None:
            one, why = merge_quant_linears(parts)
        if one is None:
            declined[f"{kind}: {why}"] = declined.get(f"{kind}: {why}", 0) + 1
            continue
        qdec.merge_layers(model, full, one, f"{prefix}.{target}" if prefix else target)
        setattr(mod, target, one)
        mod.merged_sizes = [p.out_features for p in parts]
        for n in names:
            setattr(mod, n, None)
        merged[kind] += 1
    status: dict[str, object] = {"enabled": any(merged.values()), **merged}
    if declined:
        status["declined"] = declined
        if not status["enabled"]:
            status["reason"] = "; ".join(f"{why} ({n} layers)" for why, n in declined.items())
    log.info("merged projections: %d qkv, %d gate_up%s", merged["qkv"], merged["gate_up"],
             f" (declined: {declined})" if declined else "")
    return status
