"""engine.cpu_decode: the fused CPU decode step gives the module path's logits (small random models,
fp32 and quantized with QuantLinear), shares the layers' weights instead of copying them, and steps
aside for QDEC-style forward hooks. No timing assertions.

Tolerances. fp32 models: only summation orders differ (fused matmuls, column-major weights, SDPA,
RoPE as roll + addcmul), so logits agree to ~1e-6 relative; we assert max |diff| <= 1e-4 * max |logit|.
Quantized models: both paths round activations to bf16 before the int4 op, and an ulp of fp32
difference upstream can flip a bf16 rounding, so fast and module path differ at the bf16 noise level
(~1e-3 relative). The meaningful bound is against the exact fp32 reference (QuantLinear path
"reference", cuda_ext/reference.py): the fast path's max error to it must stay within 1.5x the module
path's own max error to it (+1e-5 x max |logit|). Greedy tokens must equal the module path's. These comparisons keep the fp32 lm_head
(install(..., lm_head_fp16=False)); the fp16 lm_head has its own tests below: its logits are the
fp32 hidden state times the fp16-rounded weights, and on the real model within 0.05 of the fp32 head.
"""
import os

import torch

if not torch.cuda.is_available():  # before anything imports triton (see cuda_ext/README.md)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from cuda_ext.cpu import fuse_cpu, prepare_cpu  # noqa: E402
from cuda_ext.testing import random_layer  # noqa: E402
from engine.cpu_decode import install  # noqa: E402
from engine.quant_linear import QuantLinear  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from models.llama import Transformer  # noqa: E402

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny(bias: bool = False, tie: bool = True) -> Transformer:
    cfg = ModelConfig(vocab_size=300, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=tie,
                      attention_bias=bias, max_position_embeddings=256)
    torch.manual_seed(0)
    model = Transformer(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.08)
    for layer in model.model.layers:
        layer.input_layernorm.weight.data.uniform_(0.5, 1.5)
        layer.post_attention_layernorm.weight.data.uniform_(0.5, 1.5)
    model.model.norm.weight.data.uniform_(0.5, 1.5)
    return model.eval()


def quantize(model: Transformer, bits: int = 3, group: int = 64, rank: int = 8, skip: str = "",
             path: str | None = None) -> Transformer:
    """Swap the projections for QuantLinear layers (random codes, random branch): a different model,
    the same for both paths."""
    seed = 0
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in PROJ:
                lin = getattr(parent, name, None)
                if lin is None or name == skip:
                    continue
                seed += 1
                packed, a, b = random_layer(lin.out_features, lin.in_features, bits, group, rank=rank, seed=seed)
                setattr(parent, name, QuantLinear(packed, a, b, None if lin.bias is None else lin.bias.detach(),
                                                  path=path))
    return model


def decode(model: Transformer, prompts: list[list[int]], steps: int) -> tuple[torch.Tensor, list[list[int]]]:
    """Prefill each prompt into its own slot, then `steps` batched greedy steps; (logits (steps, B, V), ids)."""
    b = len(prompts)
    model.setup_cache(b, 64)
    last = []
    for s, p in enumerate(prompts):
        h = model.hidden_states(torch.tensor([p]), torch.arange(len(p))[None], torch.tensor([s]))
        last.append(int(model.lm_head(h[0, -1]).argmax()))
    pos = [len(p) for p in prompts]
    out, ids = [], [[] for _ in prompts]
    with torch.inference_mode():
        for _ in range(steps):
            logits = model(torch.tensor([[t] for t in last]), torch.tensor([[q] for q in pos]),
                           torch.arange(b), last_only=True)[:, 0]
            out.append(logits)
            last = logits.argmax(-1).tolist()
            for i, t in enumerate(last):
                ids[i].append(t)
            pos = [q + 1 for q in pos]
    return torch.stack(out), ids


PROMPTS = [[5, 17, 42, 9, 100, 3], [7, 7, 250, 1], [33, 12, 8, 90, 91, 92, 93, 2, 11]]


def check_same(model: Transformer, prompts=PROMPTS, steps: int = 6, exact: Transformer | None = None) -> None:
    """Fast path vs module path of `model`; with `exact` (the same model on the reference path) the
    quantized bound of the module docstring, else the fp32 one."""
    mod, mod_ids = decode(model, prompts, steps)
    assert install(model, lm_head_fp16=False) is not None
    got, ids = decode(model, prompts, steps)
    assert ids == mod_ids
    scale = float(mod.abs().max())
    if exact is None:
        assert float((got - mod).abs().max()) <= 1e-4 * scale
        return
    ref, _ = decode(exact, prompts, steps)
    err_mod, err_fast = float((mod - ref).abs().max()), float((got - ref).abs().max())
    assert err_fast <= 1.5 * err_mod + 1e-5 * scale, (err_fast, err_mod)


