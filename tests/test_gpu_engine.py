"""Graphed decode on a real CUDA GPU (engine.cuda_graph_decode): capture, replay with new inputs, and the
Engine serving through it. Skipped without CUDA (CI has none); `bash bench/gpu_session.sh` runs it.
The CPU half (static step, padding, scratch slot, declines) is tests/test_cuda_graph_decode.py."""
from __future__ import annotations

import asyncio

import pytest
import torch

from tests.gpu_support import DEV, GPU_MARKS, cuda_only_mark, record  # first: it sets TRITON_INTERPRET without CUDA
from tests.test_qdec_residuals import with_residuals  # noqa: E402,F401  (module fixture)
from tests.test_quant_checkpoint import quantized, tiny_model  # noqa: E402,F401

pytestmark = GPU_MARKS
cuda_only = cuda_only_mark("CUDA graphs")


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_replayed_steps_match_the_module_path(quantized, dtype):  # noqa: F811
    from engine.cuda_graph_decode import GraphDecoder
    from models.loader import load_model

    model = load_model(str(quantized), device=DEV, dtype=dtype).model
    ref = load_model(str(quantized), device=DEV, dtype=dtype).model
    dec = GraphDecoder(model, max_batch=4, max_seq_len=160, capture=True)
    ref.setup_cache(5, 160)
    lengths = {0: 5, 1: 7, 2: 140, 3: 3}
    with torch.inference_mode():
        for m in (model, ref):
            for slot, n in lengths.items():
                toks = torch.randint(3, 60, (1, n), generator=torch.Generator().manual_seed(slot)).to(DEV)
                m.hidden_states(toks, torch.arange(n, device=DEV)[None], torch.tensor([slot], device=DEV))
        g = torch.Generator().manual_seed(0)
        for step, slots in enumerate(([3], [0, 3], [3, 0, 2], [3], [0, 3], [3, 0, 2])):  # 3 graphs, each replayed
            toks = torch.randint(3, 60, (len(slots),), generator=g).tolist()
            pos = [lengths[s] for s in slots]
            got = dec.step(toks, pos, slots)
            want = ref(torch.tensor(toks, device=DEV)[:, None], torch.tensor(pos, device=DEV)[:, None],
                       torch.tensor(slots, device=DEV), last_only=True)[:, 0].cpu()
            err = float((got - want).abs().max() / want.abs().max())
            record("cuda_graph_step", dtype=dtype, step=step, batch=len(slots), rel_err=err)
            assert err < 2e-2, (step, err)
            for s in slots:
                lengths[s] += 1
    st = dec.status()
    assert st["enabled"] and st["replays"] == 6 and len(st["captured"]) >= 3, st


@cuda_only
def test_engine_serves_through_graphs(quantized):  # noqa: F811
    from engine.engine import Engine
    from engine.types import GenerationRequest, SamplingParams
    from models.loader import load_model

    eng = Engine(load_model(str(quantized), device=DEV), max_batch=4, max_seq_len=64)
    assert eng.graph_decoder is not None, eng.cuda_graph_status()

    async def one(i: int) -> list:
        req = GenerationRequest(f"r{i}", [5 + i, 9, 13, 7], SamplingParams(max_tokens=12, temperature=0.0,
                                                                            ignore_eos=True))
        return [e async for e in eng.generate(req)]

    async def all_():
        return await asyncio.gather(*[one(i) for i in range(3)])

    eng.start()
    try:
        runs = asyncio.run(all_())
    finally:
        eng.shutdown()
    assert all(r[-1].finish_reason == "length" and r[-1].completion_tokens == 12 for r in runs)
    st = eng.cuda_graph_status()
    record("cuda_graph_engine", **st)
    assert st["enabled"] and st["replays"] > 0, st
    merged = eng.merged_projections_status()  # engine.merge on CUDA: q/k/v and gate/up one layer each
    record("merged_projections_engine", **merged)
    assert merged == {"enabled": True, "qkv": 2, "gate_up": 2}, merged


