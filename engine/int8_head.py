"""The lm_head (and a tied embedding) as int8 on fbserve's CPU kernel, replacing their fp32 weight.

Where the head's weights are Q8_0 already (cuda_ext/cpu_q8.py says when), engine.cpu_decode swaps
`model.lm_head` for `Int8Head` and, when the embedding is tied to it, `model.model.embed_tokens` for
`Int8Embedding` over the same codes: the fp32 weight (SmolLM2: 113 MB) goes, every lm_head call (decode
steps, prefill's last row, prompt log-probs) runs the int8 kernel, and embedding lookups dequantize their rows.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from cuda_ext.cpu_q8 import Q8Linear


class Int8Head(nn.Module):
    """y = x @ W^T (+ bias) for any leading shape of x, W int8 (Q8Linear), fp32 out."""

    def __init__(self, q8: Q8Linear, bias: Tensor | None, path: str) -> None:
        super().__init__()
        self.q8, self.path = q8, path
        self.in_features, self.out_features = q8.in_features, q8.out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        y = self.q8(x.reshape(-1, self.in_features).float())
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def weight_bytes(self) -> dict[str, int]:
        return {"cpu_int8": self.q8.nbytes(), "bias": 0 if self.bias is None else self.bias.numel() * 4}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, path={self.path}"


class Int8Embedding(nn.Module):
    """Embedding rows dequantized from the int8 codes an Int8Head holds (the tied weight), fp32."""

    def __init__(self, q8: Q8Linear) -> None:
        super().__init__()
        self.q8 = q8
        self.num_embeddings, self.embedding_dim = q8.out_features, q8.in_features

    def forward(self, ids: Tensor) -> Tensor:
        return self.q8.rows(ids.reshape(-1)).reshape(*ids.shape, self.embedding_dim)

    def weight_bytes(self) -> dict[str, int]:
        return {}  # the Int8Head's codes

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 (the lm_head's codes)"


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model computes in (its final norm's weight; the lm_head may be int8)."""
    return model.model.norm.weight.dtype
