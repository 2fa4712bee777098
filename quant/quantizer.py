"""Group-wise asymmetric uniform quantization (2, 3, 4 bits; groups of 32, 64, 128 along the input).

Format (the contract with cuda_ext), for a linear weight W of shape (N, K) = (out, in):
  codes  uint8 (N, K) in [0, 2^bits - 1]
  scales fp16  (N, G), zeros fp16 (N, G) holding integers in [0, 2^bits - 1], G = ceil(K / g)
  dequant  w[n, k] = (codes[n, k] - zeros[n, k // g]) * scales[n, k // g]
The last group may be partial (SmolLM2's K = 576 = 4 * 128 + 64 at g = 128).

Every dequantization here uses the fp16 scales and zeros exactly as stored, so an error computed
from `QuantizedWeight.dequantize()` is the error serving sees (the product is formed in fp32; an fp16
kernel rounds it once more, a relative 2^-11 at most).

The range of each group always contains 0 (GPTQ's convention): the zero point is then an integer in
[0, 2^bits - 1] and an exact 0 stays exact, so zero-padding a partial group changes nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

SUPPORTED_BITS = (2, 3, 4)
SUPPORTED_GROUPS = (32, 64, 128)
# Shrink factors of the per-group [min, max] tried by the MSE clipping search: 1.00, 0.98, ..., 0.50.
CLIP_GRID = tuple(round(1.0 - 0.02 * i, 2) for i in range(26))
# Smallest stored scale: the fp16 normal minimum, so a constant group never gets a zero scale.
MIN_SCALE = 2.0 ** -14


def check_format(bits: int, group_size: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported (choose from {SUPPORTED_BITS})")
    if group_size not in SUPPORTED_GROUPS:
        raise ValueError(f"group_size={group_size} is not supported (choose from {SUPPORTED_GROUPS})")


def num_groups(k: int, group_size: int) -> int:
    return -(-k // group_size)


def bits_per_weight(n: int, k: int, bits: int, group_size: int, rank: int = 0) -> float:
    """Stored bits per weight of one (n, k) linear: codes, fp16 scale + zero per group, fp16 A and B.

    Exact for a partial last group: 32 * ceil(k / g) / k bits of scale and zero per weight.
    """
    g = num_groups(k, group_size)
    return (n * k * bits + 32 * n * g + 16 * rank * (n + k)) / (n * k)


@dataclass
class QuantizedWeight:
    """Integer codes with their group parameters (see the module docstring for shapes and dtypes)."""

    codes: Tensor  # uint8 (N, K)
    scales: Tensor  # fp16 (N, G)
    zeros: Tensor  # fp16 (N, G), integer-valued
    bits: int
    group_size: int

    def dequantize(self) -> Tensor:
        """fp32 (N, K): (codes - zeros) * scales with the stored fp16 scales and zeros."""
        return dequantize(self.codes, self.scales, self.zeros, self.group_size)

    def to(self, device: torch.device | str) -> "QuantizedWeight":
        return QuantizedWeight(self.codes.to(device), self.scales.to(device), self.zeros.to(device),
                               self.bits, self.group_size)


def expand_groups(t: Tensor, k: int, group_size: int) -> Tensor:
    """(N, G) per-group values -> (N, K) per-column values (the last group may be partial)."""
    return t.repeat_interleave(group_size, dim=1)[:, :k]


def dequantize(codes: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Tensor:
    """Reference dequantization: fp32 (N, K) from uint8 codes (N, K) and fp16 scales/zeros (N, G)."""
    k = codes.shape[1]
    s = expand_groups(scales.float(), k, group_size)
    z = expand_groups(zeros.float(), k, group_size)
    return (codes.float() - z) * s


def pad_groups(w: Tensor, group_size: int) -> Tensor:
    """(N, K) -> (N, G, g), zero-padding the partial last group (0 is exact, see module docstring)."""
    n, k = w.shape
    g = num_groups(k, group_size)
    if g * group_size != k:
        w = torch.nn.functional.pad(w, (0, g * group_size - k))
    return w.view(n, g, group_size)


def _params_for_shrink(lo: Tensor, hi: Tensor, p: float, maxq: int) -> tuple[Tensor, Tensor]:
    """fp32 copies of the fp16 scale and the integer zero for range [p * lo, p * hi] (lo <= 0 <= hi)."""
    scale = ((hi - lo) * p / maxq).clamp(min=MIN_SCALE).half().float()
    zero = torch.round(-lo * p / scale).clamp(0, maxq)
    return scale, zero


def find_params(w: Tensor, bits: int, clip_search: bool = True, weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-group scale and zero for groups `w` (..., g) in fp32; returns (scale, zero), each (...).

    With `clip_search`, the range [min, max] of each group is shrunk by the factor of CLIP_GRID that
    minimises the group's squared rounding error (weighted per element by `weight` (..., g) if given);
    otherwise min-max. The returned scale is already rounded to fp16.
    """
    maxq = 2 ** bits - 1
    lo = w.amin(-1).clamp(max=0)
    hi = w.amax(-1).clamp(min=0)
    best_s, best_z = _params_for_shrink(lo, hi, 1.0, maxq)
    if not clip_search:
        return best_s, best_z
    best_err = torch.full_like(lo, float("inf"))
    for p in CLIP_GRID:
        s, z = _params_for_shrink(lo, hi, p, maxq)
        q = (torch.round(w / s[..., None]) + z[..., None]).clamp(0, maxq)
        d = (q - z[..., None]) * s[..., None] - w
        err = (d * d * weight).sum(-1) if weight is not None else (d * d).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
    return best_s, best_z


def quantize_with(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """Round `w` (..., m) to codes with per-row params `scale`, `zero` (...,) or broadcastable; uint8-valued fp32."""
    maxq = 2 ** bits - 1
    if scale.dim() == w.dim() - 1:
        scale, zero = scale[..., None], zero[..., None]
    return (torch.round(w / scale) + zero).clamp(0, maxq)


def quantize_rtn(w: Tensor, bits: int, group_size: int, clip_search: bool = True,
                 weight: Tensor | None = None) -> QuantizedWeight:
    """Round-to-nearest of `w` (N, K) with per-group MSE-searched clipping; returns codes and fp16 params.

    `weight` (K,), optional: per-input-column importance (e.g. diag of the Gram matrix) for the search.
    """
    check_format(bits, group_size)
    w = w.float()
    n, k = w.shape
    groups = pad_groups(w, group_size)  # (N, G, g)
    wt = None
    if weight is not None:
        wt = pad_groups(weight.float().expand(n, k), group_size)
    scale, zero = find_params(groups, bits, clip_search, wt)  # (N, G)
    codes = quantize_with(groups, scale, zero, bits).reshape(n, -1)[:, :k]
    return QuantizedWeight(codes.to(torch.uint8), scale.half(), zero.half(), bits, group_size)
