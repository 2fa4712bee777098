"""QDEC at serving time: per decode step, add R[:, idx] @ x[idx] to each quantized linear's output.

    status = attach(model, checkpoint_dir, mode="cpu", k_chunk=8)   # never raises for bad residuals
    health(model)   -> {"enabled": bool, "reason": str | None, ...}   (/health "qdec")
    stats(model)    -> {"qdec_residual_bytes", "qdec_channels_fetched", "qdec_bytes_fetched"}  (metrics)

Each QuantLinear gets a forward pre-hook, which selects the step's channels and starts their correction
(on CUDA on a side stream, so the residual rows cross PCIe while the base low-bit kernel runs: selection
and gather in one launch, cuda_ext.qdec_kernel.qdec_select_gather), and a forward hook, which adds it to
the output (qdec_add on CUDA); the layer itself is unchanged (its state dict, path, kernel).
Residuals (quant.qdec) stay in host memory: pinned when CUDA is available (the kernel reads the
selected rows zero-copy), plain CPU memory otherwise.  Only rows of T == 1 are corrected (decode);
prefill is not, unless `all_positions` is set (the evaluation protocol: every position as a decode step).

Selection per linear and row (cuda_ext.qdec_reference): `approx` (bucketed, calibrated thresholds; the
default on a GPU), `exact` (per-chunk top-k; the default on CPU, same chunking and count), and the
ablations `random` and `static` (the channels of largest calibration mean |x|).
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from cuda_ext.qdec_reference import CHUNK, approx_topk, exact_topk, qdec_correction_ref, selected_count
from engine.qdec_tuning import QdecTuning, choose_k, load as load_tuning

log = logging.getLogger("fbserve.qdec")
SELECTIONS = ("approx", "exact", "random", "static")
# Layer types the tuner and --qdec-budget choose k_chunk for: the module's last name -> type (Llama
# family names, models/llama.py).  Unknown names fall in "other".
LAYER_TYPES = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o",
               "gate_proj": "gate_up", "up_proj": "gate_up", "down_proj": "down"}
DEFAULT_K_CHUNK = 8  # without a tuning choice, --qdec-k-chunk or --qdec-budget


def layer_type(name: str) -> str:
    return LAYER_TYPES.get(name.rpartition(".")[2], "other")


@dataclass
class Counters:
    channels: int = 0
    bytes: int = 0


@dataclass
class QdecLayer:
    """The residual of one linear and its selection statistics (CPU tensors; pinned on CUDA hosts)."""
    name: str
    kind: str
    rcodes: torch.Tensor  # uint8 (K, ceil(N/2))
    rscales: torch.Tensor  # fp16 (N,)
    lo: float
    hi: float
    static_rank: torch.Tensor  # int64 (K,) channels by decreasing calibration mean |x|
    dense: torch.Tensor | None = None  # fp32 (K, N) dequantized residual, evaluation only
    handles: list = field(default_factory=list)  # its two hooks (also in Qdec.handles)


@dataclass
class Qdec:
    """The controller hung on the model as `model.qdec` (a plain attribute: not a module, no state)."""
    enabled: bool = False
    reason: str | None = "not configured"
    mode: str = "off"
    select: str = "exact"
    k_chunk: dict[str, int] = field(default_factory=dict)  # layer type -> k_chunk
    all_positions: bool = False
    layers: dict[str, QdecLayer] = field(default_factory=dict)
    counters: Counters = field(default_factory=Counters)
    handles: list = field(default_factory=list)
    residual_bytes: int = 0
    seed: int = 0
    generator: torch.Generator | None = None  # the `random` selection's
    side: object | None = None  # cuda_ext.qdec_kernel.SideStream, made on the first CUDA correction
    tuning: QdecTuning | None = None
    tuning_note: str | None = None  # why the checkpoint's qdec_tuning.json is not used (None: used or absent)
    k_source: str = ""  # where k_chunk came from (/health)
    measure_recall: bool = False  # evaluation: count approx-vs-exact overlap (recall_hits / recall_total)
    recall_hits: int = 0
    recall_total: int = 0

    def k_for(self, kind: str) -> int:
        return self.k_chunk.get(kind, self.k_chunk.get("default", 0))


def controller(model: nn.Module) -> Qdec:
    q = getattr(model, "qdec", None)
    if q is None:
        q = Qdec()
        object.__setattr__(model, "qdec", q)  # bypass nn.Module registration: not a submodule
    return q


def select_channels(x2: torch.Tensor, layer: QdecLayer, k_chunk: int, how: str,
                    gen: torch.Generator | None = None) -> torch.Tensor:
    """int64 (M, selected_count(K, k_chunk)) channel indices for rows x2 (M, K)."""
    m, k = x2.shape
    if how == "exact":
        return exact_topk(x2, k_chunk)
    if how == "approx":
        return approx_topk(x2, k_chunk, layer.lo, layer.hi)
    parts = []
    for c0 in range(0, k, CHUNK):
        c = min(CHUNK, k - c0)
        kk = min(k_chunk, c)
        if how == "random":
            parts.append(torch.rand((m, c), generator=gen).topk(kk, dim=1).indices.to(x2.device) + c0)
        elif how == "static":
            r = layer.static_rank
            top = r[(r >= c0) & (r < c0 + c)][:kk].to(x2.device)  # this chunk's channels, best first
            parts.append(top[None, :].expand(m, kk))
        else:
            raise ValueError(f"selection {how!r} unknown; choose from {SELECTIONS}")
    return torch.cat(parts, 1) if parts else torch.empty((m, 0), dtype=torch.long, device=x2.device)


def correction(x2: torch.Tensor, idx: torch.Tensor, layer: QdecLayer) -> torch.Tensor:
    """fp32 (M, N) = R[:, idx] @ x[idx] per row: the Triton kernel on CUDA, the reference on CPU; with a
    dense evaluation copy, a masked matmul (the same sum)."""
    if layer.dense is not None:
        m, s = idx.shape
        k = x2.shape[1]
        if 0 < 4 * s < k and x2.device.type == "cpu":  # few channels: a CSR row-gather matmul (3-4x faster)
            ids = idx.sort(1).values
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
                csr = torch.sparse_csr_tensor(torch.arange(0, m * s + 1, s, device=x2.device), ids.reshape(-1),
                                              x2.float().gather(1, ids).reshape(-1), size=(m, k))
                return csr @ layer.dense
        xm = torch.zeros_like(x2, dtype=torch.float32).scatter_(1, idx, x2.float().gather(1, idx))
        return xm @ layer.dense
    if x2.device.type == "cuda":
        from cuda_ext.qdec_kernel import qdec_correction

        return qdec_correction(x2, idx, layer.rcodes, layer.rscales)
    return qdec_correction_ref(x2, idx, layer.rcodes, layer.rscales)


def _launch(q: Qdec, layer: QdecLayer, x: torch.Tensor) -> torch.Tensor | None:
    """Select this step's channels and start their correction (fp32 (M, N)); None: nothing to correct.
    On CUDA the gather runs on the side stream, beside the base kernel that follows; on CPU it runs here."""
    if x.dim() == 3 and x.shape[1] != 1 and not q.all_positions:
        return None  # prefill (T > 1): not corrected
    k_chunk = q.k_for(layer.kind)
    if k_chunk <= 0:
        return None
    x2 = x.reshape(-1, x.shape[-1])
    count = selected_count(x2.shape[1], k_chunk) * x2.shape[0]  # every selection takes this many
    q.counters.channels += count
    q.counters.bytes += count * layer.rcodes.shape[1]
    if x2.device.type == "cuda" and layer.dense is None and not q.measure_recall and q.select in ("approx", "exact"):
        from cuda_ext.qdec_kernel import SideStream, qdec_correction, qdec_select_gather

        if q.side is None:
            q.side = SideStream(x2.device)
        rc, rs = layer.rcodes, layer.rscales

        def work(v: torch.Tensor) -> torch.Tensor:  # on the side stream: (M, chunks, N) fp32 partials
            if q.select == "approx":  # selection and gather in one launch
                return qdec_select_gather(v, k_chunk, layer.lo, layer.hi, rc, rs)
            return qdec_correction(v, exact_topk(v, k_chunk), rc, rs)[:, None]
        return q.side.launch(x2, work)
    idx = select_channels(x2, layer, k_chunk, q.select, q.generator)
    if q.measure_recall:
        exact = exact_topk(x2, k_chunk)
        hit = torch.zeros_like(x2, dtype=torch.bool).scatter_(1, idx, True).gather(1, exact)
        q.recall_hits += int(hit.sum())
        q.recall_total += exact.numel()
    return correction(x2, idx, layer)


def _hooks(q: Qdec, layer: QdecLayer):
    """(pre-hook, hook): the pre-hook starts the correction from the layer's input before the base kernel
    runs, the hook adds it to the layer's output (on CUDA after the current stream waits for the side one)."""
    pending: list[torch.Tensor | None] = [None]

    def pre_hook(module, inputs):
        pending[0] = _launch(q, layer, inputs[0]) if q.enabled else None

    def forward_hook(module, inputs, y):
        acc, pending[0] = pending[0], None
        if acc is None:
            return None
        if acc.device.type == "cuda" and layer.dense is None and q.side is not None:  # launched on the side stream
            from cuda_ext.qdec_kernel import qdec_add

            qdec_add(y.view(-1, y.shape[-1]), q.side.join(acc))  # one kernel: fp32 sum, rounded once to y's dtype
            return y
        return y.add_(acc.view(*y.shape))  # one kernel: fp32 add, rounded once to y's dtype
    return pre_hook, forward_hook


