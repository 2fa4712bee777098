"""Structured outputs and logit_bias on the real default model: JSON that parses and follows its schema,
whatever the sampling; constraints that stay with their own request; schemas the compiler refuses."""
from __future__ import annotations

import asyncio
import json

import pytest
import torch

from engine.engine import Engine
from engine.types import EngineError, GenerationRequest, SamplingParams, StructuredOutput
from tests.chat_prompt import chat_ids

PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer"},
                         "city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]}},
          "required": ["name", "age", "city"], "additionalProperties": False}
ASK_PERSON = "Describe a person as JSON with a name, an age and a city."
ASK_FRANCE = "What is the capital of France?"


async def collect(engine: Engine, rid: str, text: str, **kw) -> tuple[str, str, list[int]]:
    events = [ev async for ev in engine.generate(GenerationRequest(rid, chat_ids(engine, text), SamplingParams(**kw)))]
    return "".join(e.text for e in events), events[-1].finish_reason, [t for e in events for t in e.token_ids]


def run(coro):
    return asyncio.run(coro)


def test_the_mask_allows_only_what_the_grammar_allows(engine):
    constraint = engine.grammars.constraint(StructuredOutput("json_object"))
    logits = torch.zeros(engine.model.config.vocab_size)
    constraint.mask(logits)
    allowed = torch.nonzero(logits == 0).flatten().tolist()
    assert allowed and torch.isinf(logits).sum() == logits.numel() - len(allowed)
    assert all(engine.tokenizer.decode([t]).startswith("{") for t in allowed)  # an object opens first
    with pytest.raises(RuntimeError, match="forbids"):
        constraint.accept(engine.tokenizer.encode("Paris", add_special_tokens=False)[0])


def test_json_object_turns_a_prose_answer_into_a_json_object(engine):
    prose, _, _ = run(collect(engine, "p", ASK_FRANCE, max_tokens=24, temperature=0.0))
    with pytest.raises(json.JSONDecodeError):
        json.loads(prose)  # unconstrained, the model answers in prose
    text, reason, _ = run(collect(engine, "j", ASK_FRANCE, max_tokens=64, temperature=0.0,
                                  structured=StructuredOutput("json_object")))
    assert reason == "stop", text  # the object closed, then the end-of-sequence token
    assert isinstance(json.loads(text), dict), text
    assert "\n" not in text  # compact: no whitespace beyond the separators


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sampled_answers_follow_the_schema_in_its_property_order(engine, seed):
    spec = StructuredOutput("json_schema", json.dumps(PERSON))
    text, reason, _ = run(collect(engine, f"s{seed}", ASK_PERSON, max_tokens=64, temperature=1.0, seed=seed,
                                  top_p=0.95, structured=spec))
    assert reason == "stop", text
    person = json.loads(text)
    assert list(person) == ["name", "age", "city"], text
    assert isinstance(person["name"], str) and len(person["name"]) <= 24
    assert isinstance(person["age"], int) and person["city"] in ("Paris", "London", "Tokyo")


def test_a_constraint_stays_with_its_own_request(engine):
    spec = StructuredOutput("json_schema", json.dumps(PERSON))
    alone = run(collect(engine, "a", ASK_FRANCE, max_tokens=16, temperature=0.0))[0]

    async def together():
        return await asyncio.gather(collect(engine, "b", ASK_FRANCE, max_tokens=16, temperature=0.0),
                                    collect(engine, "c", ASK_PERSON, max_tokens=64, temperature=0.0, structured=spec))

    plain, constrained = run(together())
    assert plain[0] == alone  # the batch neighbour's grammar does not mask this row
    assert list(json.loads(constrained[0])) == ["name", "age", "city"]


def test_ignore_eos_still_ends_a_complete_json_answer(engine):
    text, reason, tokens = run(collect(engine, "e", ASK_FRANCE, max_tokens=64, temperature=0.0, ignore_eos=True,
                                       structured=StructuredOutput("json_object")))
    assert reason == "stop" and isinstance(json.loads(text), dict)
    assert len(tokens) < 64


def test_a_schema_the_compiler_cannot_use_is_refused_with_its_reason(engine):
    spec = StructuredOutput("json_schema", json.dumps({"$ref": "#/definitions/missing"}))
    with pytest.raises(EngineError) as err:
        run(collect(engine, "r", ASK_FRANCE, max_tokens=8, structured=spec))
    assert err.value.param == "response_format"
    assert "cannot be used" in str(err.value) and "missing" in str(err.value) and ".cc:" not in str(err.value)
    assert engine.structured_outputs_status()["loaded"]


