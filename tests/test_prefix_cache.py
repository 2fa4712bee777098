"""Prefix reuse: which slot a prompt takes and how much it reuses, and that reuse leaves the answers as they were."""
from __future__ import annotations

import asyncio

import pytest

from engine.engine import Engine
from engine.prefix_cache import SlotPool, common_prefix_length
from engine.types import GenerationRequest, SamplingParams
from models.loader import load_model


@pytest.mark.parametrize("a, b, n", [([], [1], 0), ([1, 2, 3], [1, 2, 3], 3), ([1, 2, 3], [1, 2], 2),
                                     ([1, 2, 3], [1, 5, 3], 1), ([4], [1], 0),
                                     (list(range(999)), list(range(998)) + [0], 998)])
def test_common_prefix_length(a, b, n):
    assert common_prefix_length(a, b) == n == common_prefix_length(b, a)


def test_pool_takes_the_slot_with_the_longest_shared_prefix():
    pool = SlotPool(3)
    slots = [pool.acquire([9])[0] for _ in range(3)]
    assert slots == [0, 1, 2] and len(pool) == 0  # empty slots, lowest first
    pool.release(0, [1, 2, 3, 4])
    pool.release(1, [1, 2, 7])
    pool.release(2, [5, 6])
    assert pool.acquire([5, 6, 8]) == (2, 2, None)  # slot 2 holds a prefix of the prompt: the next turn
    # slot 0 shares [1, 2, 3] of what it holds and is the least recently released: given up, its prefix reused
    assert pool.acquire([1, 2, 3, 9, 9]) == (0, 3, None)
    assert pool.status() == {"enabled": True, "held_tokens": 3, "queried_tokens": 11, "hit_tokens": 5}


def test_chats_sharing_a_system_prompt_keep_each_other_s_history():
    system = list(range(100, 124))  # every chat of a template starts with the same system prompt
    pool = SlotPool(3)
    slot_a, _, _ = pool.acquire(system + [1, 2, 3])
    pool.release(slot_a, system + [1, 2, 3, 4, 5, 6])  # chat A: prompt and reply
    slot_b, reused, source = pool.acquire(system + [7, 8, 9])  # chat B shares only the system prompt
    assert slot_b != slot_a and (reused, source) == (len(system), slot_a)
    pool.release(slot_b, system + [7, 8, 9, 10])
    assert pool.acquire(system + [1, 2, 3, 4, 5, 6, 11]) == (slot_a, len(system) + 6, None)  # A's next turn


def test_pool_always_computes_the_last_prompt_token_and_honours_no_reuse():
    pool = SlotPool(1)
    slot = pool.acquire([1])[0]
    pool.release(slot, [1, 2, 3])
    assert pool.acquire([1, 2, 3]) == (0, 2, None)  # the whole prompt is held, its last token is computed again
    pool.release(0, [1, 2, 3])
    assert pool.acquire([1, 2, 3, 4], reusable=False) == (0, 0, None)  # e.g. prompt log-probs: every position needed
    pool.release(0, [1, 2, 3])
    off = SlotPool(1, reuse=False)
    off.release(off.acquire([1])[0], [1, 2])
    assert off.acquire([1, 2, 3]) == (0, 0, None) and off.status()["enabled"] is False


def test_pool_without_a_match_takes_an_empty_slot_then_the_least_recently_released():
    pool = SlotPool(3)
    for _ in range(3):
        pool.acquire([0])
    pool.release(2, [2])
    pool.release(0, [])  # a failed step: holds nothing
    pool.release(1, [1])
    assert pool.acquire([7])[0] == 0  # empty first
    pool.release(0, [0])
    assert pool.acquire([7])[0] == 2  # then released longest ago
    with pytest.raises(RuntimeError, match="twice"):
        pool.release(1, [])


