"""The engine on the real default model: batching, seeds, stops, cancellation, prompt log-probs."""
from __future__ import annotations

import asyncio

import pytest
import torch

from engine.engine import Engine
from engine.sequence import Sequence
from engine.types import EngineError, GenerationRequest, SamplingParams
from models.loader import load_model
from tests.chat_prompt import chat_ids


async def collect(engine: Engine, rid: str, ids: list[int], **kw):
    events = [ev async for ev in engine.generate(GenerationRequest(rid, ids, SamplingParams(**kw)))]
    return "".join(e.text for e in events), events


def run(coro):
    return asyncio.run(coro)


def test_greedy_answer_and_usage(engine):
    text, events = run(collect(engine, "a", chat_ids(engine, "What is the capital of France?"),
                               max_tokens=24, temperature=0.0))
    assert "Paris" in text
    last = events[-1]
    assert last.finish_reason in ("stop", "length")
    assert last.completion_tokens == sum(len(e.token_ids) for e in events)
    assert events[0].queue_wait_s is not None


def test_concurrent_seeded_requests_are_reproducible_and_batched(engine):
    ids = chat_ids(engine, "Write a sentence about the sea.")

    async def four():
        return await asyncio.gather(*[collect(engine, f"s{i}", ids, max_tokens=12, temperature=1.0, seed=i)
                                      for i in range(4)])

    first = run(four())
    again = run(collect(engine, "s2-again", ids, max_tokens=12, temperature=1.0, seed=2))
    assert again[0] == first[2][0]  # same seed alone == same seed in a batch of 4
    assert len({t for t, _ in first}) > 1


def test_stop_string_is_not_returned(engine):
    ids = engine.tokenizer.encode("1, 2, 3, 4, 5, 6,", add_special_tokens=False)
    free, _ = run(collect(engine, "free", ids, max_tokens=8, temperature=0.0))
    assert " 8" in free
    text, events = run(collect(engine, "stop", ids, max_tokens=8, temperature=0.0, stop=[" 8"]))
    assert events[-1].finish_reason == "stop"
    assert text == free[: free.index(" 8")]


def test_max_tokens_zero_returns_prompt_logprobs(engine):
    ids = engine.tokenizer.encode("The capital of France is Paris", add_special_tokens=False)
    _, events = run(collect(engine, "echo", ids, max_tokens=0, prompt_logprobs=2))
    lps = events[-1].prompt_logprobs
    assert len(lps) == len(ids) and lps[0] is None
    assert all(e.logprob <= 0 and len(e.top) == 2 for e in lps[1:])
    assert lps[-1].token_id == ids[-1]
    # " Paris" after "The capital of France is" is likely.
    assert lps[-1].logprob > -3.0


def test_prompt_too_long_is_refused(engine):
    with pytest.raises(EngineError, match="maximum context length"):
        run(collect(engine, "long", [1] * 250, max_tokens=10))


def test_cancel_frees_the_slot_within_a_step(engine):
    ids = chat_ids(engine, "Tell me a long story.")

    async def cancel_midway():
        gen = engine.generate(GenerationRequest("c", ids, SamplingParams(max_tokens=200, ignore_eos=True)))
        n = 0
        async for _ in gen:
            n += 1
            if n == 3:
                break
        await gen.aclose()
        for _ in range(100):
            if engine.stats()["running"] == 0:
                return True
            await asyncio.sleep(0.02)
        return False

    assert run(cancel_midway())


def test_weight_bytes_count_the_cpu_decode_copies(engine):
    """The fp32 model on CPU: the decode step turned every projection into an Fp16Linear (fbgemm fp16
    pack, fp32 weight dropped) and the lm_head: int8 where fbserve's CPU kernel runs (the embedded model's
    head is Q8_0: `cpu_int8` is a byte per weight and 4 per 32 for the scales, and the fp32 tied
    embedding / head is gone), else an fp16 copy beside the fp32 weight; `cpu_fp16` is 2 bytes per
    projection (and head) weight, `fp` (4 bytes each) the rest."""
    from cuda_ext.cpu_native import native_reason
    from engine.fp16_linear import Fp16Linear

    status = engine.cpu_decode_status()
    if status["dense_linears"] != "fbgemm-fp16":
        pytest.skip(f"no fbgemm here: {status}")
    model = engine.model
    projs = [m for m in model.model.layers.modules() if isinstance(m, Fp16Linear)]
    assert len(projs) == 7 * len(model.model.layers)
    wb = engine.weight_bytes()
    proj = sum(m.in_features * m.out_features for m in projs)
    head = model.config.vocab_size * model.config.hidden_size
    fp = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for name, b in model.named_buffers() if "kv_cache" not in name and "inv_freq" not in name)
    if native_reason() is None:  # the int8 head replaced the tied fp32 embedding / head: only the norms are fp
        assert status["lm_head"].endswith("-q8_0"), status
        assert wb["cpu_int8"] == head + head // 32 * 4 and wb["cpu_fp16"] == 2 * proj
        assert wb["fp"] == fp < 200_000  # 140,544: 61 norms of 576
    else:
        assert status["lm_head"] == "fbgemm-fp16" and wb["cpu_fp16"] == 2 * (proj + head)
        assert wb["fp"] == fp < 4 * (head + 100_000)  # no fp32 projection weights left


