"""Load a model from a Hugging Face directory, a GGUF file, or the embedded default.

A GGUF file (the embedded default is one) is converted once through `transformers` + `gguf` into a
Hugging Face style directory (config.json, model.safetensors, tokenizer files) under `$FBSERVE_HOME`,
so later starts read safetensors directly.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from models.config import ModelConfig
from models.embedded import DEFAULT_MODEL_NAME, default_gguf_path
from models.llama import Transformer, rope_inverse_frequencies

log = logging.getLogger("fbserve.models")


def fbserve_home() -> Path:
    """The cache directory: `$FBSERVE_HOME`, default `~/.cache/fbserve`."""
    return Path(os.environ.get("FBSERVE_HOME", Path.home() / ".cache" / "fbserve")).expanduser()


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: object  # a transformers tokenizer (fast), with the chat template
    name: str
    path: Path
    quantization: dict | None = None  # quantization.json of a quantized checkpoint


PRESET_SPEC = "default-fbquant"  # the embedded model quantized with quant.preset's FBQuant settings (built once)


def resolve_model_dir(spec: str, device: str | torch.device = "cpu") -> Path:
    """Map `default` | `default-fbquant` | HF dir | GGUF file to a model directory, converting or
    quantizing once (`device` runs the one-time quantization of the preset)."""
    if spec == "default":
        return convert_gguf(default_gguf_path(), fbserve_home() / "models" / DEFAULT_MODEL_NAME)
    if spec == PRESET_SPEC:
        from quant.calibration import CalibrationDataError
        from quant.preset import ensure_default_checkpoint

        try:
            return ensure_default_checkpoint(device=str(torch.device(device).type))
        except CalibrationDataError as e:
            raise CalibrationDataError(f"{e}; the one-time quantization of {PRESET_SPEC} calibrates on it "
                                       f"(or serve --model default, unquantized)") from e
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        digest = hashlib.sha256(f"{path.resolve()}:{path.stat().st_size}:{path.stat().st_mtime_ns}".encode()).hexdigest()
        return convert_gguf(path, fbserve_home() / "models" / f"{path.stem}-{digest[:12]}")
    if not path.is_dir():
        raise FileNotFoundError(f"model {spec!r}: not 'default', a directory or a .gguf file")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model directory {path} has no config.json")
    return path


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF checkpoint through transformers into `out_dir` (skipped if already there)."""
    if (out_dir / "model.safetensors").is_file() and (out_dir / "config.json").is_file():
        return out_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once)", gguf, out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=".convert-"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        state = {k: v.contiguous() for k, v in hf.state_dict().items()}
        if getattr(hf.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt", "source": gguf.name})
        (tmp / "config.json").write_text(json.dumps(hf.config.to_dict(), indent=2))
        tokenizer.save_pretrained(str(tmp))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def read_config(model_dir: Path) -> ModelConfig:
    return ModelConfig.from_hf(json.loads((model_dir / "config.json").read_text()))


def load_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of the directory's safetensors files (single file or shards)."""
    files = sorted(model_dir.glob("*.safetensors"))
    files = [f for f in files if f.name != "residuals.safetensors"]
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {model_dir}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def build_model(config: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype,
                device: torch.device | str) -> Transformer:
    """Instantiate without initialising, then assign the checkpoint tensors (validated by name and shape)."""
    with torch.device("meta"):
        model = Transformer(config)
    expected = model.state_dict()
    wanted = {k for k in expected if not (config.tie_word_embeddings and k == "lm_head.weight")}
    missing = sorted(wanted - state.keys())
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    for k in wanted:
        if tuple(state[k].shape) != tuple(expected[k].shape):
            raise ValueError(f"tensor {k}: shape {tuple(state[k].shape)} != expected {tuple(expected[k].shape)}")
    model.load_state_dict({k: state[k].to(device=device, dtype=dtype) for k in wanted}, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # Buffers are not in the checkpoint: rebuild them off the meta device.
    model.register_buffer("inv_freq", rope_inverse_frequencies(config).to(device), persistent=False)
    return model.eval()


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU (int4 CPU matmul and SDPA are fastest there), fp16 on CUDA."""
    return torch.float16 if device.type == "cuda" else torch.float32


def load_model(spec: str = "default", device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> LoadedModel:
    """Load `default`, a HF directory, a GGUF file or a quantized fbserve checkpoint onto `device`."""
    from transformers import AutoTokenizer

    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    model_dir = resolve_model_dir(spec, device)
    name = {"default": DEFAULT_MODEL_NAME, PRESET_SPEC: f"{DEFAULT_MODEL_NAME}-fbquant"}.get(spec, model_dir.name)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    config = read_config(model_dir)
    if (model_dir / "quantization.json").is_file():
        from quant.checkpoint import load_quantized_model

        model, manifest = load_quantized_model(model_dir, config, dtype=dtype, device=device)
        return LoadedModel(model, tokenizer, name, model_dir, manifest)
    model = build_model(config, load_state_dict(model_dir), dtype, device)
    return LoadedModel(model, tokenizer, name, model_dir)
