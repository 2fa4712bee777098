"""The CPU decode fast path: one step of batch decoding (T = 1 new token per row) with few ATen calls.

`install(model)` prepares a `Transformer` on the CPU and sets `model.decode_fn`; `Transformer.forward`
then hands decode steps (tokens (B, 1) with cache positions) to it, everything else (prefill,
evaluation, no cache) takes the ordinary module path. What it changes (memory: see the fp16 item):

  * where every projection runs on fbserve's CPU kernel (cuda_ext/cpu_native.c), the whole step below
    the embedding is ONE kernel call for all layers (cuda_ext.cpu_native.NativeLayers: RMSNorm, q/k/v,
    RoPE, KV write, attention, o, SiLU * up, down, residual adds; fp32 but the projections' bf16 x);
    status()["layers"] says so, or why not; FBSERVE_CPU_NATIVE_LAYERS=0 keeps the Python loop below.
  * q/k/v and gate/up of each layer read the same input, so they run as ONE matmul each:
    - QuantLinear on fbserve's CPU kernel (cuda_ext/cpu_native.c, where the CPU has AVX-512 BF16 or AVX2):
      one kernel call over the layers' own weights (branch and bias inside), outputs side by side.
    - QuantLinear on torch's int4 op: one torch int4 CPU matmul over the output-concatenated weight
      (cuda_ext.cpu.fuse_cpu); each QuantLinear's own CPU weight becomes a view of it, so the
      module path (prefill, QDEC hooks, eval) still works and costs no second copy. The low-rank
      branches share one x @ [A_q; A_k; A_v]^T, then one addmm per part into its columns.
    - nn.Linear (fp32/bf16 model): the weights are stored column-major, [W_q; W_k; W_v]^T as one
      contiguous (K, N) block, each module's .weight a transposed view into it (same values).
  * every other linear weight, and an fp32 tied embedding / lm_head, is stored column-major too (W^T
    contiguous; the module's weight is the transposed view): torch's CPU GEMV for x @ W^T is ~2x
    faster on that layout (measured for the [576 x 49152] lm_head, 1 thread: see bench/RESULTS.md).
    Values are bit-identical; only the summation order inside the matmul changes.
  * the lm_head GEMV, the largest single read of a small model's step: where its weights are Q8_0 already
    (a GGUF model's, such as the embedded SmolLM2's) and fbserve's CPU kernel runs, an Int8Head REPLACES
    it, and an Int8Embedding a tied embedding (engine/int8_head.py, cuda_ext/cpu_q8.py: int8 codes and a
    scale per 32 inputs, within 2^-10 of each weight; the fp32 weight goes; 0.7 vs 1.5 ms for SmolLM2's head
    on 2 threads). Otherwise fbgemm's fp16 linear (engine/fp16_linear.py: weights rounded once to fp16, fp32
    activations, math and outputs; 1.9 vs 5-9 ms for that head in fp32, whose weight stays for the tied
    embedding and prefill: +2 bytes per head weight). fbgemm fp16 also runs every unquantized projection of
    an fp32 model, which is REPLACED by its Fp16Linear (the fp32 weight goes; prefill uses it too): the fp32
    model's step 1.6x faster with half the projection memory. Logits within 0.02 of the fp32 ones on real
    text (KL ~1e-6; bench/RESULTS.md). Where this torch has no fbgemm (ARM) or a weight overflows fp16, that
    weight stays fp32 and the log and /health say so.
  * RoPE cos/sin, the attention mask and the cache rows are computed once per step, not per layer;
    the KV write is a plain slice copy; q and k are rotated together; activations stay fp32 between
    the int4 matmuls exactly as on the module path (QuantLinear rounds x to bf16 inside, same here).

Numerics: the same operations as the module path (cpu_int4 QuantLinear, fp32 RMSNorm / RoPE /
softmax) on the same projection modules (after install an fp32 model's are Fp16Linear on both paths),
so the step equals the module path to fp32 rounding, except for the lm_head's fp16 copy (an Int8Head is
the module path's head too; tests/test_cpu_decode.py). The step declines (returns
None, the module path runs) when a QuantLinear carries forward hooks (QDEC residuals), when a layer
was re-prepared after install (.to(), load_state_dict), or for T > 1.

FBSERVE_CPU_DECODE=0 disables the whole thing (install returns None).
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cuda_ext.cpu import fuse_cpu
from cuda_ext.cpu_native import LayerWeights, NativeGroup, NativeLayers, kernel_name
from cuda_ext.cpu_q8 import Q8Linear
from engine.int8_head import Int8Embedding, Int8Head, model_dtype
from engine.fp16_linear import PATH as FP16_PATH
from engine.fp16_linear import Fp16Linear, fp16_linear, fp16_pack
from engine.quant_linear import QuantLinear

log = logging.getLogger("fbserve.engine")
ENV = "FBSERVE_CPU_DECODE"
LAYERS_ENV = "FBSERVE_CPU_NATIVE_LAYERS"


def _column_major(lin: nn.Linear) -> None:
    """Store lin.weight as the transposed view of a contiguous W^T (same values, same Parameter)."""
    w = lin.weight
    if w.dim() == 2 and not w.t().is_contiguous():
        w.data = w.data.t().contiguous().t()


class _Proj:
    """Projections that read the same input, as one matmul: __call__(x (M, K) fp32) -> (M, N_total).

    Part i is columns offsets[i] : offsets[i] + widths[i] of the result.
    """

    def __init__(self, mods: list[nn.Module], on_stale=None) -> None:
        self.mods = mods
        self.widths = [m.out_features for m in mods]
        self.quant = all(isinstance(m, QuantLinear) for m in mods)
        self.on_stale = on_stale
        if self.quant:
            self._init_quant(mods)
        else:
            self._init_linear(mods)

    def _init_quant(self, mods: list[QuantLinear]) -> None:
        fused, views = fuse_cpu([m._cpu for m in mods])  # the layers' own conversions, concatenated
        self.w = fused
        self.offsets, off = [], 0
        for v in views:
            self.offsets.append(off)
            off += v.n16
        self.n_total = off
        ranks = [m.rank for m in mods]
        self.a_t = None
        self.parts: list[tuple[int, int, int, int, Tensor]] = []  # (r0, r1, col0, col1, B^T)
        if any(ranks):
            self.a_t = torch.cat([m.A.float() for m in mods if m.rank]).t().contiguous()  # (K, sum r)
        r0 = 0
        a_views = []
        for m, off, n in zip(mods, self.offsets, self.widths):
            if m.rank:
                b_t = m.B.float().t().contiguous()  # (r, N)
                self.parts.append((r0, r0 + m.rank, off, off + n, b_t))
                a_views.append((self.a_t[:, r0:r0 + m.rank], b_t))
                r0 += m.rank
            else:
                a_views.append((None, None))
        self.bias = None
        if any(m.bias is not None for m in mods):
            self.bias = torch.zeros(self.n_total)
            for m, off, n in zip(mods, self.offsets, self.widths):
                if m.bias is not None:
                    self.bias[off:off + n] = m.bias.float()
        for m, view, (a_t, b_t) in zip(mods, views, a_views):
            m.share_cpu(view, a_t, b_t, self.on_stale)  # the module path now reads these views: no second copy

    def _init_linear(self, mods: list[nn.Linear]) -> None:
        k = mods[0].in_features
        if len(mods) > 1:
            if len({(m.in_features, m.weight.dtype) for m in mods}) != 1:
                raise ValueError("fused linears need one input width and dtype")
            wt = torch.cat([m.weight.detach().t() for m in mods], dim=1).contiguous()  # (K, N_total)
        else:
            wt = mods[0].weight.detach().t().contiguous()
        self.offsets, off = [], 0
        for m, n in zip(mods, self.widths):
            self.offsets.append(off)
            m.weight.data = wt[:, off:off + n].t()  # a view: the module path reads the same storage
            off += n
        self.n_total, self.wt = off, wt
        self.bias = None
        if any(m.bias is not None for m in mods):
            self.bias = torch.zeros(off, dtype=wt.dtype)
            for m, o, n in zip(mods, self.offsets, self.widths):
                if m.bias is not None:
                    self.bias[o:o + n] = m.bias.detach()
        self.dtype = wt.dtype
        assert k == wt.shape[0]

    def __call__(self, x: Tensor) -> Tensor:
        if not self.quant:
            xk = x.to(self.dtype)
            y = torch.addmm(self.bias, xk, self.wt) if self.bias is not None else xk @ self.wt
            return y.float()
        w = self.w
        xb = x.to(torch.bfloat16)
        if w.k_cpu > w.in_features:
            xb = F.pad(xb, (0, w.k_cpu - w.in_features))
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, w.weight, w.group_size, w.scales_zeros).float()
        if self.a_t is not None:
            t = x @ self.a_t  # (M, sum r), fp32 as on the module path
            for r0, r1, c0, c1, b_t in self.parts:
                y[:, c0:c1].addmm_(t[:, r0:r1], b_t)
        if self.bias is not None:
            y += self.bias
        return y


class _NativeProj:
    """QuantLinear layers on the CPU kernel that read the same input, as one call of it (their own
    weights: nothing is copied): __call__(x (M, K) fp32) -> (M, N_total) fp32."""

    def __init__(self, mods: list[QuantLinear], on_stale=None) -> None:
        self.mods = mods
        self.group = NativeGroup([m.native_weight(on_stale) for m in mods])

    def __call__(self, x: Tensor) -> Tensor:
        return self.group(x)


class _Each:
    """Module calls, concatenated: Fp16Linear groups (fbgemm packs are per module), and groups mixing
    QuantLinear and nn.Linear (partly quantized models)."""

    def __init__(self, mods: list[nn.Module]) -> None:
        self.mods = mods

    def __call__(self, x: Tensor) -> Tensor:
        ys = [m(x).float() for m in self.mods]
        return ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)


def _proj(mods: list[nn.Module], on_stale=None) -> _Proj | _NativeProj | _Each:
    if all(isinstance(m, QuantLinear) and m.native_weight() is not None for m in mods):
        return _NativeProj(mods, on_stale)
    if all(isinstance(m, QuantLinear) for m in mods):
        ws = [m._cpu for m in mods]
        if (len({(w.in_features, w.group_size, w.k_cpu) for w in ws}) == 1
                and not any(w.n16 % 64 for w in ws[:-1])):  # what cuda_ext.cpu.fuse_cpu accepts
            return _Proj(mods, on_stale)
        return _Each(mods)
    if all(type(m) is nn.Linear for m in mods):
        return _Proj(mods)
    return _Each(mods)


PROJECTIONS = (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj")))


def _to_fp16(model: nn.Module) -> set[str]:
    """Replace every unquantized projection (nn.Linear) of the decoder layers by its Fp16Linear, which
    drops the fp32 weight; the paths that result ("fbgemm-fp16", or "fp32: <why>" for those kept)."""
    paths = set()
    for layer in model.model.layers:
        for part, names in PROJECTIONS:
            parent = getattr(layer, part)
            for name in names:
                lin = getattr(parent, name)
                if type(lin) is Fp16Linear:  # installed before
                    paths.add(FP16_PATH)
                if type(lin) is not nn.Linear:
                    continue
                fast, path = Fp16Linear.from_linear(lin)
                paths.add(path)
                if fast is not None:
                    setattr(parent, name, fast)
    return paths


class _Layer:
    def __init__(self, layer: nn.Module, on_stale) -> None:
        att, mlp = layer.self_attn, layer.mlp
        self.ln1, self.ln2 = layer.input_layernorm, layer.post_attention_layernorm
        self.qkv = _proj([att.q_proj, att.k_proj, att.v_proj], on_stale)
        self.o = _proj([att.o_proj], on_stale)
        self.gate_up = _proj([mlp.gate_proj, mlp.up_proj], on_stale)
        self.down = _proj([mlp.down_proj], on_stale)
        self.attn = att


def _rms(x: Tensor, norm: nn.Module) -> Tensor:
    # models.llama.RMSNorm on fp32 activations: x * rsqrt(mean(x^2) + eps) * weight
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)


class CpuDecoder:
    """model.decode_fn: (tokens (B, 1), positions (B, 1), slots (B,), last_only) -> fp32 logits (B, 1, V),
    or None to let the module path run."""

    def __init__(self, model: nn.Module, fp16_weights: bool = True) -> None:
        cfg = model.config
        self.model = model
        self.h, self.hkv, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.nq, self.nkv = self.h * self.d, self.hkv * self.d
        self.inter = cfg.intermediate_size
        self.stale = False
        self.declined: str | None = None
        dense = _to_fp16(model) if fp16_weights else {"fp32: asked"}
        if not any(type(m) in (nn.Linear, Fp16Linear) for m in model.model.layers.modules()):
            dense = set()  # every projection is a QuantLinear
        self.dense_path = " / ".join(sorted(dense)) if dense else None  # unquantized projections, if any
        self.layers = [_Layer(layer, self._invalidate) for layer in model.model.layers]
        self.native_layers, self.layers_path = _native_layers(model, self.layers)
        self.quant_modules = [m for m in model.modules() if isinstance(m, QuantLinear)]
        self.lm_q8, self.lm_fp16, self.lm_wt, self.lm_head_path = None, None, None, "fp32: asked"
        if isinstance(model.lm_head, Int8Head):  # installed before
            self.lm_q8, self.lm_head_path = model.lm_head.q8, model.lm_head.path
        elif fp16_weights:
            q8, why_not_q8 = Q8Linear.from_weight(model.lm_head.weight)
            if q8 is not None:
                self.lm_q8, self.lm_head_path = q8, why_not_q8
                _to_int8(model, q8, why_not_q8)
            else:
                log.info("lm_head not in int8: %s", why_not_q8)
                self.lm_fp16, self.lm_head_path = fp16_pack(model.lm_head.weight, model.lm_head.bias)
        if self.lm_q8 is None:
            _column_major(model.lm_head)  # tied: the embedding's weight becomes the same column-major view
            self.lm_wt = model.lm_head.weight.t()  # (C, V) contiguous
        self.lm_head = model.lm_head

    def weight_bytes(self) -> dict[str, int]:
        """The step's own weight copy: `cpu_fp16`, fbgemm's fp16 pack of the lm_head (its fp32 weight stays:
        the tied embedding and prefill read it). An Int8Head, which replaced its fp32 weight, and Fp16Linear
        projections report themselves."""
        if self.lm_fp16 is None:
            return {"cpu_fp16": 0}
        head = self.lm_head
        return {"cpu_fp16": head.weight.numel() * 2 + (0 if head.bias is None else head.bias.numel() * 4)}

    def status(self) -> dict[str, object]:
        """What /health shows: the fast step is installed, the paths of its lm_head and of unquantized
        projections (None when all are QuantLinear), and why it last declined a step."""
        return {"enabled": True, "layers": self.layers_path, "lm_head": self.lm_head_path,
                "dense_linears": self.dense_path, "declined": self.declined}

    def _invalidate(self) -> None:
        self.stale = True

    def usable(self) -> bool:
        """False when QDEC (or anyone) hooks a QuantLinear, or a layer re-prepared its CPU weight."""
        if self.stale:
            reason = "a QuantLinear was re-prepared after install (.to(), load_state_dict): install again"
        elif any(m._forward_hooks or m._forward_pre_hooks for m in self.quant_modules):
            reason = "forward hooks on QuantLinear (QDEC residuals)"
        else:
            return True
        if reason != self.declined:
            log.info("CPU decode fast path off: %s; using the module path", reason)
            self.declined = reason
        return False

    @torch.inference_mode()
    def __call__(self, tokens: Tensor, positions: Tensor, slots: Tensor, last_only: bool) -> Tensor | None:
        b, t = tokens.shape
        if t != 1 or tokens.device.type != "cpu" or not self.usable():
            return None
        model = self.model
        pos = positions[:, 0].tolist()
        sl = slots.tolist()
        length = max(pos) + 1
        if length > model.max_seq_len:
            raise ValueError(f"position {length - 1} is beyond the KV cache ({model.max_seq_len} tokens)")
        contiguous = b == 1 or sl == list(range(sl[0], sl[0] + b))
        rows = slice(sl[0], sl[0] + b) if contiguous else slots
        h, hkv, d = self.h, self.hkv, self.d
        g = h // hkv
        x = model.model.embed_tokens(tokens[:, 0]).float()  # (B, C)
        freqs = positions.float() * model.inv_freq  # (B, D/2)
        cos = torch.cat((freqs, freqs), dim=-1).cos()[:, None, :]  # (B, 1, D)
        sin = freqs.sin()
        sin = torch.cat((-sin, sin), dim=-1)[:, None, :]  # rotate_half(x) * sin == roll(x, D/2) * [-sin, sin]
        if self.native_layers is not None:  # every layer in one kernel call (per-row positions, no mask)
            x = x.contiguous()  # updated in place
            self.native_layers(x, slots, positions[:, 0], cos[:, 0], sin[:, 0])
            return self._logits(x)
        mask = None
        if min(pos) != length - 1:  # rows at different positions: hide each row's keys beyond its own
            mask = (torch.arange(length) <= positions)[:, None, None, :]  # (B, 1, 1, L)
        half = d // 2
        nqk = self.nq + self.nkv
        for lay in self.layers:
            qkv = lay.qkv(_rms(x, lay.ln1))  # (B, Nq + 2 Nkv)
            qk = qkv[:, :nqk].view(b, h + hkv, d)
            qk = torch.addcmul(qk * cos, torch.roll(qk, half, -1), sin)  # RoPE on q and k at once
            v = qkv[:, nqk:].view(b, hkv, d)
            cache = lay.attn.kv_cache
            for i in range(b):
                cache.k[sl[i], :, pos[i]] = qk[i, h:]
                cache.v[sl[i], :, pos[i]] = v[i]
            keys, values = cache.read(rows, length, x.dtype)  # (B, Hkv, L, D)
            # The G query heads of one kv head as G queries of one position: SDPA without GQA expansion.
            y = F.scaled_dot_product_attention(qk[:, :h].view(b, hkv, g, d), keys, values, attn_mask=mask)
            x = x + lay.o(y.reshape(b, h * d))
            gu = lay.gate_up(_rms(x, lay.ln2))
            x = x + lay.down(F.silu(gu[:, :self.inter]) * gu[:, self.inter:])
        return self._logits(x)

    def _logits(self, x: Tensor) -> Tensor:
        """Final norm and lm_head of the step's hidden states (B, C) -> (B, 1, V)."""
        x = _rms(x, self.model.model.norm)
        if self.lm_q8 is not None:
            return self.lm_head(x)[:, None, :]  # Int8Head, bias inside
        if self.lm_fp16 is not None:
            return fp16_linear(x, self.lm_fp16)[:, None, :]  # bias inside
        logits = x @ self.lm_wt
        if self.lm_head.bias is not None:
            logits = logits + self.lm_head.bias
        return logits[:, None, :]