def test_pool_reuses_nothing_below_a_quarter_of_the_prompt():
    pool = SlotPool(2)
    for _ in range(2):
        pool.acquire([0])
    pool.release(1, [7])
    conversation = [1, 2, 3] + list(range(100, 120))
    pool.release(0, conversation)
    other = [1, 2, 3] + list(range(200, 210))  # shares 3 of 13 tokens (< 1/4): a fresh prefill is faster
    assert pool.acquire(other) == (1, 0, None)  # the least recently released slot, from position 0
    assert pool.status()["hit_tokens"] == 0
    pool.release(1, other)
    assert pool.acquire(conversation + [5]) == (0, len(conversation), None)


def test_pool_copies_from_a_running_slot_when_it_shares_more():
    pool = SlotPool(3)
    for _ in range(3):
        pool.acquire([0])
    pool.release(1, [1, 2])
    pool.release(2, [])
    running = {0: [1, 2, 3, 4]}  # e.g. the first choice of an n = 2 request, prefilled a moment ago
    assert pool.acquire([1, 2, 3, 4, 5], running=running) == (2, 4, 0)  # an empty slot, filled from slot 0
    assert pool.acquire([1, 2, 9], running=running) == (1, 2, None)  # a tie keeps the slot's own copy


@pytest.fixture(scope="module")
def engines():
    cached = Engine(load_model("default"), max_batch=2, max_seq_len=512)
    plain = Engine(load_model("default"), max_batch=2, max_seq_len=512, prefix_caching=False)
    cached.start()
    plain.start()
    yield cached, plain
    cached.shutdown()
    plain.shutdown()


def generate(engine: Engine, rid: str, ids: list[int], **params):
    async def run():
        return [ev async for ev in engine.generate(GenerationRequest(rid, ids, SamplingParams(**params)))]
    events = asyncio.run(run())
    return "".join(e.text for e in events), [t for e in events for t in e.token_ids], events


def chat_ids(engine: Engine, messages: list[dict[str, str]]) -> list[int]:
    out = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if not isinstance(out, list) else out)


def test_a_prompt_extending_a_prefilled_one_reuses_it_with_the_same_logits(engines):
    cached, plain = engines
    prefix = cached.tokenizer.encode("The history of the Roman Empire spans many centuries, and",
                                     add_special_tokens=False)
    generate(cached, "warm", prefix, max_tokens=1, temperature=0.0)  # the slot now holds the prefix
    longer = prefix + cached.tokenizer.encode(" its emperors ruled from", add_special_tokens=False)
    before = cached.stats()["prefix_cache_hit_tokens"]
    text, ids, events = generate(cached, "reuse", longer, max_tokens=8, temperature=0.0, logprobs=5)
    assert events[0].cached_tokens == len(prefix)
    assert cached.stats()["prefix_cache_hit_tokens"] - before == len(prefix)
    ref_text, ref_ids, ref_events = generate(plain, "full", longer, max_tokens=8, temperature=0.0, logprobs=5)
    assert ref_events[0].cached_tokens == 0
    assert ids == ref_ids and text == ref_text
    for got, want in zip(events[0].logprobs[0].top.items(), ref_events[0].logprobs[0].top.items()):
        assert got[0] == want[0] and abs(got[1] - want[1]) < 1e-3  # the keys it reused were computed alike


def test_concurrent_requests_with_one_prompt_copy_its_keys_instead_of_computing_them(engines):
    cached, plain = engines
    ids = cached.tokenizer.encode("Three things every traveller should pack are", add_special_tokens=False)

    async def both():
        async def one(rid):
            params = SamplingParams(max_tokens=6, temperature=0.0, logprobs=3)
            return [ev async for ev in cached.generate(GenerationRequest(rid, ids, params))]
        return await asyncio.gather(one("twin-a"), one("twin-b"))

    a, b = asyncio.run(both())
    assert sorted([a[0].cached_tokens, b[0].cached_tokens]) == [0, len(ids) - 1]
    assert [t for e in a for t in e.token_ids] == [t for e in b for t in e.token_ids]
    _, ref_ids, ref = generate(plain, "twin-ref", ids, max_tokens=6, temperature=0.0, logprobs=3)
    for events in (a, b):
        assert [t for e in events for t in e.token_ids] == ref_ids
        assert abs(events[0].logprobs[0].logprob - ref[0].logprobs[0].logprob) < 1e-3


