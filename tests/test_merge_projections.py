"""engine.merge: q/k/v and gate/up as one QuantLinear each (what the Engine does on CUDA), checked on the
Triton path under the interpreter: the merged layer gives the layers' outputs side by side, the model gives
the same logits merged and apart, the Engine reports it in /health's terms, and every refusal says why."""
import os

import torch

if not torch.cuda.is_available():  # before anything imports triton (see cuda_ext/README.md)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import asyncio  # noqa: E402

import pytest  # noqa: E402

import engine.quant_linear as ql  # noqa: E402
from cuda_ext.testing import random_layer, rel_err  # noqa: E402
from engine import qdec  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.merge import merge_projections, merge_quant_linears  # noqa: E402
from engine.quant_linear import QuantLinear  # noqa: E402
from engine.types import GenerationRequest, SamplingParams  # noqa: E402
from models.loader import load_model  # noqa: E402
from tests.test_qdec_residuals import with_residuals  # noqa: E402,F401
from tests.test_quant_checkpoint import quantized, tiny_model  # noqa: E402,F401


def _layer(n, rank, bias, seed, bits=3, k=256, path="triton"):
    packed, a, b = random_layer(n, k, bits, 64, rank=rank, seed=seed)
    bvec = torch.randn(n, generator=torch.Generator().manual_seed(seed + 100)) * 0.1 if bias else None
    return QuantLinear(packed, a, b, bvec, path=path)


@pytest.mark.parametrize("m", [1, 3])
def test_merged_layer_gives_the_layers_outputs_side_by_side(m):
    parts = [_layer(64, 8, True, 1), _layer(32, 16, False, 2), _layer(32, 0, True, 3)]  # one without a branch
    merged, why = merge_quant_linears(parts)
    assert why is None and merged.out_features == 128 and merged.path == "triton"
    # segmented: B stacked (128, 16) with no block-diagonal zeros, A one block of 16 rows per layer (padded)
    assert merged.segments == (64, 32, 32) and tuple(merged.B.shape) == (128, 16) and merged.rank == 48
    x = (torch.randn(m, 256, generator=torch.Generator().manual_seed(m)) * 0.5).half()
    apart = torch.cat([p(x) for p in parts], dim=-1)
    y = merged(x)
    assert y.shape == (m, 128) and rel_err(y, apart) < 2e-3
    # each layer's columns see only its own t: zero the other layers' A blocks, its columns keep their value
    merged.A[16:].zero_()
    y0 = merged(x)
    assert rel_err(y0[:, :64], apart[:, :64]) < 2e-3 and rel_err(y0[:, 64:96], apart[:, 64:96]) > 0.05
    merged.A[:16].zero_()  # ... and the first layer's columns lose their branch
    assert rel_err(merged(x)[:, :64], apart[:, :64]) > 0.05


def test_merged_layer_on_the_reference_path_is_the_same():
    parts = [_layer(64, 8, True, 1), _layer(32, 8, False, 2)]
    merged, _ = merge_quant_linears(parts)
    ref = QuantLinear(merged.packed, merged.A, merged.B, merged.bias, path="reference", segments=merged.segments)
    x = (torch.randn(2, 256, generator=torch.Generator().manual_seed(7)) * 0.5).half()
    assert rel_err(ref(x), torch.cat([p(x) for p in parts], dim=-1)) < 2e-3
    with pytest.raises(ValueError, match="2 segment"):
        QuantLinear(merged.packed, merged.A[:8], merged.B, path="reference", segments=merged.segments)


def test_merge_declines_with_the_reason():
    assert merge_quant_linears([_layer(64, 8, False, 1), _layer(32, 8, False, 2, bits=4)])[1] == \
        "bits, group size, input size or device differ"
    assert merge_quant_linears([_layer(64, 8, False, 1), _layer(40, 8, False, 2)])[1] == \
        "an out_features is not a multiple of 16"
    assert merge_quant_linears([_layer(64, 128, False, 1), _layer(32, 128, False, 2),
                                _layer(32, 8, False, 3)])[1] == "rank 128 x 3 layers > 256"
    assert merge_quant_linears([_layer(64, 64, False, 1), _layer(32, 64, False, 2),
                                _layer(32, 64, False, 3)])[0].segments == (64, 32, 32)  # q/k/v at rank 64
    assert merge_quant_linears([_layer(64, 8, False, 1, path="reference"), _layer(32, 8, False, 2)])[1] == \
        "not on the Triton path"
    assert merge_quant_linears([_layer(64, 8, False, 1), torch.nn.Linear(256, 32)])[1] == "not all quantized"


def _triton_model(quantized, monkeypatch):  # noqa: F811
    monkeypatch.setenv(ql.ENV_PATH, "triton")
    return load_model(str(quantized), dtype=torch.float32)


