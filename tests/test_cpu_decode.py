"""engine.cpu_decode: the fused CPU decode step gives the module path's logits (small random models,
fp32 and quantized with QuantLinear), shares the layers' weights instead of copying them, and steps
aside for QDEC-style forward hooks. No timing assertions.

Tolerances. fp32 models: only summation orders differ (fused matmuls, column-major weights, SDPA,
RoPE as roll + addcmul), so logits agree to ~1e-6 relative; we assert max |diff| <= 1e-4 * max |logit|.
Quantized models: both paths round activations to bf16 before the int4 op, and an ulp of fp32
difference upstream can flip a bf16 rounding, so fast and module path differ at the bf16 noise level
(~1e-3 relative). The meaningful bound is against the exact fp32 reference (QuantLinear path
"reference", cuda_ext/reference.py): the fast path's max error to it must stay within 1.5x the module
path's own max error to it (+1e-5 x max |logit|). Greedy tokens must equal the module path's. These comparisons keep fp32 GEMVs
(install(..., fp16_weights=False)); the fbgemm fp16 GEMVs (lm_head, unquantized projections) have
their own tests below: x times the fp16-rounded weights, and on the real model within 0.05 of fp32.
"""
import os

import torch

if not torch.cuda.is_available():  # before anything imports triton (see cuda_ext/README.md)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from cuda_ext.cpu import fuse_cpu, prepare_cpu  # noqa: E402
from cuda_ext.cpu_native import kernel_name  # noqa: E402
from cuda_ext.testing import random_layer  # noqa: E402
from engine.cpu_decode import install  # noqa: E402
from engine.fp16_linear import Fp16Linear, fp16_pack  # noqa: E402
from engine.quant_linear import QuantLinear  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from models.llama import Transformer  # noqa: E402

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny(bias: bool = False, tie: bool = True, heads: int = 4, kv_heads: int = 2, head_dim: int = 32) -> Transformer:
    cfg = ModelConfig(vocab_size=300, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                      tie_word_embeddings=tie, attention_bias=bias, max_position_embeddings=256)
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


def decode(model: Transformer, prompts: list[list[int]], steps: int, kv_dtype: torch.dtype | None = None
           ) -> tuple[torch.Tensor, list[list[int]]]:
    """Prefill each prompt into its own slot, then `steps` batched greedy steps; (logits (steps, B, V), ids).
    `kv_dtype`: the KV cache's dtype (default the model's, fp32)."""
    b = len(prompts)
    model.setup_cache(b, 64, kv_dtype)
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


def check_same(model: Transformer, prompts=PROMPTS, steps: int = 6, exact: Transformer | None = None,
               kv_dtype: torch.dtype | None = None) -> None:
    """Fast path vs module path of `model`; with `exact` (the same model on the reference path) the
    quantized bound of the module docstring, else the fp32 one. All three with a KV cache of `kv_dtype`."""
    mod, mod_ids = decode(model, prompts, steps, kv_dtype)
    assert install(model, fp16_weights=False) is not None
    got, ids = decode(model, prompts, steps, kv_dtype)
    assert ids == mod_ids
    scale = float(mod.abs().max())
    if exact is None:  # a bf16 cache: an fp32 ulp upstream can flip the rounding of a key to bf16's 2^-8
        assert float((got - mod).abs().max()) <= (1e-3 if kv_dtype == torch.bfloat16 else 1e-4) * scale
        return
    ref, _ = decode(exact, prompts, steps, kv_dtype)
    err_mod, err_fast = float((mod - ref).abs().max()), float((got - ref).abs().max())
    assert err_fast <= 1.5 * err_mod + 1e-5 * scale, (err_fast, err_mod)


@pytest.mark.parametrize("bias", [False, True])
def test_fp32_model_fast_step_matches_module_path(bias):
    check_same(tiny(bias=bias, tie=not bias))


@pytest.mark.parametrize("bits,group", [(3, 64), (4, 128), (2, 32)])
def test_quantized_fast_step_matches_module_path(bits, group, cpu_kernel):
    check_same(quantize(tiny(), bits, group), exact=quantize(tiny(), bits, group, path="reference"))