def test_the_next_chat_turn_reuses_the_history_and_the_reply(engines):
    cached, plain = engines
    turn1 = [{"role": "user", "content": "Name a planet in the solar system."}]
    ids1 = chat_ids(cached, turn1)
    reply, reply_ids, _ = generate(cached, "turn1", ids1, max_tokens=20, temperature=0.0)
    turn2 = turn1 + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And a moon of it?"}]
    ids2 = chat_ids(cached, turn2)
    text, ids, events = generate(cached, "turn2", ids2, max_tokens=12, temperature=0.0, logprobs=3)
    # The slot held the first prompt and the reply but its last token; the template re-tokenizes the reply.
    assert len(ids1) <= events[0].cached_tokens <= len(ids1) + len(reply_ids) - 1
    ref_text, ref_ids, ref_events = generate(plain, "turn2-full", ids2, max_tokens=12, temperature=0.0, logprobs=3)
    # Keys of the reply were computed by decode steps, the reference's by one prefill: close, not bit-equal.
    first, ref_first = events[0].logprobs[0], ref_events[0].logprobs[0]
    assert first.token_id == ref_first.token_id and abs(first.logprob - ref_first.logprob) < 0.05
    assert ids[:4] == ref_ids[:4]


def test_a_second_chat_copies_the_shared_system_prompt_and_the_first_keeps_its_history(engines):
    cached, plain = engines
    chat_a = [{"role": "user", "content": "Which ocean is the largest?"}]
    _, _, _ = generate(cached, "a1", chat_ids(cached, chat_a), max_tokens=10, temperature=0.0)
    chat_b = [{"role": "user", "content": "Spell the word cat backwards."}]
    ids_b = chat_ids(cached, chat_b)
    text_b, _, events_b = generate(cached, "b1", ids_b, max_tokens=10, temperature=0.0)
    shared = common_prefix_length(chat_ids(cached, chat_a), ids_b)  # the template's system prompt and more
    assert events_b[0].cached_tokens == shared > 0
    assert text_b == generate(plain, "b1-full", ids_b, max_tokens=10, temperature=0.0)[0]
    reply_a = generate(plain, "a1-text", chat_ids(cached, chat_a), max_tokens=10, temperature=0.0)[0]
    ids_a2 = chat_ids(cached, chat_a + [{"role": "assistant", "content": reply_a},
                                        {"role": "user", "content": "And the smallest?"}])
    assert generate(cached, "a2", ids_a2, max_tokens=1, temperature=0.0)[2][0].cached_tokens > shared


def test_prompt_logprobs_and_a_disabled_cache_reuse_nothing(engines):
    cached, plain = engines
    ids = cached.tokenizer.encode("Water boils at one hundred degrees", add_special_tokens=False)
    generate(cached, "warm-lp", ids, max_tokens=1, temperature=0.0)
    _, _, events = generate(cached, "lp", ids + ids[:3], max_tokens=0, prompt_logprobs=1)
    assert events[0].cached_tokens == 0 and len(events[-1].prompt_logprobs) == len(ids) + 3
    generate(plain, "warm-off", ids, max_tokens=1, temperature=0.0)
    assert generate(plain, "off", ids + ids[:3], max_tokens=1, temperature=0.0)[2][0].cached_tokens == 0
    assert plain.prefix_cache_status()["enabled"] is False and plain.stats()["prefix_cache_hit_tokens"] == 0


def test_a_failed_prefill_leaves_nothing_to_reuse(engines, monkeypatch):
    cached, _ = engines
    ids = cached.tokenizer.encode("A sentence that will fail half way through its prefill", add_special_tokens=False)
    generate(cached, "warm-fail", ids, max_tokens=1, temperature=0.0)

    def broken(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(cached.model, "hidden_states", broken)
    _, _, events = generate(cached, "fail", ids + [11], max_tokens=4, temperature=0.0)
    assert events[-1].finish_reason == "error" and "injected" in events[-1].error
    monkeypatch.undo()
    _, _, events = generate(cached, "after", ids + [11], max_tokens=1, temperature=0.0)
    assert events[0].cached_tokens == 0  # the failed request's slot was emptied; the other slot never held ids
