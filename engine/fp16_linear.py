"""fbgemm's fp16 linear on x86 CPUs: weights stored once as fp16 (prepacked), fp32 activations, fp32 math,
fp32 outputs (`torch.ops.quantized.linear_dynamic_fp16`). Half the bytes of an fp32 weight, and faster
than torch's fp32 GEMV/GEMM here (SmolLM2's decode step ~1.6x, prefill GEMMs 1.0-1.3x; measured in
bench/RESULTS.md, "CPU decode"); the only numerical change is the weights' rounding to fp16 (KL 2e-6
to the fp32 model on real text).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

FP16_MAX = 65504.0
PATH = "fbgemm-fp16"


def fp16_pack(weight: Tensor, bias: Tensor | None) -> tuple[object | None, str]:
    """The prepacked fp16 copy of a linear's (N, K) weight (and fp32 bias), and the path's name;
    (None, "fp32: <why>") where fbgemm is missing (ARM builds) or a weight does not fit fp16."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return None, "fp32: this torch build has no fbgemm (fp16 GEMV needs x86)"
    w = weight.detach()
    if not bool(w.abs().max() < FP16_MAX):
        return None, "fp32: weights overflow fp16"
    try:
        packed = torch.ops.quantized.linear_prepack_fp16(
            w.float().contiguous(), None if bias is None else bias.detach().float())
    except (RuntimeError, AttributeError) as exc:  # an op missing from this build
        return None, f"fp32: fbgemm fp16 prepack failed ({exc})"
    return packed, PATH


def fp16_linear(x: Tensor, packed: object) -> Tensor:
    """y = x @ W^T (+ b) for any leading shape of fp32 x."""
    lead = x.shape[:-1]
    y = torch.ops.quantized.linear_dynamic_fp16(x.reshape(-1, x.shape[-1]), packed)
    return y.reshape(*lead, y.shape[-1])


class Fp16Linear(nn.Module):
    """An nn.Linear replaced by its fbgemm fp16 pack (the fp32 weight is dropped): `from_linear` or None."""

    def __init__(self, packed: object, in_features: int, out_features: int, has_bias: bool) -> None:
        super().__init__()
        self.packed, self.in_features, self.out_features, self.has_bias = packed, in_features, out_features, has_bias

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> tuple[Fp16Linear | None, str]:
        packed, path = fp16_pack(lin.weight, lin.bias)
        if packed is None:
            return None, path
        return cls(packed, lin.in_features, lin.out_features, lin.bias is not None), path

    def forward(self, x: Tensor) -> Tensor:
        return fp16_linear(x.float(), self.packed)

    def weight_bytes(self) -> dict[str, int]:
        return {"cpu_fp16": self.in_features * self.out_features * 2 + (self.out_features * 4 if self.has_bias else 0)}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.has_bias}, path={PATH}"
