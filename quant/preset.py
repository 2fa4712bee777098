"""The `make serve` preset: the embedded default model quantized with FBQuant once, cached in $FBSERVE_HOME.

The first start builds it (a progress bar per linear); later starts find it, verify it and reuse it.
Settings (bench/RESULTS.md, "Quantization", has the measurements behind them):
  4-bit, groups of 128, rank 16, GPTQ under the loop, 1 FBQuant round, 16 x 256 calibration tokens of
  WikiText-2 validation; a quick quality figure (8 WikiText-2 test windows of 512 tokens: perplexity, KL
  and top-1 agreement to the unquantized model) is measured once and served by /v1/models.
  3 bits lose too much on a 135M model for a served default (perplexity and
  answers degrade); the 4-bit branch keeps "Paris" and most of the unquantized model's quality.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import time
from collections.abc import Iterator
from pathlib import Path

from quant.checkpoint import CheckpointError, verify_checkpoint
from quant.fbquant import FBQuantConfig
from quant.methods import QuantConfig

log = logging.getLogger("fbserve.quant")

PRESET_VERSION = 2  # bump when the settings below change: a new cache directory is built
PRESET = QuantConfig(method="fbquant", bits=4, group_size=128, rank=16, fb=FBQuantConfig(rounds=1))
PRESET_CALIBRATION = {"n_samples": 16, "seqlen": 256, "seed": 0}
PRESET_QUALITY = {"eval_windows": 8, "eval_ctx": 512}


def preset_name(cfg: QuantConfig = PRESET) -> str:
    return f"{cfg.method}-w{cfg.bits}g{cfg.group_size}r{cfg.rank}-v{PRESET_VERSION}"


def default_checkpoint_dir(home: Path | None = None) -> Path:
    from models.embedded import DEFAULT_MODEL_NAME
    from models.loader import fbserve_home

    return (home or fbserve_home()) / "quantized" / f"{DEFAULT_MODEL_NAME}-{preset_name()}"


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    """An exclusive file lock, so two servers starting at once build the checkpoint only once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_default_checkpoint(home: Path | None = None, model: str = "default", calib: str | Path | None = None,
                              device: str = "cpu", progress: bool = True, measure_quality: bool = True) -> Path:
    """The preset checkpoint's directory, building it first if it is missing or fails verification.

    `home` defaults to $FBSERVE_HOME; `model`, `calib` and `measure_quality` exist for tests (the preset is
    for `default` calibrated on WikiText-2 validation, its quality measured on WikiText-2 test). Raises
    CalibrationDataError when the calibration text is missing.
    """
    from quant.quantize import quantize_checkpoint

    out = default_checkpoint_dir(home)
    with _build_lock(out.parent / f".{out.name}.lock"):
        if (out / "quantization.json").is_file():
            try:
                verify_checkpoint(out)
                return out
            except CheckpointError as e:
                log.warning("cached preset checkpoint is damaged (%s): rebuilding it", e)
        log.info("building the default quantized checkpoint (%s, once) in %s", preset_name(), out)
        t0 = time.perf_counter()
        quality = PRESET_QUALITY if measure_quality else {"eval_windows": 0}
        quantize_checkpoint(model, PRESET, out, calib=calib, device=device, progress=progress,
                            **PRESET_CALIBRATION, **quality)
        log.info("default quantized checkpoint ready in %.0f s", time.perf_counter() - t0)
    return out


def greedy_answer(model_dir: Path | str, question: str, max_new_tokens: int = 16) -> str:
    """The model's greedy chat answer to `question` (a smoke check of a checkpoint, no KV cache)."""
    import torch

    from models.loader import load_model

    lm = load_model(str(model_dir))
    ids = lm.tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_tensors="pt")
    ids = ids if torch.is_tensor(ids) else ids["input_ids"]
    start = ids.shape[1]
    eos = set(lm.model.config.eos_ids()) | {lm.tokenizer.eos_token_id}
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = lm.model(ids)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
            if int(nxt) in eos:
                break
    return lm.tokenizer.decode(ids[0, start:], skip_special_tokens=True).strip()


def main() -> int:
    """`python -m quant.preset`: build (or find) the preset checkpoint, time it, and ask it one question."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    out = ensure_default_checkpoint()
    print(f"{out} ready in {time.perf_counter() - t0:.0f} s")
    print("Q: What is the capital of France?\nA:", greedy_answer(out, "What is the capital of France?"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