def test_quantized_batch_at_different_positions_and_single_row(cpu_kernel):
    # three rows at three positions: the per-row mask
    check_same(quantize(tiny(bias=True), rank=4), exact=quantize(tiny(bias=True), rank=4, path="reference"))
    check_same(quantize(tiny(bias=True), rank=4), prompts=[PROMPTS[2]], steps=4,
               exact=quantize(tiny(bias=True), rank=4, path="reference"))


def test_mixed_group_falls_back_to_module_calls(cpu_kernel):
    # q/v quantized, k plain nn.Linear: no fused q/k/v
    check_same(quantize(tiny(), skip="k_proj"), exact=quantize(tiny(), skip="k_proj", path="reference"))


def test_fast_step_agrees_with_module_path_after_install(cpu_kernel):
    """The module path (prefill, evaluation) reads the shared views: same logits after install."""
    model = tiny()
    quantize(model)
    toks = torch.tensor([[4, 8, 15, 16, 23, 42]])
    before = model(toks)
    install(model)
    assert torch.allclose(model(toks), before, rtol=1e-5, atol=1e-5)


def test_layers_share_the_fused_int4_weight(torch_int4):
    model = tiny()
    quantize(model)
    dec = install(model)
    att = model.model.layers[0].self_attn
    fused = dec.layers[0].qkv.w.weight
    for m in (att.q_proj, att.k_proj, att.v_proj):
        assert m._cpu.weight.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    assert sum(m.weight_bytes()["cpu_int4"] for m in (att.q_proj, att.k_proj, att.v_proj)) > 0


def test_native_groups_call_the_layers_own_weights(native_kernel):
    """On fbserve's CPU kernel q/k/v run as one call over the layers' own tile weights (nothing copied)."""
    from engine.cpu_decode import _NativeProj

    model = quantize(tiny())
    dec = install(model)
    att = model.model.layers[0].self_attn
    assert isinstance(dec.layers[0].qkv, _NativeProj)
    assert [w.words.data_ptr() for w in dec.layers[0].qkv.group.weights] == [
        m._native.words.data_ptr() for m in (att.q_proj, att.k_proj, att.v_proj)]
    assert att.q_proj._cpu is None  # no torch int4 pack beside it


def test_native_layers_run_the_whole_step_and_rebind_new_caches(native_kernel):
    """Every projection on the kernel: the step is one call for all layers (status "layers"); a cache
    re-made by setup_cache (decode() makes one per run) is picked up, not written through stale pointers."""
    model = quantize(tiny(bias=True), rank=4)
    exact = quantize(tiny(bias=True), rank=4, path="reference")
    check_same(model, exact=exact)
    dec = model.decode_fn
    assert dec.status()["layers"] == kernel_name() and dec.native_layers is not None
    first, ids = decode(model, PROMPTS, 6)
    again, ids_again = decode(model, PROMPTS, 6)  # new KV cache tensors
    assert ids_again == ids and torch.equal(first, again)


@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.bfloat16])
def test_narrow_kv_cache_fast_step_matches_module_path(kv_dtype, cpu_kernel):
    """A fp16 / bf16 KV cache: the fast step (on fbserve's kernel, one call for every layer) rounds keys and
    values as the module path's cache does, so the same bounds hold; fp32 model: the Python step."""
    check_same(tiny(bias=True, tie=False), kv_dtype=kv_dtype)
    check_same(quantize(tiny(bias=True), rank=4), exact=quantize(tiny(bias=True), rank=4, path="reference"),
               kv_dtype=kv_dtype)


@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.bfloat16])
def test_narrow_kv_cache_stays_close_to_fp32(kv_dtype):
    """Rounding keys and values to 16 bits moves the logits of decode steps by little: fp16 (10-bit
    mantissa) less than bf16 (7-bit); the prompt's own prefill attends to its keys unrounded."""
    model = tiny()
    full, full_ids = decode(model, PROMPTS, 6)
    narrow, ids = decode(model, PROMPTS, 6, kv_dtype)
    assert model.model.layers[0].self_attn.kv_cache.k.dtype == kv_dtype
    err = float((narrow - full).abs().max()) / float(full.abs().max())
    assert 0 < err <= (2e-3 if kv_dtype == torch.float16 else 2e-2), err