def attach(model: nn.Module, checkpoint: Path | str | None, mode: str = "cpu",
           k_chunk: int | dict[str, int] | None = None, select: str | None = None,
           budget_pct: float | None = None) -> Qdec:
    """Load the checkpoint's residuals and hook every QuantLinear of `model`; returns the controller.

    mode "cpu": residuals in host memory; "off": disabled; "auto": "cpu" when the checkpoint holds a
    `fbserve tune-qdec` choice for this device, else off. With "auto" or a budget, a choice of k_chunk 0
    for every layer type leaves QDEC off (no hooks). Missing or damaged residuals disable QDEC,
    logged with the reason (never wrong numbers: the hooks are not installed). k_chunk, first match wins:
    `budget_pct` (chosen from the tuning's measurements), `k_chunk`, the tuning's saved choice,
    DEFAULT_K_CHUNK."""
    from engine.quant_linear import QuantLinear
    from quant.qdec import ResidualError, load_residuals

    q = controller(model)
    detach(model)
    q.mode, q.tuning, q.tuning_note, q.k_source = mode, None, None, ""
    if mode == "off":
        q.enabled, q.reason = False, "disabled (--residuals off)"
        return q
    if mode not in ("cpu", "auto"):
        raise ValueError(f"--residuals {mode!r} unknown; choose off or cpu")
    if checkpoint is None or not (Path(checkpoint) / "quantization.json").is_file():
        q.enabled, q.reason = False, "the model is not a quantized checkpoint: nothing to compensate"
        (log.info if mode == "auto" else log.warning)("QDEC disabled: %s", q.reason)
        return q
    mods = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    device = "cuda" if any(m.qweight.device.type == "cuda" for m in mods.values()) else "cpu"
    q.tuning, q.tuning_note = load_tuning(Path(checkpoint), device)
    if mode == "auto":
        if q.tuning is None or q.tuning.chosen is None:
            q.enabled = False
            q.reason = (f"off: no --residuals cpu and no `fbserve tune-qdec` choice for {device} in the checkpoint"
                        + (f" ({q.tuning_note})" if q.tuning_note else ""))
            log.info("QDEC %s", q.reason)
            return q
        q.mode = "cpu"
    q.k_chunk, q.k_source = _pick_k(q, k_chunk, budget_pct)
    if (mode == "auto" or budget_pct is not None) and not any(q.k_chunk.values()):
        # the budget buys no channel on this device: residuals and hooks would only cost (memory, time,
        # and the fast CPU step), so neither is loaded
        q.enabled, q.reason = False, f"off: k_chunk is 0 for every layer type ({q.k_source})"
        log.warning("QDEC %s", q.reason)
        return q
    try:
        res = load_residuals(Path(checkpoint), {n: (m.out_features, m.in_features) for n, m in mods.items()})
    except ResidualError as e:
        q.enabled, q.reason = False, f"residuals unusable: {e}"
        log.error("QDEC disabled, serving without error compensation: %s", e)
        return q
    pin = torch.cuda.is_available()
    q.residual_bytes = 0
    for name, t in res.items():
        rc, rs = t["rcodes"], t["rscales"]
        if pin:  # both read zero-copy by the gather kernel: no GPU memory (the scales on the GPU would
            # add 0.11% of a 3-bit Llama-2-7B's weight bytes, and measured no faster: bench/RESULTS.md)
            rc, rs = rc.pin_memory(), rs.pin_memory()
        lo, hi = t["act_thresholds"].tolist()
        q.layers[name] = QdecLayer(name, layer_type(name), rc, rs, lo, hi,
                                   torch.argsort(t["act_mean"], descending=True))
        q.residual_bytes += rc.numel() + t["rscales"].numel() * 2
    q.select = select or ("approx" if device == "cuda" else "exact")
    q.generator = torch.Generator().manual_seed(q.seed)
    for name, layer in q.layers.items():
        _hook(q, layer, mods[name])
    q.enabled, q.reason = True, None
    log.info("QDEC live: %d layers, %.1f MB residuals in %s host memory, k_chunk %s (%s), selection %s",
             len(q.layers), q.residual_bytes / 1e6, "pinned" if pin else "plain", q.k_chunk, q.k_source, q.select)
    return q


