"""qdec_tuning.json: what `fbserve tune-qdec` measured and chose, and how serving picks k_chunk from it.

    tuning, note = load(checkpoint_dir, device="cuda")   # (None, why) when absent, invalid or another device
    choose_k(tuning, budget_pct=2.5) -> {"qkv": 8, "o": 8, "gate_up": 16, "down": 8}

The file (schema QdecTuning, written by engine.qdec_tune):
    {"device": "cpu" | "cuda", "device_name", "torch_threads", "selection", "steps", "base_step_s",
     "layer_types": {"qkv": {"k_chunk": [0, 8, ...], "added_s": [0.0, ...]}, ...},
     "chosen": {"budget_pct": 2.5, "k_chunk": {"qkv": 8, ...}}, "note"}
Timings are only meaningful on the kind of device they were measured on, so a file measured on another
device type is not used (load says why).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

from pydantic import (BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt,
                      model_validator)

log = logging.getLogger("fbserve.qdec")
TUNING_FILE = "qdec_tuning.json"
DEFAULT_BUDGET_PCT = 2.5


class LayerTypeTiming(BaseModel):
    """Added decode-step seconds (all layers of this type) at each k_chunk measured; k_chunk[0] is 0."""
    model_config = ConfigDict(extra="forbid")
    k_chunk: list[NonNegativeInt] = Field(min_length=1)
    added_s: list[NonNegativeFloat]

    @model_validator(mode="after")
    def _aligned(self) -> LayerTypeTiming:
        if len(self.k_chunk) != len(self.added_s):
            raise ValueError("k_chunk and added_s differ in length")
        if self.k_chunk[0] != 0 or any(b <= a for a, b in zip(self.k_chunk, self.k_chunk[1:])):
            raise ValueError(f"k_chunk must start at 0 and increase: {self.k_chunk}")
        return self


class TunedChoice(BaseModel):
    """The k_chunk per layer type chosen for a slowdown budget (percent of the base decode step)."""
    model_config = ConfigDict(extra="forbid")
    budget_pct: PositiveFloat
    k_chunk: dict[str, NonNegativeInt]


class QdecTuning(BaseModel):
    model_config = ConfigDict(extra="forbid")
    device: Literal["cpu", "cuda"]
    device_name: str
    torch_threads: PositiveInt
    selection: str
    steps: PositiveInt
    base_step_s: PositiveFloat
    layer_types: dict[str, LayerTypeTiming] = Field(min_length=1)
    chosen: TunedChoice | None = None
    note: str = ""

    @model_validator(mode="after")
    def _choice_was_measured(self) -> QdecTuning:
        for t, k in (self.chosen.k_chunk.items() if self.chosen else ()):
            if t not in self.layer_types or k not in self.layer_types[t].k_chunk:
                raise ValueError(f"chosen k_chunk {k} for {t!r} was not measured")
        return self


def load(checkpoint: Path | str, device: str) -> tuple[QdecTuning | None, str | None]:
    """The checkpoint's tuning for `device` ("cpu" | "cuda"), or None and why (None, None: no file)."""
    p = Path(checkpoint) / TUNING_FILE
    if not p.is_file():
        return None, None
    try:
        t = QdecTuning.model_validate(json.loads(p.read_text()))
    except ValueError as e:  # JSONDecodeError and pydantic's ValidationError are ValueErrors
        note = f"{TUNING_FILE} ignored: invalid ({str(e).splitlines()[0]})"
        log.error("QDEC: %s: %s", p, e)
        return None, note
    if t.device != device:
        note = f"{TUNING_FILE} ignored: measured on {t.device} ({t.device_name}), this model runs on {device}"
        log.warning("QDEC: %s", note)
        return None, note
    return t, None


def choose_k(tuning: QdecTuning, budget_pct: float) -> dict[str, int]:
    """Per layer type, the largest measured k_chunk whose added time, summed over types, stays within
    budget_pct of the base decode step. Greedy: raise the type with the cheapest next step first."""
    budget = tuning.base_step_s * budget_pct / 100
    types = tuning.layer_types
    pos = {t: 0 for t in types}
    spent = sum(types[t].added_s[0] for t in types)
    while True:
        steps = [(types[t].added_s[pos[t] + 1] - types[t].added_s[pos[t]], t)
                 for t in types if pos[t] + 1 < len(types[t].k_chunk)]
        steps = [s for s in steps if spent + s[0] <= budget]
        if not steps:
            break
        cost, t = min(steps)
        pos[t] += 1
        spent += cost
    return {t: types[t].k_chunk[pos[t]] for t in types}