def test_native_layers_serve_rows_in_any_slot_order(native_kernel, monkeypatch):
    """Rows in slots 2, 0, 1 at different positions: the one-call step against the per-layer Python step
    on the same kernel; both within the quantized bound of the exact reference."""
    def run(native: bool) -> torch.Tensor:
        monkeypatch.setenv("FBSERVE_CPU_NATIVE_LAYERS", "1" if native else "0")
        model = quantize(tiny(), rank=4)
        dec = install(model, fp16_weights=False)
        assert (dec.native_layers is not None) == native
        model.setup_cache(3, 64)
        slots = [2, 0, 1]
        for s, p in zip(slots, PROMPTS):
            model.hidden_states(torch.tensor([p]), torch.arange(len(p))[None], torch.tensor([s]))
        with torch.inference_mode():
            return model(torch.tensor([[4], [5], [6]]), torch.tensor([[len(p)] for p in PROMPTS]),
                         torch.tensor(slots), last_only=True)[:, 0]

    one_call, per_layer = run(True), run(False)
    assert float((one_call - per_layer).abs().max()) <= 2e-2 * float(per_layer.abs().max())


@pytest.mark.parametrize("threads,positions", [(2, [299]), (3, [299, 0]), (4, [299, 0, 130])])
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
def test_native_layers_split_long_contexts_across_threads(threads, positions, kv_dtype, native_kernel, monkeypatch):
    """A row with >= 256 keys on 2+ threads: the one-call step splits its keys into ranges of >= 128 and merges
    the partial softmaxes (rows at positions 0 and 130 keep one range). Against the per-layer Python step
    on the same kernel and cache dtype."""
    torch.set_num_threads(threads)
    try:
        steps = {}
        for native in (True, False):
            monkeypatch.setenv("FBSERVE_CPU_NATIVE_LAYERS", "1" if native else "0")
            model = quantize(tiny(), rank=4)
            model.config.max_position_embeddings = 512
            dec = install(model, fp16_weights=False)
            assert (dec.native_layers is not None) == native
            model.setup_cache(len(positions), 512, kv_dtype)
            gen = torch.Generator().manual_seed(1)
            for slot, n in enumerate(positions):
                if n:
                    model.hidden_states(torch.randint(0, 300, (1, n), generator=gen), torch.arange(n)[None],
                                        torch.tensor([slot]))
            with torch.inference_mode():
                steps[native] = model(torch.tensor([[4 + i] for i in range(len(positions))]),
                                      torch.tensor([[n] for n in positions]), torch.arange(len(positions)),
                                      last_only=True)[:, 0]
        one_call, per_layer = steps[True], steps[False]
        assert float((one_call - per_layer).abs().max()) <= 2e-2 * float(per_layer.abs().max())
        assert one_call.argmax(-1).tolist() == per_layer.argmax(-1).tolist()
    finally:
        torch.set_num_threads(2)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (8, 1, 128), (8, 8, 16), (12, 4, 48)])
def test_native_attention_for_other_head_shapes(heads, kv_heads, head_dim, native_kernel, monkeypatch):
    """The one-call step's attention for query heads per kv head of 3 (SmolLM2), 8 (two blocks of 4), 1 and
    3, head dims 16 to 128 (value passes of 4 vectors and the tail), a 300-token context split into ranges,
    on an fp16 cache: against the per-layer Python step (SDPA) on the same kernel."""
    torch.set_num_threads(2)
    steps = {}
    for native in (True, False):
        monkeypatch.setenv("FBSERVE_CPU_NATIVE_LAYERS", "1" if native else "0")
        model = quantize(tiny(heads=heads, kv_heads=kv_heads, head_dim=head_dim), rank=4)
        model.config.max_position_embeddings = 512
        assert (install(model, fp16_weights=False).native_layers is not None) == native
        model.setup_cache(2, 512, torch.float16)
        gen = torch.Generator().manual_seed(3)
        for slot, n in enumerate((300, 17)):
            model.hidden_states(torch.randint(0, 300, (1, n), generator=gen), torch.arange(n)[None], torch.tensor([slot]))
        with torch.inference_mode():
            steps[native] = model(torch.tensor([[4], [5]]), torch.tensor([[300], [17]]), torch.arange(2),
                                  last_only=True)[:, 0]
    assert float((steps[True] - steps[False]).abs().max()) <= 2e-2 * float(steps[False].abs().max())
    assert steps[True].argmax(-1).tolist() == steps[False].argmax(-1).tolist()