def _hook(q: Qdec, layer: QdecLayer, module: nn.Module) -> None:
    pre_hook, hook = _hooks(q, layer)
    layer.handles = [module.register_forward_pre_hook(pre_hook), module.register_forward_hook(hook)]
    q.handles += layer.handles


def merge_reason(model: nn.Module, names: list[str]) -> str | None:
    """Why QDEC keeps the layers `names` (q/k/v or gate/up: one input) apart; None: they may merge (or QDEC
    is not on them)."""
    q = getattr(model, "qdec", None)
    covered = [q is not None and n in q.layers for n in names]
    if not any(covered):
        return None
    if not all(covered):
        return "QDEC covers only some of the layers"
    parts = [q.layers[n] for n in names]
    if any(p.dense is not None for p in parts) or q.measure_recall:
        return "QDEC is in evaluation mode (dense copies / recall counting)"
    if len({p.kind for p in parts}) > 1:
        return "QDEC layer types differ"
    if any(p.rscales.numel() % 2 for p in parts):
        return "an odd out_features (a residual byte holds two outputs)"
    if any(not torch.equal(p.static_rank, parts[0].static_rank) for p in parts[1:]):
        return "QDEC statistics differ (not one input)"
    return None


def merge_layers(model: nn.Module, names: list[str], module: nn.Module, merged_name: str) -> None:
    """Move QDEC from the layers `names` to `module`, their merge (engine.merge; merge_reason said yes):
    one residual with their columns side by side, so one selection and one gather per step serve all
    of them. The parts' calibration thresholds estimate the same input's quantiles; the first part's
    are kept. fbserve_qdec_channels_fetched_total counts a selection once (bytes fetched are the same)."""
    q = controller(model)
    if not any(n in q.layers for n in names):
        return
    parts = [q.layers.pop(n) for n in names]
    for p in parts:
        for h in p.handles:
            h.remove()
            q.handles.remove(h)
    rcodes, rscales = torch.cat([p.rcodes for p in parts], 1), torch.cat([p.rscales for p in parts])
    if parts[0].rcodes.is_pinned():
        rcodes, rscales = rcodes.pin_memory(), rscales.pin_memory()
    first = parts[0]
    layer = QdecLayer(merged_name, first.kind, rcodes, rscales, first.lo, first.hi, first.static_rank)
    q.layers[merged_name] = layer
    _hook(q, layer, module)