@pytest.mark.parametrize("bias", [False, True])
def test_fp32_model_fast_step_matches_module_path(bias):
    check_same(tiny(bias=bias, tie=not bias))


@pytest.mark.parametrize("bits,group", [(3, 64), (4, 128), (2, 32)])
def test_quantized_fast_step_matches_module_path(bits, group):
    check_same(quantize(tiny(), bits, group), exact=quantize(tiny(), bits, group, path="reference"))


def test_quantized_batch_at_different_positions_and_single_row():
    # three rows at three positions: the per-row mask
    check_same(quantize(tiny(bias=True), rank=4), exact=quantize(tiny(bias=True), rank=4, path="reference"))
    check_same(quantize(tiny(bias=True), rank=4), prompts=[PROMPTS[2]], steps=4,
               exact=quantize(tiny(bias=True), rank=4, path="reference"))


def test_mixed_group_falls_back_to_module_calls():
    # q/v quantized, k plain nn.Linear: no fused q/k/v
    check_same(quantize(tiny(), skip="k_proj"), exact=quantize(tiny(), skip="k_proj", path="reference"))


def test_fast_step_agrees_with_module_path_after_install():
    """The module path (prefill, evaluation) reads the shared views: same logits after install."""
    model = tiny()
    quantize(model)
    toks = torch.tensor([[4, 8, 15, 16, 23, 42]])
    before = model(toks)
    install(model)
    assert torch.allclose(model(toks), before, rtol=1e-5, atol=1e-5)


def test_layers_share_the_fused_int4_weight():
    model = tiny()
    quantize(model)
    dec = install(model)
    att = model.model.layers[0].self_attn
    fused = dec.layers[0].qkv.w.weight
    for m in (att.q_proj, att.k_proj, att.v_proj):
        assert m._cpu.weight.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    assert sum(m.weight_bytes()["cpu_int4"] for m in (att.q_proj, att.k_proj, att.v_proj)) > 0


def test_fuse_cpu_equals_separate_layers():
    parts = [random_layer(n, 192, 3, 64, seed=n)[0] for n in (64, 128, 40)]  # 40: padded to 48 rows
    ws = [prepare_cpu(p) for p in parts]
    fused, views = fuse_cpu(ws)
    x = torch.randn(3, 192).bfloat16()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, fused.weight, fused.group_size, fused.scales_zeros)
    off = 0
    for w, v in zip(ws, views):
        one = torch.ops.aten._weight_int4pack_mm_for_cpu(x, w.weight, w.group_size, w.scales_zeros)
        assert torch.equal(y[:, off:off + w.n16], one)
        assert torch.equal(v.weight, w.weight)
        off += w.n16
    with pytest.raises(ValueError, match="same in_features"):
        fuse_cpu([ws[0], prepare_cpu(random_layer(16, 128, 3, 64)[0])])
    with pytest.raises(ValueError, match="multiples of 64"):  # the pack is not row-separable there
        fuse_cpu([ws[2], ws[0]])


def test_unaligned_groups_are_not_fused():
    """tiny()'s k/v have 64 rows, q 128: fused. A q of 48 rows would not be (see fuse_cpu)."""
    from engine.cpu_decode import _Each, _proj

    small = [QuantLinear(random_layer(n, 128, 3, 64, seed=n)[0]) for n in (48, 64)]
    assert isinstance(_proj(small), _Each)


def test_hooks_send_steps_to_the_module_path():
    model = tiny()
    quantize(model)
    dec = install(model)
    calls = []
    h = model.model.layers[1].mlp.down_proj.register_forward_hook(lambda m, i, o: calls.append(1))
    _, _ = decode(model, [PROMPTS[0]], 2)
    assert calls and not dec.usable()
    h.remove()
    assert dec.usable()


def test_disabled_by_env(monkeypatch):
    monkeypatch.setenv("FBSERVE_CPU_DECODE", "0")
    assert install(tiny()) is None



