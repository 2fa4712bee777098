"""Prompts prefilled in chunks (Engine(prefill_chunk=...)): the same answers and prompt log-probs as one call,
decode steps of the running requests between the chunks, and a request cancelled mid-prompt leaves cleanly."""
from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest

from engine.engine import Engine
from engine.sequence import Sequence
from engine.types import GenerationRequest, SamplingParams
from models.loader import load_model

CHUNK = 16
TEXT = ("The history of the city begins in the year 1200, when a small group of farmers settled on the banks of "
        "the river. Over the following centuries the settlement grew into a market town, then into a city with "
        "walls, churches and a university. Today it is known for")


@pytest.fixture(scope="module")
def engines():
    """Two engines on fp32 caches (keys read back from the cache are then exact): whole prompts, and chunks."""
    whole = Engine(load_model("default"), max_batch=2, max_seq_len=256, kv_cache_dtype="float32")
    chunked = Engine(load_model("default"), max_batch=2, max_seq_len=256, kv_cache_dtype="float32",
                     prefill_chunk=CHUNK)
    whole.start()
    chunked.start()
    yield whole, chunked
    whole.shutdown()
    chunked.shutdown()


def _ids(engine: Engine, lead: str = "") -> list[int]:
    """The prompt's tokens; a different `lead` word gives a prompt no slot holds a prefix of."""
    ids = engine.tokenizer.encode(lead + TEXT, add_special_tokens=False)
    assert len(ids) > 3 * CHUNK
    return ids


async def _collect(engine: Engine, rid: str, ids: list[int], **kw):
    return [ev async for ev in engine.generate(GenerationRequest(rid, ids, SamplingParams(**kw)))]


def test_chunked_prompt_gives_the_same_answer_and_prompt_logprobs(engines):
    whole, chunked = engines
    ids = _ids(whole)
    kw = dict(max_tokens=12, temperature=0.0, logprobs=2, prompt_logprobs=1)
    a = asyncio.run(_collect(whole, "w", ids, **kw))
    b = asyncio.run(_collect(chunked, "c", ids, **kw))
    assert "".join(e.text for e in a) == "".join(e.text for e in b)
    for x, y in zip(a, b):
        for p, q in zip(x.logprobs or [], y.logprobs or []):
            assert p.token_id == q.token_id and p.logprob == pytest.approx(q.logprob, abs=2e-3)
    pa, pb = a[0].prompt_logprobs, b[0].prompt_logprobs
    assert len(pa) == len(pb) == len(ids) and pa[0] is None and pb[0] is None
    for p, q in zip(pa[1:], pb[1:]):
        assert p.token_id == q.token_id and p.logprob == pytest.approx(q.logprob, abs=2e-3)
        assert p.top.keys() == q.top.keys()
    # prompt log-probs only (max_tokens 0) across chunk boundaries too
    (only,) = asyncio.run(_collect(chunked, "p", ids[:2 * CHUNK + 1], max_tokens=0, prompt_logprobs=0))
    assert only.finish_reason == "length" and len(only.prompt_logprobs) == 2 * CHUNK + 1
    assert [p.token_id for p in only.prompt_logprobs[1:]] == ids[1:2 * CHUNK + 1]


