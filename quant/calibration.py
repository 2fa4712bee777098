"""Calibration text: WikiText-2 validation by default (or any UTF-8 text file), cut into token windows.

The default file is `<data>/wikitext-2-raw/wiki.valid.raw` where `<data>` is `$FBSERVE_DATA` if set,
else `../shared/data` relative to the repository root. Windows of `seqlen` tokens start at offsets
drawn with `seed` (GPTQ's protocol), so the same seed gives the same calibration set.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CALIBRATION = Path("wikitext-2-raw") / "wiki.valid.raw"


class CalibrationDataError(FileNotFoundError):
    """The calibration text is missing or too short."""


def data_dir() -> Path:
    """The shared data directory: `$FBSERVE_DATA`, else `../shared/data` next to the repository."""
    env = os.environ.get("FBSERVE_DATA")
    return Path(env).expanduser() if env else (REPO_ROOT.parent / "shared" / "data").resolve()


def default_calibration_file() -> Path:
    return data_dir() / DEFAULT_CALIBRATION


def resolve_calibration_file(path: str | Path | None) -> Path:
    """The file to calibrate on; raises CalibrationDataError naming where it looked when it is missing."""
    p = Path(path).expanduser() if path else default_calibration_file()
    if not p.is_file():
        hint = "" if path else " (set FBSERVE_DATA to the folder holding wikitext-2-raw/, or pass --calib FILE)"
        raise CalibrationDataError(f"calibration text not found: {p}{hint}")
    return p


def calibration_tokens(tokenizer, path: str | Path | None, n_samples: int, seqlen: int, seed: int) -> Tensor:
    """`n_samples` windows of `seqlen` tokens, int64 (n_samples, seqlen), from the text at `path`.

    The text is tokenized once as a whole, as it is in the file.
    """
    file = resolve_calibration_file(path)
    text = file.read_text(encoding="utf-8")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False)["input_ids"][0]
    if ids.numel() <= seqlen:
        raise CalibrationDataError(f"{file}: {ids.numel()} tokens, fewer than one window of {seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (n_samples,), generator=gen)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])