def test_native_layers_give_a_row_the_same_logits_alone_or_in_a_batch(native_kernel):
    """Batch invariance (a seed's promise): a long-context row stepped alone and beside two others, on 2
    threads, gets bit-identical logits (its key ranges depend on its own length only)."""
    torch.set_num_threads(2)
    model = quantize(tiny(), rank=4)
    model.config.max_position_embeddings = 512
    install(model, fp16_weights=False)
    model.setup_cache(3, 512, torch.float16)
    gen = torch.Generator().manual_seed(2)
    for slot, n in enumerate((299, 130, 40)):
        model.hidden_states(torch.randint(0, 300, (1, n), generator=gen), torch.arange(n)[None], torch.tensor([slot]))
    with torch.inference_mode():
        alone = model(torch.tensor([[4]]), torch.tensor([[299]]), torch.tensor([0]), last_only=True)[0, 0]
        batch = model(torch.tensor([[4], [5], [6]]), torch.tensor([[299], [130], [40]]), torch.arange(3),
                      last_only=True)[:, 0]
    assert torch.equal(alone, batch[0])


def test_a_q8_0_lm_head_runs_in_int8_and_others_in_fp16(native_kernel):
    """A head whose weights are Q8_0 (as the embedded GGUF model's) runs on the int8 kernel: logits within
    1e-4 of fp64, `cpu_int8` bytes reported, greedy tokens as the fp32 module path's; any other head keeps
    the fbgemm fp16 copy (tests/test_cuda_ext_cpu_q8.py has the kernel's own tests)."""
    from engine.cpu_decode import _rms
    from tests.test_cuda_ext_cpu_q8 import q8_weight

    from engine.int8_head import Int8Embedding, Int8Head

    model = quantize(tiny())
    w = q8_weight(300, 128, 0)[0]
    model.lm_head.weight.data.copy_(w)  # tied: the embedding too
    _, module_ids = decode(model, PROMPTS, 6)
    dec = install(model)
    assert dec.status()["lm_head"] == f"{kernel_name()}-q8_0" and dec.lm_fp16 is None
    # the fp32 weight is gone: the head and the tied embedding read the int8 codes
    assert isinstance(model.lm_head, Int8Head) and isinstance(model.model.embed_tokens, Int8Embedding)
    assert model.lm_head.weight_bytes() == {"cpu_int8": 304 * (128 + 16), "bias": 0}
    assert dec.weight_bytes() == {"cpu_fp16": 0}
    ids = torch.tensor([[0, 17, 299], [5, 5, 16]])
    assert torch.equal(model.model.embed_tokens(ids), w[ids])
    h = torch.randn(3, 128)
    ref = (_rms(h, model.model.norm).double() @ w.double().t()).detach()
    assert float((dec._logits(h)[:, 0].double() - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
    assert decode(model, PROMPTS, 6)[1] == module_ids  # prefill (module path) and steps on the int8 head
    assert install(model).status()["lm_head"] == f"{kernel_name()}-q8_0"  # installed again: still int8
    other = quantize(tiny())
    assert install(other).status()["lm_head"] == ("fbgemm-fp16" if FBGEMM else install(other).status()["lm_head"])
    assert isinstance(other.lm_head, torch.nn.Linear)
    untied = quantize(tiny(tie=False))
    untied.lm_head.weight.data.copy_(w)
    install(untied)
    assert isinstance(untied.lm_head, Int8Head) and isinstance(untied.model.embed_tokens, torch.nn.Embedding)


def test_native_layers_refuse_shapes_they_cannot_run(native_kernel):
    from cuda_ext.cpu_native import NativeLayers

    model = quantize(tiny(), rank=4)
    dec = install(model)
    weights = dec.native_layers.layers
    with pytest.raises(ValueError, match="unsupported attention shape"):
        NativeLayers(weights, 4, 2, 24, 192)
    with pytest.raises(ValueError, match="gate_up"):
        NativeLayers(weights, 4, 2, 32, 100)


def test_fuse_cpu_equals_separate_layers(torch_int4):
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


def test_unaligned_groups_are_not_fused(torch_int4):
    """tiny()'s k/v have 64 rows, q 128: fused. A q of 48 rows would not be (see fuse_cpu)."""
    from engine.cpu_decode import _Each, _proj

    small = [QuantLinear(random_layer(n, 128, 3, 64, seed=n)[0]) for n in (48, 64)]
    assert isinstance(_proj(small), _Each)


def test_hooks_send_steps_to_the_module_path(cpu_kernel):
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



def test_reprepared_layer_turns_the_fast_path_off(cpu_kernel):
    model = quantize(tiny())
    dec = install(model)
    assert dec.usable()
    model.model.layers[0].mlp.up_proj.to("cpu")  # re-prepares that layer: the fused copy may be stale
    assert not dec.usable()
    toks = torch.tensor([[4, 8, 15]])
    model.setup_cache(1, 16)
    model.hidden_states(toks, torch.arange(3)[None], torch.tensor([0]))
    assert model(torch.tensor([[1]]), torch.tensor([[3]]), torch.tensor([0]), last_only=True).shape == (1, 1, 300)


FBGEMM = "fbgemm" in torch.backends.quantized.supported_engines
needs_fbgemm = pytest.mark.skipif(not FBGEMM, reason="fbgemm (fp16 GEMV) is x86-only")


@needs_fbgemm
@pytest.mark.parametrize("bias", [False, True])
def test_fp16_pack_is_x_times_fp16_rounded_weights(bias):
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(300, 128, generator=g) * 0.08, torch.randn(3, 128, generator=g)
    b = torch.randn(300, generator=g) if bias else None
    packed, path = fp16_pack(w, b)
    assert path == "fbgemm-fp16"
    got = torch.ops.quantized.linear_dynamic_fp16(x, packed)
    extra = 0 if b is None else b
    want16, want32 = x @ w.half().float().t() + extra, x @ w.t() + extra
    err16, err32 = float((got - want16).abs().max()), float((got - want32).abs().max())
    assert got.dtype == torch.float32 and err16 <= 1e-5 * float(want32.abs().max())
    assert err32 > 5 * err16  # the rounding of the weights to fp16 is visible: it is this path, not fp32


def test_weights_beyond_fp16_stay_fp32():
    w = torch.randn(8, 16)
    w[3, 5] = 1e5
    assert fp16_pack(w, None) == (None, "fp32: weights overflow fp16")
    model = tiny()
    model.lm_head.weight.data[3, 5] = 1e5  # tied: the embedding too
    status = install(model).status()
    assert status["lm_head"] == "fp32: weights overflow fp16"
    assert status["dense_linears"] == ("fbgemm-fp16" if FBGEMM else status["dense_linears"])
    assert install(tiny(), fp16_weights=False).status() == {
        "enabled": True, "layers": "python (not every projection is on fbserve's CPU kernel)",
        "lm_head": "fp32: asked", "dense_linears": "fp32: asked", "declined": None}


@needs_fbgemm
@pytest.mark.parametrize("bias", [False, True])
def test_fp32_model_fast_step_with_fp16_weights(bias):
    """After install the projections are Fp16Linear (prefill and step) and the head has an fp16 copy:
    the fp32 module path's greedy tokens, logits within the fp16 rounding of the weights (not equal:
    that is this path)."""
    model = tiny(bias=bias, tie=not bias)
    mod, mod_ids = decode(model, PROMPTS, 6)
    status = install(model).status()
    assert status["lm_head"] == status["dense_linears"] == "fbgemm-fp16"
    assert not any(type(m) is torch.nn.Linear for m in model.model.layers.modules())  # fp32 weights gone
    assert all(type(getattr(model.model.layers[0].mlp, n)) is Fp16Linear for n in ("gate_proj", "up_proj", "down_proj"))
    got, ids = decode(model, PROMPTS, 6)  # its prefill runs the Fp16Linear modules too
    assert ids == mod_ids
    err, scale = float((got - mod).abs().max()), float(mod.abs().max())
    assert 0 < err <= 2e-3 * scale, (err, scale)
    assert install(model).status()["dense_linears"] == "fbgemm-fp16"  # installed again: still says so
    qmodel = quantize(tiny())
    assert install(qmodel).status()["dense_linears"] is None  # every projection is QuantLinear


@needs_fbgemm
def test_fp16_weights_on_the_real_model_and_text():
    """SmolLM2 (fp32), 64 teacher-forced decode steps over WikiText-2 test after a 128-token prefill:
    with fbgemm fp16 (Fp16Linear projections for prefill and step, the lm_head's fp16 copy) against
    all fp32: max |dlogit| <= 0.1 (measured 0.037), KL <= 1e-5 (2.2e-6), the same argmax >= 99% (100%).
    (The int4 path's own bf16 noise is 0.24-0.50 on the same kind of check.)"""
    from models.loader import load_model
    from quant.eval import token_windows, wikitext2_text

    loaded = load_model("default")
    model = loaded.model
    ids = token_windows(loaded.tokenizer, wikitext2_text(), 192, max_windows=1)[0].tolist()
    model.setup_cache(1, 200)
    slot = torch.tensor([0])

    def steps() -> torch.Tensor:
        model.hidden_states(torch.tensor([ids[:128]]), torch.arange(128)[None], slot)
        with torch.inference_mode():
            return torch.stack([model(torch.tensor([[ids[t]]]), torch.tensor([[t]]), slot, last_only=True)[0, 0]
                                for t in range(128, 192)])

    install(model, fp16_weights=False)
    ref = steps()
    assert install(model).status()["dense_linears"] == "fbgemm-fp16"  # installed again, now with fp16 packs
    got = steps()
    logp, logq = ref.log_softmax(-1), got.log_softmax(-1)
    kl = float((logp.exp() * (logp - logq)).sum(-1).mean())
    assert 0 < float((got - ref).abs().max()) <= 0.1
    assert kl <= 1e-5
    assert float((got.argmax(-1) == ref.argmax(-1)).float().mean()) >= 0.99


def test_without_fbgemm_everything_stays_fp32_and_says_why(monkeypatch):
    """A torch build without fbgemm (ARM: a Jetson's CPU): no fp16 packs, the fp32 weights stay, the
    step equals the fp32 module path, and the status names the reason."""
    monkeypatch.setattr(type(torch.backends.quantized), "supported_engines", ["qnnpack"])
    packed, path = fp16_pack(torch.randn(4, 8), None)
    assert packed is None and "no fbgemm" in path
    model = tiny()
    mod, mod_ids = decode(model, PROMPTS, 4)
    status = install(model).status()
    assert "no fbgemm" in status["lm_head"] and "no fbgemm" in status["dense_linears"]
    assert any(type(m) is torch.nn.Linear for m in model.model.layers.modules())
    got, ids = decode(model, PROMPTS, 4)
    assert ids == mod_ids and float((got - mod).abs().max()) <= 1e-4 * float(mod.abs().max())


def test_engine_decodes_with_every_thread_only_on_the_one_call_step(native_kernel, monkeypatch):
    """The native one-call step runs its own team (barriers that yield), so the engine gives decode steps
    all threads; a step that falls back to Python (here: a forward hook, as QDEC adds) keeps one fewer."""
    from pathlib import Path

    from engine.engine import Engine
    from models.loader import LoadedModel

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    eng = Engine(LoadedModel(quantize(tiny()), None, "tiny", Path(".")), max_batch=2, max_seq_len=64)
    assert eng.cpu_decoder.native_layers is not None and eng.threads == {"prefill": 2, "decode": 2, "sample": 1}
    hooked = quantize(tiny())
    next(m for m in hooked.modules() if isinstance(m, QuantLinear)).register_forward_hook(lambda *a: None)
    eng = Engine(LoadedModel(hooked, None, "tiny", Path(".")), max_batch=2, max_seq_len=64)
    assert eng.threads == {"prefill": 2, "decode": 1, "sample": 1}