def test_running_requests_decode_between_the_chunks_of_a_new_prompt(engines, monkeypatch):
    _, chunked = engines
    ids = _ids(chunked, "Briefly: ")
    calls: list[str] = []
    prefill, decode = chunked._prefill_chunk, chunked._decode_step
    monkeypatch.setattr(chunked, "_prefill_chunk", lambda seq: (calls.append(seq.request_id), prefill(seq))[1])
    monkeypatch.setattr(chunked, "_decode_step", lambda: (calls.append("step"), decode())[1])

    async def both():
        first = asyncio.get_running_loop().create_future()

        async def runner():
            out = []
            async for ev in chunked.generate(GenerationRequest("run", ids[:8], SamplingParams(
                    max_tokens=60, temperature=0.0, ignore_eos=True))):
                out.append(ev)
                if not first.done():
                    first.set_result(None)
            return out

        task = asyncio.create_task(runner())
        await first
        late = await _collect(chunked, "late", ids, max_tokens=2, temperature=0.0)
        return await task, late

    run_events, late = asyncio.run(both())
    assert len(run_events) == 60 and late[-1].finish_reason == "length"
    late_chunks = [i for i, c in enumerate(calls) if c == "late"]
    assert len(late_chunks) == -(-len(ids) // CHUNK)
    # each chunk after the first waits for one decode step of the running request
    for before, after in zip(late_chunks, late_chunks[1:]):
        assert calls[before + 1:after] == ["step"], calls[before:after + 1]


def test_a_short_prompt_arriving_during_a_long_prefill_goes_first(engines, monkeypatch):
    _, chunked = engines
    long_ids, short_ids = _ids(chunked, "Long: "), chunked.tokenizer.encode("Short: hello", add_special_tokens=False)
    calls: list[str] = []
    prefill = chunked._prefill_chunk
    started = threading.Event()

    def slow_long(seq):  # the long prompt's chunks take a while: the short one arrives after its first
        calls.append(seq.request_id)
        prefill(seq)
        if seq.request_id == "long":
            started.set()
            time.sleep(0.05)

    monkeypatch.setattr(chunked, "_prefill_chunk", slow_long)

    async def both():
        stamps: dict[str, float] = {}

        async def first_token(rid, ids):
            async for _ in chunked.generate(GenerationRequest(rid, ids, SamplingParams(max_tokens=1))):
                stamps[rid] = asyncio.get_running_loop().time()

        long_task = asyncio.create_task(first_token("long", long_ids))
        await asyncio.to_thread(started.wait, 10)
        await first_token("short", short_ids)
        await long_task
        return stamps

    stamps = asyncio.run(both())
    n_long = -(-len(long_ids) // CHUNK)
    assert calls.count("long") == n_long and calls.count("short") == 1
    assert calls.index("short") < n_long  # before the long prompt's last chunk, though admitted after it
    assert stamps["short"] < stamps["long"]


def test_a_prompt_waits_for_a_prefill_it_would_copy(engines):
    """An identical prompt (an `n` > 1 request's other choices) waits until the first is prefilled, to copy its
    keys; a prompt that would reuse less than the prefix cache's minimum does not wait."""
    tok = engines[0].tokenizer

    def seq(ids, prefilled=0):
        s = Sequence(GenerationRequest("r", ids, SamplingParams()), lambda ev: None, set(), tok)
        s.prefilled = prefilled
        return s

    ids = list(range(100, 164))
    state = SimpleNamespace(_prefilling=[seq(ids, prefilled=CHUNK)], _slots=SimpleNamespace(reuse=True))
    assert Engine._awaits_a_prefill(state, seq(ids))  # 63 of 64 tokens to copy, 16 done so far
    echo = Sequence(GenerationRequest("e", ids, SamplingParams(prompt_logprobs=0)), lambda ev: None, set(), tok)
    assert not Engine._awaits_a_prefill(state, echo)  # wants every prompt position: copies nothing
    assert not Engine._awaits_a_prefill(SimpleNamespace(_prefilling=state._prefilling,
                                                        _slots=SimpleNamespace(reuse=False)), seq(ids))
    state._prefilling[0].prefilled = len(ids)
    assert not Engine._awaits_a_prefill(state, seq(ids))  # done: admitted, copies them
    state._prefilling[0].prefilled = 0
    assert not Engine._awaits_a_prefill(state, seq(ids[:10] + list(range(1000, 1054))))  # 10 of 64 < 1/4
    assert Engine._awaits_a_prefill(state, seq(ids[:20] + list(range(1000, 1044))))  # 20 of 64 >= 1/4
    assert not Engine._awaits_a_prefill(SimpleNamespace(_prefilling=[], _slots=state._slots), seq(ids))


def test_a_request_cancelled_mid_prompt_frees_its_slot(engines, monkeypatch):
    _, chunked = engines
    ids = _ids(chunked, "Cancelled: ")
    prefill = chunked._prefill_chunk
    chunks: list[int] = []
    used: list[float] = []

    def cancel_after_two(seq):
        prefill(seq)
        if seq.request_id == "cancel":
            chunks.append(seq.prefilled)
            used.append(chunked.stats()["kv_cache_used_ratio"] * 2 * 256)  # 2 slots x 256 tokens
            if seq.prefilled == 2 * CHUNK:
                chunked.cancel("cancel")

    monkeypatch.setattr(chunked, "_prefill_chunk", cancel_after_two)

    async def cancelled():
        agen = chunked.generate(GenerationRequest("cancel", ids, SamplingParams(max_tokens=4, temperature=0.0)))
        try:
            await asyncio.wait_for(agen.__anext__(), timeout=1.0)
        except asyncio.TimeoutError:
            pass
        finally:
            await agen.aclose()

    asyncio.run(cancelled())
    for _ in range(100):  # the worker drops it at its next turn
        if not chunked._running and not chunked._prefilling:
            break
        asyncio.run(asyncio.sleep(0.02))
    assert not chunked._running and not chunked._prefilling and len(chunked._slots) == 2
    assert chunks == [CHUNK, 2 * CHUNK]  # stopped within a chunk of the cancel, though nothing else ran
    assert used == pytest.approx(chunks)  # the cache in use counts the prompt prefilled so far
    # the engine still answers, the same as before
    text = "".join(e.text for e in asyncio.run(_collect(chunked, "after", ids, max_tokens=6, temperature=0.0)))
    assert text


def test_fed_ids_of_a_prompt_part_way_through_its_prefill(engines):
    seq = Sequence(GenerationRequest("r", [5, 6, 7, 8], SamplingParams()), lambda ev: None, set(),
                   engines[0].tokenizer)
    seq.prefilled = 2
    assert seq.fed_ids() == [5, 6]
    seq.prefilled = 4
    seq.output_ids = [9]
    assert seq.fed_ids() == [5, 6, 7, 8]
    seq.output_ids = [9, 10]
    assert seq.fed_ids() == [5, 6, 7, 8, 9]


def test_prefill_chunk_must_be_positive(engines):
    with pytest.raises(ValueError, match="prefill_chunk"):
        Engine(engines[0].loaded, max_batch=1, max_seq_len=64, prefill_chunk=0)