def graph_decline_reason(model: nn.Module) -> str | None:
    """Why QDEC's hooks on `model` cannot be captured in a CUDA graph (None: they can, or QDEC is off).
    Capturable: the approx (fused kernel) or exact selection on the side stream, which needs no host."""
    q = getattr(model, "qdec", None)
    if q is None or not q.handles:
        return None
    if q.select not in ("approx", "exact"):
        return f"QDEC selection {q.select!r} runs on the host"
    if q.measure_recall or any(layer.dense is not None for layer in q.layers.values()):
        return "QDEC is in evaluation mode (recall counting / dense copies)"
    return None


def _pick_k(q: Qdec, k_chunk: int | dict[str, int] | None, budget_pct: float | None) -> tuple[dict[str, int], str]:
    """(k_chunk per layer type, where it came from): see attach."""
    if budget_pct is not None:
        if q.tuning is not None:
            return choose_k(q.tuning, budget_pct), f"--qdec-budget {budget_pct:g}% on the measured tuning"
        log.warning("--qdec-budget %s%%: no usable tuning (%s; run `fbserve tune-qdec` on this device)",
                    budget_pct, q.tuning_note or "no qdec_tuning.json")
    if k_chunk is not None:
        return (dict(k_chunk) if isinstance(k_chunk, dict) else {"default": k_chunk}), "--qdec-k-chunk"
    if q.tuning is not None and q.tuning.chosen is not None:
        return dict(q.tuning.chosen.k_chunk), f"tune-qdec choice for a {q.tuning.chosen.budget_pct:g}% budget"
    return {"default": DEFAULT_K_CHUNK}, f"default k_chunk {DEFAULT_K_CHUNK} (no tuning choice)"


