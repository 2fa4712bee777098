"""What `/v1/models` says about the served model: its quantization and the quality measured for it."""
from __future__ import annotations

from typing import Any

from server.protocol import ModelCard, QualityCard, QuantizationCard


def quality_cards(quality: dict[str, Any] | None) -> list[QualityCard]:
    """quantization.json's "quality" ({dataset: {perplexity, kl_divergence, ...}}) as cards."""
    cards = []
    for dataset, figures in (quality or {}).items():
        if isinstance(figures, dict) and isinstance(figures.get("perplexity"), (int, float)):
            cards.append(QualityCard(dataset=dataset, **{k: figures.get(k) for k in QualityCard.model_fields
                                                         if k != "dataset" and k in figures}))
    return cards


def quantization_card(loaded: Any) -> QuantizationCard | None:
    """From a quantized checkpoint's manifest, or "none" with the parameter width of an unquantized model;
    None when neither is known (a test double)."""
    manifest = getattr(loaded, "quantization", None)
    if manifest:
        return QuantizationCard(method=manifest["method"], bits_per_weight=manifest["bits_per_weight"],
                                bits=manifest.get("bits"), group_size=manifest.get("group_size"),
                                rank=manifest.get("rank"), quality=quality_cards(manifest.get("quality")))
    model = getattr(loaded, "model", None)
    if model is None:
        return None
    weight = model.model.norm.weight  # the checkpoint's width (the served lm_head may be int8)
    return QuantizationCard(method="none", bits_per_weight=float(weight.element_size() * 8))


def model_card(engine: Any) -> ModelCard:
    return ModelCard(id=engine.model_name, max_model_len=engine.max_seq_len,
                     quantization=quantization_card(engine.loaded))
