"""engine.cuda_graph_decode on the CPU: the static decode step (capture off) equals the module path for
any batch, slot order and length bucket; padding rows write only the scratch slot; the engine generates
the same tokens with it; and graphs are declined, with the reason, where they cannot serve.
The capture and replay themselves need CUDA: tests/test_gpu_engine.py."""
from __future__ import annotations

import asyncio

import pytest
import torch

from engine import cuda_graph_decode as cgd
from engine import qdec
from engine.engine import Engine
from engine.types import GenerationRequest, SamplingParams
from models.loader import load_model
from tests.test_qdec_residuals import with_residuals  # noqa: F401  (module fixture)
from tests.test_quant_checkpoint import quantized, tiny_model  # noqa: F401


def test_buckets() -> None:
    assert cgd.buckets(8, 2048) == ([1, 2, 4, 8], [128, 256, 512, 1024, 2048])
    assert cgd.buckets(5, 300) == ([1, 2, 4, 5], [128, 256, 300])
    assert cgd.buckets(1, 100) == ([1], [100])
    assert cgd.bucket(3, [1, 2, 4, 8]) == 4 and cgd.bucket(129, [128, 256]) == 256
    with pytest.raises(ValueError, match="exceeds"):
        cgd.bucket(9, [1, 2, 4, 8])


def test_static_step_equals_the_module_path(quantized) -> None:  # noqa: F811
    model = load_model(str(quantized), dtype=torch.float32).model
    dec = cgd.GraphDecoder(model, max_batch=4, max_seq_len=160, capture=False)  # cache: 5 slots x 160
    ref = load_model(str(quantized), dtype=torch.float32).model
    ref.setup_cache(5, 160)
    g = torch.Generator().manual_seed(0)
    lengths = {0: 5, 1: 7, 2: 140, 3: 3}  # slot 2 is past the first length bucket (128)
    with torch.inference_mode():
        for m in (model, ref):
            for slot, n in lengths.items():
                toks = torch.randint(3, 60, (1, n), generator=torch.Generator().manual_seed(slot))
                m.hidden_states(toks, torch.arange(n)[None], torch.tensor([slot]))
        untouched = [c.self_attn.kv_cache.k[1].clone() for c in model.model.layers]
        for slots in ([3], [0, 3], [3, 0, 2]):  # batch 1, 2, and 3 padded to bucket 4; any slot order
            toks = torch.randint(3, 60, (len(slots),), generator=g).tolist()
            pos = [lengths[s] for s in slots]
            got = dec.step(toks, pos, slots)
            want = ref(torch.tensor(toks)[:, None], torch.tensor(pos)[:, None], torch.tensor(slots), last_only=True)
            torch.testing.assert_close(got, want[:, 0], rtol=1e-4, atol=1e-4)
            for s in slots:
                lengths[s] += 1
    for layer, before in zip(model.model.layers, untouched):  # slot 1 never stepped: unchanged
        assert torch.equal(layer.self_attn.kv_cache.k[1], before)
    assert model.model.layers[0].self_attn.kv_cache.k.shape[0] == 5  # + the scratch slot


def test_engine_generates_the_same_tokens_with_the_static_step(quantized) -> None:  # noqa: F811
    prompts = [[5, 9, 13, 7], [11, 4, 4, 20, 31, 8], [40, 41]]

    async def run(engine: Engine) -> list[list[int]]:
        async def one(i: int, ids: list[int]) -> list[int]:
            req = GenerationRequest(f"r{i}", ids, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
            return [t for ev in [e async for e in engine.generate(req)] for t in ev.token_ids]
        engine.start()
        try:
            return list(await asyncio.gather(*[one(i, p) for i, p in enumerate(prompts)]))
        finally:
            engine.shutdown()

    plain = asyncio.run(run(Engine(load_model(str(quantized), dtype=torch.float32), max_batch=4, max_seq_len=64,
                                   decode_graphs=False)))
    static = Engine(load_model(str(quantized), dtype=torch.float32), max_batch=4, max_seq_len=64, decode_graphs=True)
    assert static.graph_decoder is not None and static.cuda_graph_status()["reason"] == "capture off (eager static step)"
    assert asyncio.run(run(static)) == plain and all(len(t) == 10 for t in plain)


def test_graphs_are_declined_with_the_reason(with_residuals, monkeypatch) -> None:  # noqa: F811
    model = load_model(str(with_residuals), dtype=torch.float32).model
    assert cgd.install(model, 4, 64) == (None, "the model is not on a CUDA device")
    eng = Engine(load_model(str(with_residuals), dtype=torch.float32), max_batch=2, max_seq_len=64)
    assert eng.graph_decoder is None and eng.cuda_graph_status() == {"enabled": False, "reason": "not a CUDA device"}
    qdec.attach(model, with_residuals, mode="cpu", k_chunk=8)  # capturable: the device is the only reason
    assert cgd.install(model, 4, 64) == (None, "the model is not on a CUDA device")
    qdec.detach(model)
    qdec.attach(model, with_residuals, mode="cpu", k_chunk=8, select="random")
    assert cgd.install(model, 4, 64)[1] == "QDEC selection 'random' runs on the host"
    qdec.detach(model)
    model.model.norm.register_forward_hook(lambda *a: None)
    assert cgd.install(model, 4, 64)[1] == "forward hooks on 1 modules: they run in Python once per call, not per replay"
    monkeypatch.setenv(cgd.ENV, "0")
    assert cgd.install(model, 4, 64)[1] == f"disabled ({cgd.ENV}=0)"


def test_static_step_with_qdec_matches_the_module_path(with_residuals) -> None:  # noqa: F811
    """QDEC's hooks inside the graph decoder's static step: the same greedy tokens as the module path with
    QDEC; the channels fetched are counted (on CUDA by the replays; tests/test_gpu_engine.py)."""
    def run(decode_graphs: bool) -> tuple[list[list[int]], int]:
        loaded = load_model(str(with_residuals), dtype=torch.float32)
        q = qdec.attach(loaded.model, with_residuals, mode="cpu", k_chunk=8)
        assert q.enabled, q.reason
        engine = Engine(loaded, max_batch=4, max_seq_len=64, decode_graphs=decode_graphs)
        assert (engine.graph_decoder is not None) == decode_graphs

        async def one(i: int) -> list[int]:
            req = GenerationRequest(f"r{i}", [5 + i, 9, 13, 7], SamplingParams(max_tokens=8, temperature=0.0,
                                                                                ignore_eos=True))
            return [t for ev in [e async for e in engine.generate(req)] for t in ev.token_ids]

        async def all_() -> list[list[int]]:
            engine.start()
            try:
                return list(await asyncio.gather(*[one(i) for i in range(3)]))
            finally:
                engine.shutdown()
        return asyncio.run(all_()), q.counters.channels

    plain, plain_channels = run(False)
    static, static_channels = run(True)
    assert static == plain and all(len(t) == 8 for t in plain)
    assert static_channels >= plain_channels > 0  # rows padding a batch to its bucket fetch too
