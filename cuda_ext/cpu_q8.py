"""An int8 (Q8_0) linear on fbserve's CPU kernel (cpu_native.c `fbq_q8_matmul`), for an lm_head whose weights
are Q8_0 already: GGUF models such as the embedded SmolLM2 keep their embedding / lm_head as Q8_0 (int8 codes,
one scale per 32 inputs), so its int8 form reads half the bytes of an fp16 copy and is as exact as one.

Q8_0 as ggml defines it: per row and block of 32 inputs, scale d = max |w| / 127, codes round(w / d) in
[-127, 127]. `Q8Linear.from_weight` takes a weight only when that re-quantization is within 2^-10 of each
weight (a Q8_0 weight stored in fp16 comes back to within 2^-11 + 2^-11: fp16's own rounding of the codes
times the scale, and of the scale); any other weight (an fp16 checkpoint's own lm_head) is refused with the
reason, and the caller keeps its fp16 path. Activations are quantized per block of 32 to int16 (2^-16 of the
block's largest |x|), products and block sums exact in int32: ~2e-5 relative error on the output vs ~2e-4 for
the fp16 GEMV (bench/RESULTS.md "int8 lm_head").
"""
from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from cuda_ext.cpu_native import _load, kernel_name

RELATIVE_TOLERANCE = 2.0 ** -10  # what a Q8_0 weight stored in fp16 comes back within


CHUNK_ROWS = 2048  # rows converted at a time: the temporaries stay a few MB, not a few times the weight


def q8_0(weight: Tensor) -> tuple[Tensor, Tensor]:
    """ggml's Q8_0 of an (N, K) weight, K % 32 == 0: codes int8 (N, K) and scales fp32 (N, K / 32)."""
    n, k = weight.shape
    codes, scales = torch.empty(n, k, dtype=torch.int8), torch.empty(n, k // 32)
    for r0 in range(0, n, CHUNK_ROWS):
        blocks = weight[r0:r0 + CHUNK_ROWS].detach().float().reshape(-1, k // 32, 32)
        d = blocks.abs().amax(-1) / 127
        inverse = torch.where(d > 0, 1 / d, torch.zeros_like(d))
        codes[r0:r0 + CHUNK_ROWS] = torch.round(blocks * inverse[..., None]).clamp_(-127, 127).reshape(-1, k)
        scales[r0:r0 + CHUNK_ROWS] = d
    return codes, scales


def q8_0_error(weight: Tensor, codes: Tensor, scales: Tensor) -> float:
    """The largest |dequant(codes, scales) - w| / |w| over the nonzero weights (inf where a zero is not exact)."""
    n, k = weight.shape
    worst = 0.0
    for r0 in range(0, n, CHUNK_ROWS):
        w = weight[r0:r0 + CHUNK_ROWS].detach().float().reshape(-1, k // 32, 32)
        err = (codes[r0:r0 + CHUNK_ROWS].reshape(-1, k // 32, 32).float() * scales[r0:r0 + CHUNK_ROWS, :, None] - w).abs()
        nonzero = w != 0
        if bool((err[~nonzero] > 0).any()):
            return float("inf")
        if bool(nonzero.any()):
            worst = max(worst, float((err[nonzero] / w[nonzero].abs()).max()))
    return worst


class _Q8(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("d", ctypes.c_void_p)] + [
        (name, ctypes.c_int32) for name in ("n", "n_pad", "k", "pad_")]


class Q8Linear:
    """y = x @ W^T for an int8 (Q8_0) W held in the kernel's tiles: 16 rows x each k pair in 32 bytes, the
    scales per tile (n_pad / 16, K / 32, 16). `__call__(x (M, K) fp32) -> (M, N) fp32`."""

    def __init__(self, codes: Tensor, scales: Tensor) -> None:
        lib, why = _load()
        if lib is None:
            raise RuntimeError(f"the CPU kernel is unavailable: {why}")
        n, k = codes.shape
        if k % 32 or codes.dtype != torch.int8 or scales.shape != (n, k // 32):
            raise ValueError(f"expected int8 codes (N, K), K % 32 == 0, and scales (N, K/32); got "
                             f"{codes.dtype} {tuple(codes.shape)}, {tuple(scales.shape)}")
        n_pad = (n + 15) // 16 * 16
        padded = torch.zeros(n_pad, k, dtype=torch.int8)
        padded[:n] = codes
        d = torch.zeros(n_pad, k // 32)
        d[:n] = scales.float()
        self.tiles = padded.view(n_pad // 16, 16, k // 2, 2).permute(0, 2, 1, 3).contiguous()
        self.scales = d.view(n_pad // 16, 16, k // 32).permute(0, 2, 1).contiguous()
        self.in_features, self.out_features = k, n
        self._struct = _Q8(self.tiles.data_ptr(), self.scales.data_ptr(), n, n_pad, k, 0)
        self._fn = lib.fbq_q8_matmul

    @classmethod
    def from_weight(cls, weight: Tensor) -> tuple[Q8Linear | None, str]:
        """(Q8Linear, path name) when `weight` (N, K) is Q8_0 within RELATIVE_TOLERANCE, else (None, why not)."""
        lib, why = _load()
        if lib is None:
            return None, f"the CPU kernel is unavailable: {why}"
        if weight.dim() != 2 or weight.shape[1] % 32:
            return None, f"in_features {weight.shape[-1]} is not a multiple of 32"
        codes, scales = q8_0(weight)
        err = q8_0_error(weight, codes, scales)
        if err > RELATIVE_TOLERANCE:
            return None, f"the weights are not Q8_0 (re-quantized they move by up to {err:.1e} relative)"
        return cls(codes, scales), f"{kernel_name()}-q8_0"

    def rows(self, ids: Tensor) -> Tensor:
        """Dequantized weight rows (n, K) fp32 for row indices `ids` (n,) (an embedding lookup)."""
        ids = ids.long()
        if ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < self.out_features:
            raise IndexError(f"row index out of range [0, {self.out_features})")
        tile, row = ids // 16, ids % 16
        codes = self.tiles[tile, :, row, :].reshape(-1, self.in_features)  # (n, K/2, 2) -> (n, K)
        scales = self.scales[tile, :, row]  # (n, K/32)
        return (codes.float().view(-1, self.in_features // 32, 32) * scales[..., None]).reshape(-1, self.in_features)

    def nbytes(self) -> int:
        return self.tiles.numel() + self.scales.numel() * 4

    def __call__(self, x: Tensor) -> Tensor:
        if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"x: expected fp32 (M, {self.in_features}), got {x.dtype} {tuple(x.shape)}")
        x = x.contiguous()
        m, k = x.shape
        y = torch.empty(m, self.out_features)
        scratch = torch.empty(m * k * 2 + m * (k // 32) * 4, dtype=torch.uint8)
        self._fn(m, x.data_ptr(), k, y.data_ptr(), self.out_features, ctypes.addressof(self._struct),
                 torch.get_num_threads(), scratch.data_ptr())
        return y