def detach(model: nn.Module) -> None:
    q = controller(model)
    for h in q.handles:
        h.remove()
    q.handles.clear()
    q.layers.clear()
    q.enabled = False


def dense_for_eval(model: nn.Module) -> None:
    """Keep a dequantized fp32 (K, N) copy of each residual so evaluation corrects all positions with one
    masked matmul per linear (the same sum as the row gather)."""
    from cuda_ext.qdec_reference import dequant_rows

    for layer in controller(model).layers.values():
        layer.dense = dequant_rows(layer.rcodes, layer.rscales.cpu())


def health(model: nn.Module) -> dict:
    """/health's "qdec" object: enabled, reason (why not), k_chunk per layer type, selection, bytes."""
    q = controller(model)
    out = {"enabled": q.enabled, "reason": q.reason, "mode": q.mode}
    if q.enabled:
        out.update(k_chunk=q.k_chunk, k_source=q.k_source, selection=q.select, layers=len(q.layers),
                   residual_bytes=q.residual_bytes, tuned=q.tuning is not None)
    if q.tuning_note:
        out["tuning_note"] = q.tuning_note
    return out


def stats(model: nn.Module) -> dict[str, int]:
    """The totals server/metrics.py reads from Engine.stats()."""
    q = controller(model)
    return {"qdec_residual_bytes": q.residual_bytes if q.enabled else 0,
            "qdec_channels_fetched": q.counters.channels, "qdec_bytes_fetched": q.counters.bytes}
