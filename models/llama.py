"""The Llama-family decoder in plain PyTorch (Llama 2/3, Mistral, Qwen2, SmolLM).

Module names mirror the Hugging Face checkpoints (`model.layers.0.self_attn.q_proj`, ...), so a
state dict loads as is and quantization can swap any `nn.Linear` for a quantized module by name.
The model knows nothing of quantization or serving.

Shapes: B batch rows, T new tokens per row, L cached length, H query heads, Hkv kv heads, D head dim.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.is_cuda and not torch.is_grad_enabled():  # the same in one launch (cuda_ext/fused.py; no backward)
            from cuda_ext.fused import rms_norm

            return rms_norm(x, self.weight, self.eps)
        # Normalise in fp32 as transformers does, then cast back before the scale.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inverse_frequencies(config: ModelConfig) -> Tensor:
    """Inverse frequencies (D/2,), with the configured scaling (none, linear, llama3)."""
    d = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    s = config.rope_scaling
    if not s:
        return inv.float()
    kind = s.get("rope_type", s.get("type", "default"))
    if kind == "default":
        return inv.float()
    if kind == "linear":
        return (inv / s["factor"]).float()
    if kind == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short kept, the band between blended.
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv / factor + smooth * inv
        out = torch.where(wavelen > old / low, inv / factor, blended)
        out = torch.where(wavelen < old / high, inv, out)
        return out.float()
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: default, linear, llama3)")


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


KV_CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class KVCache(nn.Module):
    """Preallocated keys and values of one layer: (slots, Hkv, max_seq_len, D).

    A slot is one sequence; the engine assigns slots and positions. The cache's dtype may be narrower than
    the activations' (fp16 keys and values for an fp32 model on a CPU: half the memory and half the bytes
    a long-context decode step reads); attention then computes in the activations' dtype.
    """

    def __init__(self, slots: int, kv_heads: int, max_seq_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        shape = (slots, kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def write(self, slots: Tensor, positions: Tensor, k: Tensor, v: Tensor) -> None:
        """Write k, v (B, T, Hkv, D) at `positions` (B, T) of `slots` (B,), rounded to the cache's dtype."""
        self.k[slots[:, None], :, positions] = k.to(self.k.dtype)
        self.v[slots[:, None], :, positions] = v.to(self.v.dtype)

    def read(self, rows: slice | Tensor, length: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Keys and values (B, Hkv, length, D) of `rows` in `dtype`: a slice of contiguous slots reads a
        view (no copy where the dtypes match), a tensor of slots gathers them in its order."""
        return self.k[rows, :, :length].to(dtype), self.v[rows, :, :length].to(dtype)


# Up to this many new tokens per row, attention is two small matmuls (CPU SDPA kernels are slow for
# a single query against a long cache); longer runs (prefill) use SDPA.
_DECODE_QUERIES = 4


def decode_attention(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor) -> Tensor:
    """Attention of few queries q (B, H, T, D) on cached keys/values (B, Hkv, L, D); mask (B, 1, T, L)."""
    b, h, t, d = q.shape
    hkv = keys.shape[1]
    qg = q.reshape(b, hkv, (h // hkv) * t, d)  # GQA: the query heads of one kv head side by side
    scores = (qg @ keys.transpose(-1, -2)) * (d ** -0.5)  # (B, Hkv, H/Hkv*T, L)
    scores = torch.where(mask[:, :, None], scores.view(b, hkv, h // hkv, t, -1), float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype).view(b, hkv, (h // hkv) * t, -1)
    return (probs @ values).view(b, h, t, d)


def cached_keys_mask(positions: Tensor, length: int) -> Tensor:
    """(B, 1, T, L) bool: row b's query t sees cached keys 0..positions[b, t]."""
    return torch.arange(length, device=positions.device)[None, None, None, :] <= positions[:, None, :, None]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hd, bias = config.head_dim, config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * hd, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * hd, config.hidden_size, bias=False)
        self.qkv_proj: nn.Module | None = None  # q/k/v merged into one layer (engine.merge, CUDA)
        self.merged_sizes: list[int] = []
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor | None, slots: Tensor | None,
                length: int, rows: slice | Tensor | None, from_start: bool = False, mask: Tensor | None = None
                ) -> Tensor:
        """`from_start`: every row's positions are 0..T-1 (a prompt prefilled from an empty cache), so the
        cached-keys mask is the plain causal one and SDPA skips the masked blocks (1.5-1.9x at T >= 1024).
        `mask` (B, 1, T, L): which cached keys each query sees (`cached_keys_mask`; made once per step)."""
        b, t, _ = x.shape
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split(self.merged_sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(b, t, self.n_heads, self.head_dim)
        k = k.view(b, t, self.n_kv_heads, self.head_dim)
        v = v.view(b, t, self.n_kv_heads, self.head_dim)
        if x.is_cuda and not torch.is_grad_enabled():  # the same in one launch, in place (cuda_ext/fused.py)
            from cuda_ext.fused import rope

            q, k = rope(q, k, cos, sin)
        else:
            cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # (B, T, 1, D)
            q = (q * cos + rotate_half(q) * sin).to(v.dtype)
            k = (k * cos + rotate_half(k) * sin).to(v.dtype)
        q = q.transpose(1, 2)  # (B, H, T, D)
        if self.kv_cache is None or positions is None:
            # No cache: one causal window (evaluation, calibration).
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, Hkv, T, D)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads)
        else:
            gqa = self.n_kv_heads != self.n_heads
            self.kv_cache.write(slots, positions, k, v)
            if from_start and t > _DECODE_QUERIES:  # positions 0..T-1: the mask below is the causal one
                # ... and the cache holds just this k, v: attend to them as computed, not as stored
                k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, Hkv, T, D)
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            else:
                keys, values = self.kv_cache.read(rows, length, v.dtype)  # (B, Hkv, L, D)
                if mask is None:
                    mask = cached_keys_mask(positions, length)
                if t <= _DECODE_QUERIES:
                    y = decode_attention(q, keys, values, mask)
                else:
                    y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)  # (B, T, H*D)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)
        self.gate_up_proj: nn.Module | None = None  # gate/up merged into one layer (engine.merge, CUDA)
        self.merged_sizes: list[int] = []

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).split(self.merged_sizes, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)  # SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor | None, slots: Tensor | None,
                length: int, rows: slice | Tensor | None, from_start: bool = False, mask: Tensor | None = None
                ) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, slots, length, rows, from_start, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """`model.*` in HF names: embeddings, decoder layers, final norm."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inverse_frequencies(config), persistent=False)
        self.max_seq_len = 0
        # Optional fast decode step (engine.cpu_decode installs one on CPU): called for cached steps,
        # returns logits (B, 1, V) or None to let the module path below run.
        self.decode_fn = None

    def setup_cache(self, slots: int, max_seq_len: int, dtype: torch.dtype | None = None) -> None:
        """Allocate a KV cache of `slots` sequences of up to `max_seq_len` tokens each, in `dtype`
        (default: the model's; one of fp32, fp16, bf16)."""
        p = self.model.norm.weight  # the model's dtype and device (the lm_head may be int8: engine.int8_head)
        if dtype is None:
            dtype = p.dtype if p.dtype in KV_CACHE_DTYPES.values() else torch.float16
        if dtype not in KV_CACHE_DTYPES.values():
            raise ValueError(f"unsupported KV cache dtype {dtype} (supported: {', '.join(KV_CACHE_DTYPES)})")
        for layer in self.model.layers:
            layer.self_attn.kv_cache = KVCache(slots, self.config.num_key_value_heads, max_seq_len,
                                               self.config.head_dim, dtype, p.device)
        self.max_seq_len = max_seq_len

    def drop_cache(self) -> None:
        """Free the KV cache (setup_cache allocates a new one)."""
        for layer in self.model.layers:
            layer.self_attn.kv_cache = None

    def copy_cache_prefix(self, source: int, dest: int, length: int) -> None:
        """Copy the keys and values at positions 0..length-1 of cache slot `source` into slot `dest`."""
        for layer in self.model.layers:
            cache = layer.self_attn.kv_cache
            cache.k[dest, :, :length] = cache.k[source, :, :length]
            cache.v[dest, :, :length] = cache.v[source, :, :length]

    def kv_cache_bytes(self) -> int:
        caches = [layer.self_attn.kv_cache for layer in self.model.layers if layer.self_attn.kv_cache is not None]
        return sum(c.k.numel() * c.k.element_size() * 2 for c in caches)

    def hidden_states(self, tokens: Tensor, positions: Tensor | None = None, slots: Tensor | None = None) -> Tensor:
        """Final-norm hidden states (B, T, hidden) for `tokens` (B, T) at `positions` (B, T) in cache `slots` (B,).

        Without positions, the tokens are one causal window at positions 0..T-1 and the cache is not used.
        """
        b, t = tokens.shape
        rows: slice | Tensor | None = None
        from_start = False
        if positions is None:
            pos = torch.arange(t, device=tokens.device).expand(b, t)
            length = t
        else:
            if slots is None:
                raise ValueError("positions given without cache slots")
            pos = positions
            length = int(positions.max()) + 1
            if length > self.max_seq_len:
                raise ValueError(f"position {length - 1} is beyond the KV cache ({self.max_seq_len} tokens)")
            first = int(slots[0])
            contiguous = b == 1 or slots.tolist() == list(range(first, first + b))
            rows = slice(first, first + b) if contiguous else slots
            from_start = length == t and torch.equal(positions, torch.arange(t, device=positions.device).expand(b, t))
        return self._layers(tokens, pos, positions, slots, length, rows, from_start)

    def decode_hidden(self, tokens: Tensor, positions: Tensor, slots: Tensor, length: int) -> Tensor:
        """`hidden_states` for cached steps with no host synchronisation, so a CUDA graph can capture it:
        the caller gives `length` (> every position; the cache is read up to it) and the cache rows are
        gathered through `slots` whatever their order (engine.cuda_graph_decode)."""
        if not 0 < length <= self.max_seq_len:
            raise ValueError(f"length {length} is outside the KV cache (1..{self.max_seq_len})")
        return self._layers(tokens, positions, positions, slots, length, slots, False)

    def _layers(self, tokens: Tensor, pos: Tensor, positions: Tensor | None, slots: Tensor | None, length: int,
                rows: slice | Tensor | None, from_start: bool) -> Tensor:
        freqs = pos[..., None].float() * self.inv_freq  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        x = self.model.embed_tokens(tokens)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        t = tokens.shape[1]
        mask = None  # the same for every layer: made once (decode steps launch kernels per op)
        if positions is not None and not (from_start and t > _DECODE_QUERIES):
            mask = cached_keys_mask(positions, length)
        for layer in self.model.layers:
            x = layer(x, cos, sin, positions, slots, length, rows, from_start, mask)
        return self.model.norm(x)

    def forward(self, tokens: Tensor, positions: Tensor | None = None, slots: Tensor | None = None,
                last_only: bool = False) -> Tensor:
        """Logits (B, T, vocab) in fp32, or (B, 1, vocab) with `last_only`; arguments as `hidden_states`."""
        if self.decode_fn is not None and positions is not None and tokens.shape[1] == 1:
            out = self.decode_fn(tokens, positions, slots, last_only)
            if out is not None:
                return out
        h = self.hidden_states(tokens, positions, slots)
        if last_only:
            h = h[:, -1:]
        return self.lm_head(h).float()