def _native_layers(model: nn.Module, layers: list[_Layer]) -> tuple[NativeLayers | None, str]:
    """Whole layers in one kernel call per step where every projection is on fbserve's CPU kernel:
    (NativeLayers, "fbserve-<isa>"), else (None, "python (<why>)") and the per-layer loop runs."""
    if os.environ.get(LAYERS_ENV, "1").strip().lower() in ("0", "off", ""):
        return None, f"python (disabled: {LAYERS_ENV}=0)"
    if not all(isinstance(p, _NativeProj) for lay in layers for p in (lay.qkv, lay.o, lay.gate_up, lay.down)):
        return None, "python (not every projection is on fbserve's CPU kernel)"
    cfg = model.config
    weights = [LayerWeights(lay.ln1.weight.detach().float().contiguous(), float(lay.ln1.eps),
                            lay.ln2.weight.detach().float().contiguous(), float(lay.ln2.eps), lay.qkv.group,
                            lay.o.group, lay.gate_up.group, lay.down.group, lay.attn) for lay in layers]
    try:
        stack = NativeLayers(weights, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                             cfg.intermediate_size)
    except ValueError as e:
        return None, f"python ({e})"
    return stack, kernel_name()


def _own_parameters(model: nn.Module) -> None:
    """Weights loaded from safetensors are views of the file's memory map, which stays mapped (and its
    touched pages resident) while any one of them lives. After the re-layout, copy the few parameters
    still on the map (norms, biases) so that the map, and the old layout's pages, go away (fp32 model:
    RSS 1.5 GB -> 1.0 GB)."""
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        st = p.untyped_storage()
        if st.nbytes() > p.numel() * p.element_size() * 2:  # a view into something bigger (ours: the fused
            continue                                         # blocks, the column-major lm_head): keep it
        if p.is_contiguous() and p.data_ptr() == st.data_ptr():
            p.data = p.data.clone()