def test_logit_bias_bans_and_forces_tokens(engine):
    _, _, greedy = run(collect(engine, "g", ASK_FRANCE, max_tokens=4, temperature=0.0))
    _, _, banned = run(collect(engine, "n", ASK_FRANCE, max_tokens=4, temperature=0.0,
                               logit_bias={greedy[0]: -100.0}))
    assert banned[0] != greedy[0]
    forced = engine.tokenizer.encode(" Lyon", add_special_tokens=False)[0]
    _, _, tokens = run(collect(engine, "f", ASK_FRANCE, max_tokens=3, temperature=1.0, seed=0,
                               logit_bias={forced: 100.0}))
    assert tokens == [forced] * 3
    with pytest.raises(EngineError) as err:
        run(collect(engine, "v", ASK_FRANCE, max_tokens=2, logit_bias={10**6: 1.0}))
    assert err.value.param == "logit_bias"


class DeadEndAfter:
    """A constraint whose grammar allows `n` tokens and then none: only that request may fail."""

    def __init__(self, n: int) -> None:
        self.left = n
        self.terminated = False

    def mask(self, logits):
        if self.left == 0:
            raise RuntimeError("the response format's grammar allows no next token")
        self.left -= 1
        return logits

    def accept(self, token_id: int) -> None:
        pass

    def accept_if_allowed(self, token_id: int) -> bool:
        return False  # greedy requests too go through the mask


def test_a_grammar_dead_end_fails_its_own_request_only(engine, monkeypatch):
    alone = run(collect(engine, "a2", ASK_FRANCE, max_tokens=12, temperature=0.0))[0]
    monkeypatch.setattr(engine.grammars, "constraint", lambda spec: DeadEndAfter(3))

    async def together():
        dead = engine.generate(GenerationRequest("dead", chat_ids(engine, ASK_PERSON), SamplingParams(
            max_tokens=12, temperature=0.0, structured=StructuredOutput("json_object"))))
        return await asyncio.gather(collect(engine, "live", ASK_FRANCE, max_tokens=12, temperature=0.0),
                                    _events(dead))

    live, dead_events = run(together())
    assert live[0] == alone
    assert dead_events[-1].finish_reason == "error" and "allows no next token" in dead_events[-1].error
    assert sum(len(e.token_ids) for e in dead_events) == 3
    assert run(collect(engine, "after", ASK_FRANCE, max_tokens=12, temperature=0.0))[0] == alone  # still serving


async def _events(stream) -> list:
    return [e async for e in stream]


def test_a_tokenizer_xgrammar_cannot_read_makes_json_requests_a_clear_400_not_a_crash():
    from engine.structured import GrammarCompiler

    grammars = GrammarCompiler(object(), 100, [0])  # not a Hugging Face tokenizer
    for _ in range(2):  # the reason is kept: later requests get it without trying again
        with pytest.raises(EngineError) as err:
            grammars.compile(StructuredOutput("json_object"))
        assert err.value.param == "response_format" and "unavailable" in str(err.value)
    status = grammars.status()
    assert not status["loaded"] and status["error"]


def test_compiled_grammars_are_bounded_whatever_the_schemas_clients_send(engine):
    """xgrammar's own cache keeps every grammar (1,000 distinct schemas: 1.3 GB); ours keeps the last few."""
    from engine.structured import CACHED_GRAMMARS

    for i in range(CACHED_GRAMMARS + 8):
        schema = {"type": "object", "properties": {f"field_{i}": {"type": "string", "maxLength": 30}}}
        engine.grammars.compile(StructuredOutput("json_schema", json.dumps(schema)))
    assert engine.structured_outputs_status()["cached_grammars"] == CACHED_GRAMMARS
    assert engine.grammars._xgrammar_compiler().get_cache_size_bytes() == 0


def test_greedy_computes_a_mask_only_where_the_model_would_leave_the_grammar(engine, monkeypatch):
    from engine.structured import TokenConstraint

    spec = StructuredOutput("json_schema", json.dumps(PERSON))
    masks = []
    real_mask = TokenConstraint.mask
    monkeypatch.setattr(TokenConstraint, "mask", lambda self, logits: masks.append(1) or real_mask(self, logits))
    fast, reason, tokens = run(collect(engine, "g1", ASK_PERSON, max_tokens=64, temperature=0.0, structured=spec))
    fast_masks = len(masks)
    monkeypatch.setattr(TokenConstraint, "accept_if_allowed", lambda self, token_id: False)  # always mask
    masked, _, _ = run(collect(engine, "g2", ASK_PERSON, max_tokens=64, temperature=0.0, structured=spec))
    assert fast == masked and reason == "stop"
    assert 0 < fast_masks < len(tokens) == len(masks) - fast_masks