def test_model_logits_are_the_same_merged(quantized, monkeypatch):  # noqa: F811
    apart, merged = _triton_model(quantized, monkeypatch).model, _triton_model(quantized, monkeypatch).model
    status = merge_projections(merged)
    assert status == {"enabled": True, "qkv": 2, "gate_up": 2}
    attn, mlp = merged.model.layers[0].self_attn, merged.model.layers[0].mlp
    assert attn.q_proj is None and attn.merged_sizes == [96, 48, 48] and mlp.merged_sizes == [160, 160]
    assert sum(isinstance(m, QuantLinear) for m in merged.modules()) == 2 * 4  # 7 layers -> 4 per decoder layer
    tokens = torch.randint(3, 60, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want, got = apart(tokens), merged(tokens)
    assert rel_err(got, want) < 1e-2


def test_engine_merges_when_asked_and_says_why_not(quantized, monkeypatch):  # noqa: F811
    eng = Engine(_triton_model(quantized, monkeypatch), max_batch=2, max_seq_len=64, decode_graphs=False,
                 merge_projections=True)
    assert eng.merged_projections_status() == {"enabled": True, "qkv": 2, "gate_up": 2}

    async def run() -> list[int]:
        eng.start()
        try:
            req = GenerationRequest("r", [5, 9, 13, 7], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
            return [t for ev in [e async for e in eng.generate(req)] for t in ev.token_ids]
        finally:
            eng.shutdown()

    assert len(asyncio.run(run())) == 6
    monkeypatch.delenv(ql.ENV_PATH)  # the CPU's own path from here
    cpu = Engine(load_model(str(quantized), dtype=torch.float32), max_batch=1, max_seq_len=64)
    assert cpu.merged_projections_status() == {"enabled": False, "reason": "not a CUDA device"}
    cpu_layers = Engine(load_model(str(quantized), dtype=torch.float32), max_batch=1, max_seq_len=64,
                        merge_projections=True)  # the cpu_int4 layers stay apart, and it says why
    status = cpu_layers.merged_projections_status()
    assert not status["enabled"] and status["reason"] == \
        "qkv: not on the Triton path (2 layers); gate_up: not on the Triton path (2 layers)"
    monkeypatch.setenv("FBSERVE_MERGE_PROJ", "0")
    off = Engine(_triton_model(quantized, monkeypatch), max_batch=1, max_seq_len=64, merge_projections=True)
    assert off.merged_projections_status() == {"enabled": False, "reason": "FBSERVE_MERGE_PROJ=0"}


def test_qdec_follows_the_merge(with_residuals, monkeypatch):  # noqa: F811
    """With QDEC on, q/k/v and gate/up still merge and the merged layer carries one residual (the parts'
    columns side by side): the same logits as QDEC on the layers apart, the same bytes fetched, one
    selection instead of three (q/k/v) or two (gate/up)."""
    apart, merged = _triton_model(with_residuals, monkeypatch), _triton_model(with_residuals, monkeypatch)
    for lm in (apart, merged):
        assert qdec.attach(lm.model, lm.path, mode="cpu", k_chunk=8).enabled
        qdec.controller(lm.model).all_positions = True  # correct every position (a full forward compares)
    qa, qm = qdec.controller(apart.model), qdec.controller(merged.model)
    assert merge_projections(merged.model) == {"enabled": True, "qkv": 2, "gate_up": 2}
    assert len(qm.layers) == 2 * 4 and len(qm.handles) == 2 * len(qm.layers)  # 7 QDEC layers -> 4 per decoder layer
    assert qm.residual_bytes == qa.residual_bytes
    qkv = qm.layers["model.layers.0.self_attn.qkv_proj"]
    assert qkv.kind == "qkv" and qkv.rscales.numel() == 96 + 48 + 48
    assert merged.model.model.layers[0].self_attn.qkv_proj._forward_pre_hooks  # hooked
    tokens = torch.randint(3, 60, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want, got = apart.model(tokens), merged.model(tokens)
        qdec.controller(apart.model).enabled = False
        plain = apart.model(tokens)
    assert rel_err(got, want) < 1e-2 and rel_err(plain, want) > 10 * rel_err(got, want)  # QDEC did something
    assert qm.counters.bytes == qa.counters.bytes and qm.counters.channels < qa.counters.channels


def test_qdec_in_evaluation_mode_keeps_the_layers_apart(with_residuals, monkeypatch):  # noqa: F811
    lm = _triton_model(with_residuals, monkeypatch)
    assert qdec.attach(lm.model, lm.path, mode="cpu", k_chunk=8).enabled
    qdec.dense_for_eval(lm.model)
    status = merge_projections(lm.model)
    assert not status["enabled"] and status["reason"] == ("qkv: QDEC is in evaluation mode (dense copies / recall "
                                                          "counting) (2 layers); gate_up: QDEC is in evaluation mode "
                                                          "(dense copies / recall counting) (2 layers)")
    assert lm.model.model.layers[0].self_attn.qkv_proj is None
    lm.model.register_forward_hook(lambda *a: None)  # a hook that is not QDEC's: nothing merges
    assert merge_projections(lm.model)["reason"] == "forward hooks other than QDEC's are attached (per-layer)"