@cuda_only
def test_prefix_reuse_through_graphs_matches_an_engine_without_it(quantized):  # noqa: F811
    """A follow-up prompt reuses what graphed decode steps wrote into the slot (and a twin request copies a
    running slot's prefix on the GPU); the greedy tokens equal those of an engine that prefills everything."""
    from engine.engine import Engine
    from engine.types import GenerationRequest, SamplingParams
    from models.loader import load_model

    def tokens(eng: Engine, rid: str, ids: list[int], twins: int = 1) -> list[tuple[int, list[int]]]:
        async def one(i: int) -> tuple[int, list[int]]:
            params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
            events = [e async for e in eng.generate(GenerationRequest(f"{rid}-{i}", ids, params))]
            return events[0].cached_tokens, [t for e in events for t in e.token_ids]

        async def all_():
            return await asyncio.gather(*[one(i) for i in range(twins)])
        return asyncio.run(all_())

    cached = Engine(load_model(str(quantized), device=DEV), max_batch=4, max_seq_len=64)
    plain = Engine(load_model(str(quantized), device=DEV), max_batch=4, max_seq_len=64, prefix_caching=False)
    for eng in (cached, plain):
        eng.start()
    try:
        first = [5, 9, 13, 7, 21, 4]
        (_, reply), = tokens(cached, "turn1", first)
        follow = first + reply + [11, 12]
        (hit, got), = tokens(cached, "turn2", follow)
        (_, want), = tokens(plain, "turn2", follow)
        twins = tokens(cached, "twin", [30, 31, 32, 33, 34, 35, 36], twins=2)
    finally:
        for eng in (cached, plain):
            eng.shutdown()
    record("prefix_cache_cuda", reused=hit, prompt=len(follow), twins=[h for h, _ in twins])
    assert hit == len(first) + len(reply) - 1 and got == want
    assert sorted(h for h, _ in twins) == [0, 6] and twins[0][1] == twins[1][1]
    assert cached.cuda_graph_status()["replays"] > 0


@cuda_only
def test_merged_projections_match_the_layers_apart(quantized):  # noqa: F811
    """engine.merge compiled on the GPU: the model's logits merged vs apart (fp16)."""
    from engine.merge import merge_projections
    from models.loader import load_model

    apart = load_model(str(quantized), device=DEV, dtype=torch.float16).model
    merged = load_model(str(quantized), device=DEV, dtype=torch.float16).model
    assert merge_projections(merged)["enabled"]
    tokens = torch.randint(3, 60, (2, 12), generator=torch.Generator().manual_seed(0)).to(DEV)
    with torch.inference_mode():
        want, got = apart(tokens).float(), merged(tokens).float()
    err = float((got - want).abs().mean() / want.abs().mean())
    record("merged_projections_logits", rel_err=err)
    assert err < 1e-2, err


@cuda_only
def test_graphed_decode_with_qdec_matches_eager(with_residuals):  # noqa: F811
    """QDEC's hooks (fused selection + zero-copy gather on the side stream) captured in the decode graph:
    replays match the eager module path with QDEC, differ from the model without it, and the counters
    advance by the channels each replay fetched."""
    from cuda_ext.qdec_reference import selected_count
    from engine import qdec
    from engine.cuda_graph_decode import install
    from models.loader import load_model

    k_chunk = 64
    graphed = load_model(str(with_residuals), device=DEV, dtype=torch.float16).model
    eager = load_model(str(with_residuals), device=DEV, dtype=torch.float16).model
    plain = load_model(str(with_residuals), device=DEV, dtype=torch.float16).model
    q = qdec.attach(graphed, with_residuals, mode="cpu", k_chunk=k_chunk)
    qdec.attach(eager, with_residuals, mode="cpu", k_chunk=k_chunk)
    assert q.enabled and q.select == "approx", (q.reason, q.select)
    dec, why = install(graphed, max_batch=2, max_seq_len=128)
    assert dec is not None, why
    per_row = sum(selected_count(layer.rcodes.shape[0], k_chunk) for layer in q.layers.values())
    for m in (eager, plain):
        m.setup_cache(3, 128)
    toks = torch.randint(3, 60, (1, 9), generator=torch.Generator().manual_seed(1)).to(DEV)
    with torch.inference_mode():
        for m in (graphed, eager, plain):
            m.hidden_states(toks, torch.arange(9, device=DEV)[None], torch.tensor([0], device=DEV))
        g = torch.Generator().manual_seed(2)
        for step in range(4):
            tok, pos = int(torch.randint(3, 60, (1,), generator=g)), 9 + step
            before = q.counters.channels
            got = dec.step([tok], [pos], [0])
            assert q.counters.channels - before == per_row, (step, q.counters.channels - before, per_row)
            args = (torch.tensor([[tok]], device=DEV), torch.tensor([[pos]], device=DEV), torch.tensor([0], device=DEV))
            want = eager(*args, last_only=True)[:, 0].float().cpu()
            base = plain(*args, last_only=True)[:, 0].float().cpu()
            err = float((got - want).abs().max() / want.abs().max())
            moved = float((base - want).abs().max() / want.abs().max())
            record("cuda_graph_qdec_step", step=step, rel_err=err, qdec_moves_logits=moved)
            assert err < 2e-2 and err < moved, (step, err, moved)
    assert dec.status()["replays"] == 4 and dec.status()["enabled"]
