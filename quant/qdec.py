"""QDEC residuals of a quantized checkpoint: extract, quantize to 4 bits, store, verify, load.

    extract_residuals(checkpoint_dir)    # after `fbserve quantize`; writes two files into the directory

  residuals.safetensors  per quantized linear `<layer>`:
      <layer>.rcodes          uint8 (K, ceil(N/2))  4-bit codes of R = W - W_hat, input-channel-major
                              (cuda_ext.qdec_reference: one contiguous row per input channel)
      <layer>.rscales         fp16 (N,)             one scale per output channel (MSE grid search)
      <layer>.act_thresholds  fp32 (2,)             (lo, hi) bucket range of |x| for the approximate top-k
      <layer>.act_mean        fp32 (K,)             mean |x| per input channel (static-selection ablation)
  residuals.json         `ResidualManifest`: sha256 of residuals.safetensors, every tensor's dtype/shape,
                         the source model, calibration, and per-layer relative residual errors

W is the source model's weight (fp32); W_hat is what serving computes: dequant(packed codes) + B @ A
from the stored fp16 factors, in fp32 (the CPU int4 path additionally rounds the scales to bf16).
Activation statistics come from the quantized model itself on calibration text (what serving sees).
`load_residuals` validates everything and raises `ResidualError`; callers then run without QDEC.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import tempfile
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cuda_ext.qdec_reference import CODE_MAX, exact_topk, pack_rows
from quant.checkpoint import sha256_file

log = logging.getLogger("fbserve.qdec")
RESIDUALS = "residuals.safetensors"
RESIDUAL_MANIFEST = "residuals.json"
GRID = 32  # scale candidates per output channel
# Threshold quantiles of |x| over calibration tokens and channels: hi ~ 1 channel in 1024 above it; lo
# leaves ~K_CHUNK_MAX channels of the narrowest selection chunk above it (1 in 8 of a full 1024-chunk),
# so k_chunk up to K_CHUNK_MAX lands between them and the 32 buckets resolve the top-k boundary. A
# fixed 1-in-8 lo (the first version) left too few channels above lo in narrow chunks (576-wide
# SmolLM2 layers, the 512 tail of 1536): approx recall of exact top-k fell to 61% at k_chunk 64.
HI_QUANTILE = 1.0 - 1.0 / 1024
K_CHUNK_MAX = 128


def lo_quantile(k: int) -> float:
    """The lo threshold's quantile for a layer with K = k input channels (1 - 1/8 for 1024-multiples)."""
    from cuda_ext.qdec_reference import CHUNK

    width = CHUNK if k % CHUNK == 0 else min(CHUNK, k % CHUNK)  # the narrowest chunk of the layer
    return 1.0 - min(0.5, K_CHUNK_MAX / width)
SUFFIXES = ("rcodes", "rscales", "act_thresholds", "act_mean")


class ResidualError(ValueError):
    """Residual files missing, damaged or inconsistent with the model; the message names the problem."""


class ResidualLayer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    shape: tuple[int, int]  # (N out, K in)
    rel_error: float  # ||R||_F / ||W||_F: the residual the correction can recover
    rel_error_after: float  # ||R - R_q||_F / ||W||_F: what stays with every channel corrected


class ResidualManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: str = "fbserve-qdec-residuals"
    format_version: int = 1
    bits: int = 4
    source_model: str
    checkpoint_sha256: str  # quantization.json's checksum of model.safetensors: residuals of that W_hat
    calibration: dict
    files: dict[str, str]  # file -> sha256
    tensors: dict[str, tuple[str, list[int]]]  # name -> (dtype, shape)
    layers: dict[str, ResidualLayer]
    created: str


# ---- quantizing for QDEC --------------------------------------------------------------------------------

def salient_masked(x: torch.Tensor, k_chunk: int) -> torch.Tensor:
    """x (T, K) with each row's k_chunk largest |x| per 1024-chunk set to 0: what QDEC leaves uncorrected.

    Its Gram matrix is the quantization objective of `fbserve quantize --qdec-aware K` (QuantConfig.
    qdec_k_chunk): the error of the channels QDEC fetches back costs (almost) nothing, so GPTQ's error
    feedback no longer cancels the rest of the error against them (bench/RESULTS.md, "QDEC")."""
    idx = exact_topk(x, k_chunk)
    return x.scatter(1, idx, 0.0)


def qdec_gram(x: torch.Tensor, k_chunk: int, mix: float) -> torch.Tensor:
    """Unnormalised Gram matrix (K, K) of `--qdec-aware k_chunk --qdec-mix mix` for inputs x (T, K) fp32:
    salient_masked(x)^T salient_masked(x) + mix * x^T x."""
    masked = salient_masked(x, k_chunk)
    return masked.T @ masked + mix * (x.T @ x)


# ---- the 4-bit residual quantizer ----------------------------------------------------------------------

