"""Quality metrics of a (quantized) model: perplexity, KL divergence and top-1 agreement to a reference.

Perplexity follows the GPTQ protocol on WikiText-2 test: the raw file's lines (as the Hugging Face
`wikitext-2-raw-v1` rows: a blank line is "", any other line keeps its "\\n") are joined with "\\n\\n",
tokenized once, and cut into floor(n / ctx) non-overlapping windows; each window is scored on its own,
its first token unconditioned, so ppl = exp(sum NLL / (windows * (ctx - 1))).

KL(P_ref || P_q) and top-1 agreement use the same windows and positions: both models run on one window
at a time and the vocabulary-sized distributions are compared a chunk of positions at a time, so memory
stays at two (ctx, vocab) logits tensors whatever the number of windows.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from quant.calibration import data_dir

WIKITEXT2_TEST = "wikitext-2-raw/wiki.test.raw"
# Bits per weight recorded for an unquantized model. Papers plot the FP16 baseline at 16; fbserve serves
# the embedded default in fp32 on CPU (dequantized from its Q4_1 GGUF), but we keep the papers' axis so
# curves compare. `weights_dtype` in the results says what actually ran.
UNQUANTIZED_BITS_PER_WEIGHT = 16.0

Model = Callable[[Tensor], Tensor]  # tokens (B, T) int64 -> logits (B, T, V) fp32, one causal window


class DataMissingError(FileNotFoundError):
    """An evaluation data file is not where `data_dir()` points."""


def require_data(*relpaths: str) -> list[Path]:
    """Paths of the data files under `data_dir()`; raise `DataMissingError` naming every missing one."""
    root = data_dir()
    paths = [root / p for p in relpaths]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataMissingError(
            f"evaluation data missing: {', '.join(missing)}. Put the data sets (layout of "
            f"shared/data/README.md) in {root} or point FBSERVE_DATA at the folder that holds them.")
    return paths


def wikitext2_text(path: Path | None = None) -> str:
    """WikiText-2 raw test joined as GPTQ does ("\\n\\n".join of the Hugging Face rows)."""
    path = path or require_data(WIKITEXT2_TEST)[0]
    raw = path.read_text(encoding="utf-8")
    rows = [line if line.strip() else "" for line in raw.splitlines(keepends=True)]
    return "\n\n".join(rows)


def token_windows(tokenizer, text: str, ctx: int, max_windows: int | None = None) -> Tensor:
    """Tokenize `text` once and cut it into non-overlapping windows: int64 (N, ctx), N = floor(n / ctx).

    A text shorter than one window gives a single window of all its tokens (N = 1, width n).
    Tokenization uses the tokenizer's defaults (special tokens included if it adds any), as GPTQ does.
    """
    ids = tokenizer(text, verbose=False).input_ids
    n = len(ids)
    if n < 2:
        raise ValueError(f"text has {n} tokens: nothing to score")
    if n < ctx:
        return torch.tensor(ids, dtype=torch.long)[None]
    count = n // ctx
    if max_windows is not None:
        count = min(count, max_windows)
    return torch.tensor(ids[: count * ctx], dtype=torch.long).view(count, ctx)


@dataclass
class WindowMetrics:
    """Sums over scored positions (each window's positions 0..T-2, predicting tokens 1..T-1)."""

    nll: float = 0.0  # sum of -log p(token)
    positions: int = 0
    windows: int = 0
    kl: float = 0.0  # sum of KL(P_ref || P_q) in nats; 0 without a reference
    agree: int = 0  # positions where both models' argmax agree

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.positions)

    @property
    def kl_mean(self) -> float:
        return self.kl / self.positions

    @property
    def top1_agreement(self) -> float:
        return self.agree / self.positions


def _score_window(logits: Tensor, ref_logits: Tensor | None, targets: Tensor, chunk: int, m: WindowMetrics) -> None:
    """Accumulate one window's metrics; logits (T-1, V) fp32 at the positions that predict `targets` (T-1,)."""
    for s in range(0, targets.numel(), chunk):
        lq = F.log_softmax(logits[s:s + chunk].float(), dim=-1)  # (c, V)
        m.nll -= float(lq.gather(1, targets[s:s + chunk, None]).sum())
        if ref_logits is not None:
            lp = F.log_softmax(ref_logits[s:s + chunk].float(), dim=-1)  # (c, V)
            m.kl += float((lp.exp() * (lp - lq)).sum())
            m.agree += int((lp.argmax(-1) == lq.argmax(-1)).sum())
    m.positions += targets.numel()
    m.windows += 1


@torch.inference_mode()
def evaluate_windows(model: Model, windows: Tensor, reference: Model | None = None, chunk: int = 512,
                     progress: Callable[[Iterable], Iterable] | None = None) -> WindowMetrics:
    """NLL of `model` on each window (N, T) int64, and KL / top-1 agreement to `reference` if given.

    One window at a time through each model; KL is KL(P_ref || P_model) at every scored position.
    """
    if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError(f"need at least one window of 2+ tokens, got shape {tuple(windows.shape)}")
    m = WindowMetrics()
    rows = progress(range(windows.shape[0])) if progress else range(windows.shape[0])
    for i in rows:
        w = windows[i:i + 1]  # (1, T)
        logits = model(w)[0, :-1]  # (T-1, V)
        ref = reference(w)[0, :-1] if reference is not None else None
        _score_window(logits, ref, w[0, 1:], chunk, m)
        del logits, ref
    return m


def bits_per_weight(manifest: dict | None) -> float:
    """Bits per weight of the served linears: the manifest's figure, or 16 for an unquantized model."""
    if manifest is None:
        return UNQUANTIZED_BITS_PER_WEIGHT
    if "bits_per_weight" not in manifest:
        raise ValueError("quantization.json has no 'bits_per_weight': cannot place the model on the quality plot")
    return float(manifest["bits_per_weight"])


def model_summary(manifest: dict | None, weights_dtype: torch.dtype) -> dict:
    """Method, bits, group size and rank for tables and plots (`fp` for an unquantized model)."""
    if manifest is None:
        return {"method": "fp", "bits": None, "group_size": None, "rank": 0,
                "bits_per_weight": UNQUANTIZED_BITS_PER_WEIGHT,
                "weights_dtype": str(weights_dtype).removeprefix("torch.")}
    return {"method": manifest.get("method", "unknown"), "bits": manifest.get("bits"),
            "group_size": manifest.get("group_size"), "rank": manifest.get("rank") or 0,
            "bits_per_weight": bits_per_weight(manifest), "weights_dtype": "quantized"}