def test_cpu_threads_leave_decode_one_core_fewer(monkeypatch):
    from engine.engine import cpu_threads

    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert cpu_threads() == (4, 3)
    assert cpu_threads(threads=1) == (1, 1)
    assert cpu_threads(threads=8, decode_threads=2) == (8, 2)
    assert cpu_threads(team_step=True) == (4, 4)  # the native one-call step: its own team, all threads
    assert cpu_threads(threads=8, decode_threads=2, team_step=True) == (8, 2)
    with pytest.raises(ValueError, match=">= 1"):
        cpu_threads(decode_threads=0)
    with pytest.raises(ValueError, match=">= 1"):
        cpu_threads(threads=0)


def test_engine_switches_threads_between_prefill_and_decode(engine):
    threads = engine.cpu_decode_status()["threads"]
    assert threads == engine.threads and threads["decode"] == max(1, threads["prefill"] - 1)
    seen = []
    model = engine.model
    decode_fn = model.decode_fn  # the CPU decode step: record the thread count each step runs with

    def spy(*args):
        seen.append(torch.get_num_threads())
        return decode_fn(*args)

    prefilled = []

    def prefill_spy(*args):
        prefilled.append(torch.get_num_threads())
        return type(model).hidden_states(model, *args)

    sampled = []
    step = Sequence.step

    def sample_spy(self, *args):
        sampled.append(torch.get_num_threads())
        return step(self, *args)

    model.decode_fn, model.hidden_states, Sequence.step = spy, prefill_spy, sample_spy
    try:
        text, _ = run(collect(engine, "threads", chat_ids(engine, "Hi"), max_tokens=4, temperature=0.0))
    finally:
        model.decode_fn, Sequence.step = decode_fn, step
        del model.hidden_states
    assert prefilled == [threads["prefill"]]
    assert text and seen and all(n == threads["decode"] for n in seen)
    assert len(sampled) == 4 and all(n == threads["sample"] == 1 for n in sampled)  # no OpenMP team to wake


def test_kv_cache_is_fp16_on_cpu_by_default_and_can_be_chosen(engine):
    """auto: an fp32 model on a CPU keeps fp16 keys and values (half the bytes); float32 keeps them whole;
    both answer the same greedy question; /health's kv_cache block reports what was allocated."""
    from engine.engine import kv_cache_dtype_for

    cache = engine.model.model.layers[0].self_attn.kv_cache
    assert cache.k.dtype == torch.float16 and engine.kv_cache_status()["dtype"] == "float16"
    status = engine.kv_cache_status()
    assert status["bytes"] == engine.model.kv_cache_bytes() == 2 * cache.k.numel() * 2 * len(engine.model.model.layers)
    assert (status["slots"], status["max_seq_len"]) == (4, 256)
    full = Engine(load_model("default"), max_batch=1, max_seq_len=256, kv_cache_dtype="float32")
    assert full.kv_cache_status()["dtype"] == "float32" and full.kv_cache_status()["bytes"] == 2 * status["bytes"] // 4
    full.start()
    try:
        ids = chat_ids(engine, "Name three colours.")
        wide, _ = run(collect(full, "w", ids, max_tokens=16, temperature=0.0))
        narrow, _ = run(collect(engine, "n", ids, max_tokens=16, temperature=0.0))
        assert wide == narrow
    finally:
        full.shutdown()
    assert kv_cache_dtype_for("auto", torch.float16, torch.device("cuda")) == "float16"
    assert kv_cache_dtype_for("auto", torch.bfloat16, torch.device("cpu")) == "bfloat16"
    assert kv_cache_dtype_for("bfloat16", torch.float32, torch.device("cpu")) == "bfloat16"
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        kv_cache_dtype_for("fp8", torch.float32, torch.device("cpu"))


def test_penalties_reach_the_sampler(engine):
    """The tokens already seen go to the sampler only when a penalty asks for them: then they change the answer."""
    ids = chat_ids(engine, "Say the word hello ten times.")

    def tokens(**kw) -> list[int]:
        _, events = run(collect(engine, "pen", ids, max_tokens=24, temperature=0.0, ignore_eos=True, **kw))
        return [t for e in events for t in e.token_ids]

    plain = tokens()
    for penalty in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"repetition_penalty": 2.0}):
        penalized = tokens(**penalty)
        assert penalized != plain, penalty
        most = max(penalized.count(t) for t in penalized)
        assert most < max(plain.count(t) for t in plain), (penalty, most)