def _return_freed_memory() -> None:
    """Re-laying out the weights frees as much as it allocates, but glibc keeps the freed heap pages
    (RSS +200..500 MB measured on SmolLM2-135M); malloc_trim hands them back. A no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _to_int8(model: nn.Module, q8: Q8Linear, path: str) -> None:
    """Replace the lm_head by an Int8Head over `q8` (its codes), and a tied embedding by an Int8Embedding over
    the same codes: the fp32 weight goes (an untied embedding keeps its own)."""
    head, embed = model.lm_head, model.model.embed_tokens
    tied = embed.weight is head.weight
    model.lm_head = Int8Head(q8, head.bias, path)
    if tied:
        model.model.embed_tokens = Int8Embedding(q8)


def unavailable_reason(model: nn.Module) -> str | None:
    """Why the fast step cannot serve this model, or None when it can."""
    if os.environ.get(ENV, "1") in ("0", "", "off"):
        return f"disabled ({ENV}=0)"
    if model.model.norm.weight.device.type != "cpu":
        return "the model is not on the CPU"
    if model_dtype(model) != torch.float32:
        return f"it runs fp32 activations, the model is {model_dtype(model)}"
    if any(m.path != "cpu_int4" for m in model.modules() if isinstance(m, QuantLinear)):
        return "QuantLinear layers not on the cpu_int4 path"
    return None


def install(model: nn.Module, fp16_weights: bool = True) -> CpuDecoder | None:
    """Prepare a CPU Transformer for fast decode steps and set model.decode_fn; None (logged) when
    `unavailable_reason` names a reason. With `fp16_weights` (default) the lm_head gets an fbgemm fp16
    copy and unquantized projections become Fp16Linear; False keeps them fp32 (the tests' exact
    comparisons)."""
    reason = unavailable_reason(model)
    if reason is not None:
        log.info("CPU decode fast path off: %s", reason)
        return None
    dec = CpuDecoder(model, fp16_weights)
    model.decode_fn = dec
    _own_parameters(model)
    _return_freed_memory()
    log.info("CPU decode fast path on: %d layers, q/k/v and gate/up fused, %d QuantLinear, lm_head %s%s",
             len(dec.layers), len(dec.quant_modules), dec.lm_head_path,
             f", unquantized projections {dec.dense_path}" if dec.dense_path else "")
    return dec
