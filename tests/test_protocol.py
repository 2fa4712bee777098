"""The OpenAI request models: bounds at the boundary and conversion into engine parameters."""
from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from engine.types import TokenLogprob
from server.errors import APIError
from server.generation import completion_logprobs, make_choices, resolve_max_tokens
from server.protocol import ChatCompletionRequest, CompletionRequest, CompletionStreamResponse, DeltaMessage

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("stop, expected", [(None, []), ("###", ["###"]), (["a", "b"], ["a", "b"]), (["", "x"], ["x"])])
def test_stop_forms(stop, expected):
    params = CompletionRequest(prompt="p", stop=stop).to_sampling_params(16)
    assert params.stop == expected
    assert ChatCompletionRequest(messages=MESSAGES, stop=stop).to_sampling_params(16).stop == expected


def test_completion_conversion():
    req = CompletionRequest(prompt="p", max_tokens=7, temperature=0, top_p=0.5, seed=3, logprobs=2, echo=True,
                            presence_penalty=0.5, frequency_penalty=-1, top_k=-1, min_p=0.1,
                            repetition_penalty=1.2)
    p = req.to_sampling_params(16)
    assert (p.max_tokens, p.temperature, p.top_p, p.seed) == (7, 0.0, 0.5, 3)
    assert (p.logprobs, p.prompt_logprobs) == (2, 2)  # echo + logprobs asks for the prompt's logprobs
    assert (p.presence_penalty, p.frequency_penalty, p.top_k, p.min_p, p.repetition_penalty) == (0.5, -1, 0, 0.1, 1.2)
    defaults = CompletionRequest(prompt="p", temperature=None, top_p=None).to_sampling_params(16)
    assert (defaults.max_tokens, defaults.temperature, defaults.top_p, defaults.logprobs) == (16, 1.0, 1.0, None)
    assert defaults.prompt_logprobs is None


def test_chat_conversion():
    req = ChatCompletionRequest(messages=MESSAGES, max_tokens=5, max_completion_tokens=9, logprobs=True,
                                top_logprobs=3)
    p = req.to_sampling_params(100)
    assert (p.max_tokens, p.logprobs, p.prompt_logprobs) == (9, 3, None)  # max_completion_tokens wins
    assert ChatCompletionRequest(messages=MESSAGES, logprobs=True).to_sampling_params(4).logprobs == 0
    assert ChatCompletionRequest(messages=MESSAGES).to_sampling_params(4).max_tokens == 4


def test_prompt_forms():
    assert CompletionRequest(prompt="a").prompt == "a"
    assert CompletionRequest(prompt=["a", "b"]).prompt == ["a", "b"]
    assert CompletionRequest(prompt=[1, 2]).prompt == [1, 2]
    assert CompletionRequest(prompt=[[1], [2, 3]]).prompt == [[1], [2, 3]]


def test_message_content_parts_are_flattened():
    req = ChatCompletionRequest(messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                       {"type": "text", "text": "b"}]}])
    assert req.template_messages() == [{"role": "user", "content": "ab"}]


@pytest.mark.parametrize("fields", [
    {"temperature": -0.1}, {"temperature": 2.5}, {"top_p": 0}, {"top_p": 1.5}, {"n": 0}, {"max_tokens": -1},
    {"logprobs": 6}, {"presence_penalty": 3}, {"prompt": []}, {"prompt": 3.5}, {"stream_options": {}},
    {"suffix": "x"}, {"logit_bias": {"a": 2}}, {"logit_bias": {"1": 101}}, {"logit_bias": {"-1": 2}}, {"min_p": 2},
    {"response_format": {"type": "grammar"}}, {"response_format": {"type": "json_schema"}},
    {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},  # no name
    {"response_format": {"type": "json_schema",
                         "json_schema": {"name": "big", "schema": {"enum": ["x" * 70_000]}}}},
])
def test_completion_rejects(fields):
    with pytest.raises(ValidationError):
        CompletionRequest(**{"prompt": "p", **fields})


@pytest.mark.parametrize("fields", [
    {"messages": []}, {"top_logprobs": 2}, {"logprobs": True, "top_logprobs": 21}, {"max_tokens": 0},
    {"messages": [{"role": "robot", "content": "x"}]}, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
])
def test_chat_rejects(fields):
    with pytest.raises(ValidationError):
        ChatCompletionRequest(**{"messages": MESSAGES, **fields})


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