def quantize_residual(r: torch.Tensor, grid: int = GRID) -> tuple[torch.Tensor, torch.Tensor]:
    """4-bit symmetric quantization of R (N, K) fp32, one scale per output channel (row of R).

    Candidates s_j = (j / grid) * max|r_n| / 7, j = 1..grid; the one with the least squared error
    wins. Returns int8 codes (N, K) in [-7, 7] and fp16 scales (N,); the error is measured with the
    fp16-rounded scale, as served."""
    r = r.float()
    amax = r.abs().amax(1).clamp_min(1e-12)  # (N,)
    best_err = torch.full_like(amax, float("inf"))
    best_s = amax / CODE_MAX
    for j in range(1, grid + 1):
        s = (amax * (j / grid) / CODE_MAX).half().float().clamp_min(1e-8)  # (N,)
        q = (r / s[:, None]).round().clamp(-CODE_MAX, CODE_MAX)
        err = ((q * s[:, None] - r) ** 2).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
    codes = (r / best_s[:, None]).round().clamp(-CODE_MAX, CODE_MAX).to(torch.int8)
    return codes, best_s.half()


def served_weight(q) -> torch.Tensor:
    """fp32 (N, K) W_hat of a QuantLinear: dequant(packed) (+ B @ A) from the stored tensors."""
    from cuda_ext import dequantize_packed

    w = dequantize_packed(q.packed)
    if q.A is not None:
        w = w + q.B.float() @ q.A.float()
    return w


# ---- extraction -----------------------------------------------------------------------------------------

