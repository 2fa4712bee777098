"""The quantized checkpoint directory: write it, verify it, load it into a Transformer with QuantLinear.

Layout (safetensors and JSON only):
  config.json         the source model's, copied
  quantization.json   the manifest (`Manifest` below): method, bits, group size, rank, calibration,
                      per-layer errors, bits per weight, quality figures, and the sha256 of each tensor
                      file and the name/dtype/shape of every tensor in it
  model.safetensors   per quantized linear `<name>.qweight/.scales/.zeros/.qmeta` (cuda_ext.PackedWeight,
                      the kernels' layout), `<name>.A` fp16 (r, in), `<name>.B` fp16 (out, r), `<name>.bias`;
                      every other tensor (embeddings, norms, lm_head when untied) unquantized
  tokenizer files     copied from the source directory

Loading checks the manifest schema, every checksum, every tensor's dtype and shape against the manifest
and against the model config, and refuses anything else with `CheckpointError`.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from models.config import ModelConfig
from models.llama import Transformer, rope_inverse_frequencies

MANIFEST = "quantization.json"
TENSORS = "model.safetensors"
FORMAT = "fbserve-quantized"
FORMAT_VERSION = 1
PACKED_SUFFIXES = ("qweight", "scales", "zeros", "qmeta")
# Files of the source directory that are not copied as "tokenizer files".
_NOT_COPIED = {"config.json", MANIFEST}
_NOT_COPIED_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".npz")


class CheckpointError(ValueError):
    """A quantized checkpoint that is missing, damaged or inconsistent; the message names the problem."""


class Calibration(BaseModel):
    model_config = ConfigDict(extra="forbid")
    file: str
    n_samples: int = Field(gt=0)
    seqlen: int = Field(gt=0)
    seed: int


class LayerRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    shape: tuple[int, int]  # (out, in)
    error: float  # relative output error tr(E H E^T) / tr(W H W^T) on the calibration inputs
    start_error: float | None = None  # FBQuant: the error of its GPTQ+QERA (or RTN+QERA) start
    bits_per_weight: float
    seconds: float


class TensorRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dtype: str
    shape: list[int]


class Manifest(BaseModel):
    """quantization.json."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    format: Literal["fbserve-quantized"] = FORMAT
    format_version: Literal[1] = FORMAT_VERSION
    packing: str  # the kernels' packed layout, e.g. "fbq1"
    model: str  # what was quantized: "default" or the source directory
    method: Literal["rtn", "gptq", "svd", "lqer", "qera", "fbquant"]
    base_quantizer: Literal["rtn", "gptq"]
    bits: Literal[2, 3, 4]
    group_size: Literal[32, 64, 128]
    rank: int = Field(ge=0)
    options: dict[str, Any] = {}  # damping, act-order, FBQuant rounds/projection/scale refit
    calibration: Calibration
    bits_per_weight: float  # over the quantized linears, codes + fp16 scales/zeros + fp16 factors
    quantized_modules: list[str]
    layers: dict[str, LayerRecord]
    quality: dict[str, Any] | None = None  # filled by quant.eval at quantize time when it ran
    files: dict[str, str]  # tensor file -> sha256
    tensors: dict[str, TensorRecord]  # every tensor of model.safetensors
    created: str
    seconds: float
    versions: dict[str, str] = {}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def tensor_records(tensors: dict[str, torch.Tensor]) -> dict[str, TensorRecord]:
    return {k: TensorRecord(dtype=_dtype_name(v), shape=list(v.shape)) for k, v in sorted(tensors.items())}


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer (and other small side) files of a HF directory; returns their names."""
    copied = []
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name not in _NOT_COPIED and not f.name.endswith(_NOT_COPIED_SUFFIXES):
            shutil.copy2(f, dst / f.name)
            copied.append(f.name)
    return copied


def write_checkpoint(out_dir: Path, source_dir: Path, tensors: dict[str, torch.Tensor], manifest: dict) -> Path:
    """Write the directory atomically (a temporary sibling renamed into place) and return it.

    `tensors`: everything for model.safetensors; `manifest`: the Manifest fields except `files`/`tensors`.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    try:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        # one metadata key: safetensors writes a map in random order, and the file must be byte-reproducible
        save_file(tensors, str(tmp / TENSORS), metadata={"format": "pt"})
        shutil.copy2(source_dir / "config.json", tmp / "config.json")
        copy_tokenizer_files(source_dir, tmp)
        full = Manifest(**manifest, files={TENSORS: sha256_file(tmp / TENSORS)}, tensors=tensor_records(tensors))
        (tmp / MANIFEST).write_text(full.model_dump_json(indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def read_manifest(model_dir: Path) -> Manifest:
    """Parse and schema-check quantization.json (no checksums)."""
    path = Path(model_dir) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{model_dir} is not a quantized checkpoint: no {MANIFEST}")
    try:
        return Manifest.model_validate_json(path.read_text())
    except (ValidationError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid manifest: {e}") from e


def update_quality(model_dir: Path, quality: dict) -> None:
    """Record quality figures in quantization.json (not covered by the tensor checksums)."""
    m = read_manifest(model_dir)
    m.quality = quality
    (Path(model_dir) / MANIFEST).write_text(m.model_dump_json(indent=2))


def verify_checkpoint(model_dir: Path) -> tuple[Manifest, dict[str, torch.Tensor]]:
    """Schema, checksums, and dtypes/shapes against the manifest; returns the manifest and the tensors."""
    model_dir = Path(model_dir)
    m = read_manifest(model_dir)
    if TENSORS not in m.files:
        raise CheckpointError(f"{model_dir / MANIFEST}: no checksum for {TENSORS}")
    for name, digest in m.files.items():
        path = model_dir / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (listed in {MANIFEST})")
        actual = sha256_file(path)
        if actual != digest:
            raise CheckpointError(f"{path}: sha256 {actual[:16]}... does not match the manifest's {digest[:16]}...: "
                                  "the file is damaged or was changed; re-run `fbserve quantize`")
    try:
        tensors = load_file(str(model_dir / TENSORS))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{model_dir / TENSORS}: unreadable: {e}") from e
    if set(tensors) != set(m.tensors):
        extra, missing = sorted(set(tensors) - set(m.tensors)), sorted(set(m.tensors) - set(tensors))
        raise CheckpointError(f"{model_dir / TENSORS}: tensors differ from the manifest (unexpected {extra[:3]}, "
                              f"missing {missing[:3]})")
    for name, rec in m.tensors.items():
        t = tensors[name]
        if _dtype_name(t) != rec.dtype or list(t.shape) != rec.shape:
            raise CheckpointError(f"tensor {name}: {_dtype_name(t)} {list(t.shape)} in the file, "
                                  f"manifest says {rec.dtype} {rec.shape}")
    return m, tensors


def _expect(cond: bool, msg: str) -> None:
    if not cond:
        raise CheckpointError(msg)


def load_quantized_model(model_dir: Path, config: ModelConfig, dtype: torch.dtype,
                         device: torch.device | str) -> tuple[Transformer, dict]:
    """Build the Transformer of `config` from a verified checkpoint, each quantized nn.Linear swapped for
    engine.quant_linear.QuantLinear; returns (model in eval mode on `device`, manifest dict).

    Non-quantized tensors are cast to `dtype`; packed weights and fp16 factors keep their dtypes.
    Raises CheckpointError on any damage or inconsistency with `config`.
    """
    from cuda_ext import PackedWeight
    from engine.quant_linear import QuantLinear

    m, state = verify_checkpoint(Path(model_dir))
    with torch.device("meta"):
        model = Transformer(config)
    quantized = set(m.quantized_modules)
    linears = {name: mod for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    _expect(quantized <= set(linears), f"manifest names modules the model does not have: "
                                       f"{sorted(quantized - set(linears))[:3]}")
    expected = model.state_dict()
    plain = {k for k in expected
             if not (config.tie_word_embeddings and k == "lm_head.weight")
             and not any(k.startswith(q + ".") for q in quantized)}
    missing = sorted(plain - state.keys())
    _expect(not missing, f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    for k in plain:
        _expect(tuple(state[k].shape) == tuple(expected[k].shape),
                f"tensor {k}: shape {tuple(state[k].shape)} != {tuple(expected[k].shape)} from config.json")
    model.load_state_dict({k: state[k].to(device=device, dtype=dtype) for k in plain}, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    for name in m.quantized_modules:
        lin = linears[name]
        p = name + "."
        try:
            packed = PackedWeight.from_state_dict(state, p)
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{name}: packed weight invalid: {e}") from e
        _expect((packed.out_features, packed.in_features) == (lin.out_features, lin.in_features),
                f"{name}: packed {packed.out_features}x{packed.in_features}, config.json says "
                f"{lin.out_features}x{lin.in_features}")
        _expect((packed.bits, packed.group_size) == (m.bits, m.group_size),
                f"{name}: packed as {packed.bits}-bit g{packed.group_size}, manifest says {m.bits}-bit g{m.group_size}")
        a, b = state.get(p + "A"), state.get(p + "B")
        if m.rank:
            _expect(a is not None and b is not None, f"{name}: rank {m.rank} but no A/B factors")
            _expect(tuple(a.shape) == (m.rank, lin.in_features) and a.dtype == torch.float16,
                    f"{name}.A: {a.dtype} {tuple(a.shape)}, expected float16 ({m.rank}, {lin.in_features})")
            _expect(tuple(b.shape) == (lin.out_features, m.rank) and b.dtype == torch.float16,
                    f"{name}.B: {b.dtype} {tuple(b.shape)}, expected float16 ({lin.out_features}, {m.rank})")
        else:
            _expect(a is None and b is None, f"{name}: A/B factors in a rank-0 checkpoint")
        bias = state.get(p + "bias")
        _expect((bias is not None) == (lin.bias is not None), f"{name}: bias presence differs from config.json")
        if bias is not None:
            _expect(tuple(bias.shape) == (lin.out_features,), f"{name}.bias: shape {tuple(bias.shape)}")
            bias = bias.to(device=device, dtype=dtype)
        q = QuantLinear(packed.to(device), None if a is None else a.to(device), None if b is None else b.to(device),
                        bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q)
    model.register_buffer("inv_freq", rope_inverse_frequencies(config).to(device), persistent=False)
    return model.eval(), json.loads(m.model_dump_json())