def test_reprepared_layer_turns_the_fast_path_off():
    model = quantize(tiny())
    dec = install(model)
    assert dec.usable()
    model.model.layers[0].mlp.up_proj.to("cpu")  # re-prepares that layer: the fused copy may be stale
    assert not dec.usable()
    toks = torch.tensor([[4, 8, 15]])
    model.setup_cache(1, 16)
    model.hidden_states(toks, torch.arange(3)[None], torch.tensor([0]))
    assert model(torch.tensor([[1]]), torch.tensor([[3]]), torch.tensor([0]), last_only=True).shape == (1, 1, 300)


def _step_hidden_and_fast_logits(model: Transformer, lm_head_fp16: bool = True):
    """One decode step after a prefill: the module path's final hidden state, then the fast step's
    logits for the same token and position (it rewrites the same cache row)."""
    model.setup_cache(1, 32)
    prompt = PROMPTS[0]
    model.hidden_states(torch.tensor([prompt]), torch.arange(len(prompt))[None], torch.tensor([0]))
    tok, pos, slot = torch.tensor([[11]]), torch.tensor([[len(prompt)]]), torch.tensor([0])
    hidden = model.hidden_states(tok, pos, slot)[0, -1]
    dec = install(model, lm_head_fp16=lm_head_fp16)
    with torch.inference_mode():
        logits = model(tok, pos, slot, last_only=True)[0, 0]
    return dec, hidden, logits


@pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines, reason="fbgemm is x86-only")
@pytest.mark.parametrize("bias", [False, True])
def test_fp16_lm_head_is_the_fp32_hidden_state_times_fp16_weights(bias):
    model = tiny(bias=bias, tie=not bias)
    if bias:  # Llama heads have none; the fast step supports one
        model.lm_head.bias = torch.nn.Parameter(0.5 * torch.randn(model.lm_head.out_features))
    w = model.lm_head.weight.detach().clone()
    b = None if model.lm_head.bias is None else model.lm_head.bias.detach().clone()
    dec, hidden, logits = _step_hidden_and_fast_logits(model)
    assert dec.lm_head_path == "fbgemm-fp16" and dec.status()["lm_head"] == "fbgemm-fp16"
    assert logits.dtype == torch.float32
    want16 = hidden @ w.half().float().t() + (0 if b is None else b)
    want32 = hidden @ w.t() + (0 if b is None else b)
    err16, err32 = float((logits - want16).abs().max()), float((logits - want32).abs().max())
    scale = float(want32.abs().max())
    assert err16 <= 1e-5 * scale, (err16, scale)
    assert err32 > 5 * err16  # the fp16 rounding of the weights is visible: it is this path, not fp32


def test_lm_head_that_overflows_fp16_stays_fp32():
    model = tiny()
    model.lm_head.weight.data[3, 5] = 1e5
    w = model.lm_head.weight.detach().clone()
    dec, hidden, logits = _step_hidden_and_fast_logits(model)
    assert dec.lm_head_path.startswith("fp32") and "overflow" in dec.lm_head_path
    assert float((logits - hidden @ w.t()).abs().max()) <= 1e-5 * float(logits.abs().max())
    assert install(tiny(), lm_head_fp16=False).status()["lm_head"] == "fp32: asked"


@pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines, reason="fbgemm is x86-only")
def test_fp16_lm_head_on_the_real_model_and_text():
    """SmolLM2's head on 512 real WikiText-2 test positions: the fp16 head's logits stay within 0.05 of
    the fp32 head's (measured 0.024), KL <= 1e-5 (measured 1e-6), the same argmax >= 99% (99.8%)."""
    from models.loader import load_model
    from quant.eval import token_windows, wikitext2_text
    from engine.cpu_decode import fp16_lm_head

    loaded = load_model("default")
    model = loaded.model
    tokens = token_windows(loaded.tokenizer, wikitext2_text(), 256, max_windows=2)
    with torch.inference_mode():
        hidden = model.hidden_states(tokens).reshape(-1, model.config.hidden_size)
        packed, path = fp16_lm_head(model.lm_head)
        assert path == "fbgemm-fp16"
        ref = model.lm_head(hidden)
        got = torch.cat([torch.ops.quantized.linear_dynamic_fp16(h[None], packed) for h in hidden])  # as decode: 1 row
    logp, logq = ref.log_softmax(-1), got.log_softmax(-1)
    kl = float((logp.exp() * (logp - logq)).sum(-1).mean())
    assert float((got - ref).abs().max()) <= 0.05
    assert kl <= 1e-5
    assert float((got.argmax(-1) == ref.argmax(-1)).float().mean()) >= 0.99