@pytest.mark.parametrize("fields, param", [
    ({"tools": TOOLS}, "tools"), ({"tools": TOOLS, "tool_choice": "auto"}, "tools"),
    ({"functions": [{"name": "f"}]}, "functions"),
])
def test_chat_refuses_tool_calls(fields, param):
    """Served as plain text these would be misread by the client (as "no tool call"): refused."""
    with pytest.raises(ValidationError) as err:
        ChatCompletionRequest(messages=MESSAGES, **fields)
    assert err.value.errors()[0]["loc"][0] == param
    assert "not supported" in str(err.value)


@pytest.mark.parametrize("fields", [
    {"tools": TOOLS, "tool_choice": "none"}, {"tools": []}, {"functions": [{"name": "f"}], "function_call": "none"},
    {"response_format": {"type": "text"}},
])
def test_chat_accepts_requests_that_ask_for_plain_text(fields):
    assert ChatCompletionRequest(messages=MESSAGES, **fields).to_sampling_params(4).max_tokens == 4


def nested_schema(levels: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def test_a_schema_nested_too_deep_is_refused_before_it_is_compiled():
    def fmt(levels: int) -> dict:
        return {"type": "json_schema", "json_schema": {"name": "n", "schema": nested_schema(levels)}}

    assert ChatCompletionRequest(messages=MESSAGES, response_format=fmt(30)).to_sampling_params(4).structured
    with pytest.raises(ValidationError) as err:
        ChatCompletionRequest(messages=MESSAGES, response_format=fmt(300))  # ~5 s of compiling on 2 cores
    assert err.value.errors()[0]["loc"][0] == "response_format" and "nests 601 levels" in str(err.value)


def test_logit_bias_and_response_format_become_engine_params():
    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}
    params = ChatCompletionRequest(messages=MESSAGES, logit_bias={"7": -100, "42": 5.5}, response_format={
        "type": "json_schema", "json_schema": {"name": "thing", "schema": schema, "strict": True}},
    ).to_sampling_params(4)
    assert params.logit_bias == {7: -100.0, 42: 5.5}
    assert params.structured.kind == "json_schema"
    assert json.loads(params.structured.schema) == schema
    assert list(json.loads(params.structured.schema)["properties"]) == ["b", "a"]  # generated in this order
    for fmt in [{"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "any"}}]:
        structured = CompletionRequest(prompt="p", response_format=fmt).to_sampling_params(4).structured
        assert (structured.kind, structured.schema) == ("json_object", None)
    assert CompletionRequest(prompt="p", response_format={"type": "text"}).to_sampling_params(4).structured is None


def test_resolve_max_tokens():
    assert resolve_max_tokens(None, 16, 10, 100) == 16
    assert resolve_max_tokens(None, 16, 90, 100) == 10  # the default shrinks to the room left
    assert resolve_max_tokens(None, None, 30, 100) == 70  # chat: the rest of the context
    assert resolve_max_tokens(0, 16, 100, 100) == 0  # echo + max_tokens 0 on a full context
    for args in [(20, 16, 90, 100), (None, 16, 100, 100), (0, 16, 101, 100)]:
        with pytest.raises(APIError) as err:
            resolve_max_tokens(*args)
        assert err.value.status == 400


def test_usage_counts_a_prompt_cached_as_far_as_all_its_choices_found_it():
    from server.generation import usage_of

    choices = make_choices([[1, 2, 3, 4], [5, 6]], 2, [CompletionRequest(prompt="p").to_sampling_params(4)] * 2)
    for choice, cached in zip(choices, [3, 1, 0, 1]):
        choice.cached_tokens = cached
    usage = usage_of(choices)
    assert (usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens) == (6, 1)


def test_seeds_per_choice():
    base = CompletionRequest(prompt="p", seed=10).to_sampling_params(4)
    choices = make_choices([[1], [2]], 3, [base, base])
    assert [c.index for c in choices] == list(range(6))
    assert [c.params.seed for c in choices] == [10, 11, 12, 10, 11, 12]
    unseeded = make_choices([[1]], 2, [CompletionRequest(prompt="p").to_sampling_params(4)])
    assert [c.params.seed for c in unseeded] == [None, None]


def test_completion_logprobs_format():
    entries = [(5, None), (6, TokenLogprob(6, "bb", -1.0, {7: -0.5}))]
    lp, offset = completion_logprobs(entries, lambda t: {5: "a", 7: "c"}[t], 0)
    assert lp.tokens == ["a", "bb"] and lp.text_offset == [0, 1] and offset == 3
    assert lp.token_logprobs == [None, -1.0]
    assert lp.top_logprobs == [None, {"c": -0.5, "bb": -1.0}]


def test_stream_chunk_serialization():
    chunk = CompletionStreamResponse(id="x", created=1, model="m", choices=[])
    assert "usage" not in chunk.model_dump()
    assert DeltaMessage(content="a").model_dump() == {"content": "a"}