@torch.inference_mode()
def activation_stats(model, tokens: torch.Tensor, names: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per linear in `names`: (thresholds fp32 (2,), mean |x| fp32 (K,)) over calibration `tokens` (S, T)."""
    mods = dict(model.named_modules())
    samples: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    sums: dict[str, torch.Tensor] = {}
    width: dict[str, int] = {}
    count = [0]
    gen = torch.Generator().manual_seed(0)

    def hook(name):
        def f(_m, inp, _out):
            a = inp[0].detach().reshape(-1, inp[0].shape[-1]).abs().float()  # (tokens, K)
            width[name] = a.shape[1]
            sums[name] = sums.get(name, 0) + a.sum(0)
            # a random subsample of |x| values keeps the quantiles cheap
            flat = a.reshape(-1)
            samples[name].append(flat[torch.randint(0, flat.numel(), (min(flat.numel(), 200_000),), generator=gen)])
        return f

    handles = [mods[n].register_forward_hook(hook(n)) for n in names]
    try:
        for i in range(tokens.shape[0]):
            model(tokens[i:i + 1])
            count[0] += tokens.shape[1]
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n in names:
        v = torch.cat(samples[n])
        lo, hi = torch.quantile(v, torch.tensor([lo_quantile(width[n]), HI_QUANTILE])).tolist()
        hi = max(hi, lo * (1 + 1e-3) + 1e-6)
        out[n] = (torch.tensor([lo, hi], dtype=torch.float32), (sums[n] / count[0]).float())
    return out


def extract_residuals(checkpoint: Path, source: str | None = None, calib: str | Path | None = None,
                      n_samples: int = 16, seqlen: int = 512, seed: int = 0) -> Path:
    """Write residuals.safetensors + residuals.json into the quantized `checkpoint` directory.

    `source`: the unquantized model (default: quantization.json's `model`). Returns the tensor file."""
    from engine.quant_linear import QuantLinear
    from models.loader import load_model
    from quant.calibration import calibration_tokens, resolve_calibration_file
    from quant.checkpoint import read_manifest

    checkpoint = Path(checkpoint)
    manifest = read_manifest(checkpoint)
    source = source or manifest.model
    calib_file = resolve_calibration_file(calib)
    q = load_model(str(checkpoint), device="cpu", dtype=torch.float32)
    ref = load_model(source, device="cpu", dtype=torch.float32)
    ref_mods = dict(ref.model.named_modules())
    names = [n for n, m in q.model.named_modules() if isinstance(m, QuantLinear)]
    tokens = calibration_tokens(q.tokenizer, calib_file, n_samples, seqlen, seed)
    log.info("loaded %s and %s; activation statistics on %d x %d calibration tokens", checkpoint, source,
             *tokens.shape)
    stats = activation_stats(q.model, tokens, names)
    log.info("activation statistics done; quantizing %d residuals", len(names))
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, ResidualLayer] = {}
    for name in names:
        ql = q.model.get_submodule(name)
        w = ref_mods[name].weight.detach().float()
        r = w - served_weight(ql)  # (N, K)
        codes, scales = quantize_residual(r)
        rq = codes.float() * scales.float()[:, None]
        wn = float(w.norm())
        layers[name] = ResidualLayer(shape=tuple(w.shape), rel_error=float(r.norm()) / wn,
                                     rel_error_after=float((r - rq).norm()) / wn)
        thr, mean = stats[name]
        tensors[f"{name}.rcodes"] = pack_rows(codes.t().contiguous())  # (K, ceil(N/2))
        tensors[f"{name}.rscales"] = scales.contiguous()
        tensors[f"{name}.act_thresholds"] = thr
        tensors[f"{name}.act_mean"] = mean.contiguous()
    write_residuals(checkpoint, tensors, layers, source,
                    {"file": str(calib_file), "n_samples": n_samples, "seqlen": seqlen, "seed": seed},
                    manifest.files.get("model.safetensors", ""))
    mean_before = sum(v.rel_error for v in layers.values()) / len(layers)
    mean_after = sum(v.rel_error_after for v in layers.values()) / len(layers)
    log.info("wrote %s: %d layers, mean relative weight error %.4f -> %.4f with every channel corrected",
             checkpoint / RESIDUALS, len(layers), mean_before, mean_after)
    return checkpoint / RESIDUALS


def write_residuals(checkpoint: Path, tensors: dict[str, torch.Tensor], layers: dict[str, ResidualLayer],
                    source: str, calibration: dict, checkpoint_sha256: str) -> None:
    """Write the tensor file, then the manifest with its checksum (each through a temporary + rename)."""
    checkpoint = Path(checkpoint)
    fd, tmp = tempfile.mkstemp(dir=checkpoint, prefix=".residuals-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"format": "pt"})
        digest = sha256_file(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, checkpoint / RESIDUALS)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    m = ResidualManifest(source_model=source, checkpoint_sha256=checkpoint_sha256, calibration=calibration,
                         files={RESIDUALS: digest},
                         tensors={k: (str(v.dtype).removeprefix("torch."), list(v.shape)) for k, v in sorted(tensors.items())},
                         layers=layers, created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    (checkpoint / (RESIDUAL_MANIFEST + ".tmp")).write_text(m.model_dump_json(indent=1))
    os.replace(checkpoint / (RESIDUAL_MANIFEST + ".tmp"), checkpoint / RESIDUAL_MANIFEST)


# ---- loading --------------------------------------------------------------------------------------------

def load_residuals(checkpoint: Path, shapes: dict[str, tuple[int, int]]) -> dict[str, dict[str, torch.Tensor]]:
    """Verify and load the residuals of `checkpoint` for linears `shapes` {name: (N, K)}.

    Returns {name: {"rcodes", "rscales", "act_thresholds", "act_mean"}} as CPU tensors. Raises
    ResidualError when a file is missing, the checksum or any dtype/shape is wrong, or a layer lacks
    residuals."""
    checkpoint = Path(checkpoint)
    mpath, tpath = checkpoint / RESIDUAL_MANIFEST, checkpoint / RESIDUALS
    if not mpath.is_file() or not tpath.is_file():
        raise ResidualError(f"no residuals in {checkpoint} ({RESIDUAL_MANIFEST} / {RESIDUALS} missing); "
                            "run `python -m quant.qdec --checkpoint DIR` to extract them")
    try:
        m = ResidualManifest.model_validate_json(mpath.read_text())
    except (ValidationError, ValueError) as e:
        raise ResidualError(f"{mpath}: invalid manifest: {e}") from e
    actual = sha256_file(tpath)
    if m.files.get(RESIDUALS) != actual:
        raise ResidualError(f"{tpath}: sha256 {actual[:16]}... does not match {RESIDUAL_MANIFEST}: damaged or changed")
    try:
        state = load_file(str(tpath))
    except (SafetensorError, OSError) as e:
        raise ResidualError(f"{tpath}: unreadable: {e}") from e
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, (n, k) in shapes.items():
        want = {"rcodes": (torch.uint8, (k, (n + 1) // 2)), "rscales": (torch.float16, (n,)),
                "act_thresholds": (torch.float32, (2,)), "act_mean": (torch.float32, (k,))}
        layer = {}
        for suffix, (dtype, shape) in want.items():
            t = state.get(f"{name}.{suffix}")
            if t is None:
                raise ResidualError(f"{tpath}: no tensor {name}.{suffix}")
            if t.dtype != dtype or tuple(t.shape) != shape:
                raise ResidualError(f"{name}.{suffix}: {t.dtype} {tuple(t.shape)}, expected {dtype} {shape}")
            layer[suffix] = t
        lo, hi = layer["act_thresholds"].tolist()
        if not (0 <= lo < hi) or not torch.isfinite(layer["rscales"].float()).all():
            raise ResidualError(f"{name}: invalid thresholds ({lo}, {hi}) or non-finite scales")
        out[name] = layer
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m quant.qdec --checkpoint DIR [--source MODEL] [--calib FILE] [--n-samples N]`."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m quant.qdec", description=extract_residuals.__doc__)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--source", default=None)
    p.add_argument("--calib", default=None)
    p.add_argument("--n-samples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(extract_residuals(args.checkpoint, args.source, args.calib, args.n_samples, args.seqlen))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
