"""The engine's request and output types: the one interface between the server and the engine."""
from __future__ import annotations

from dataclasses import dataclass, field


STRUCTURED_KINDS = ("json_object", "json_schema")  # what StructuredOutput.kind may be


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on the generated text: `kind` "json_object" (any JSON object) or "json_schema" (`schema`,
    a JSON Schema serialized; its properties are generated in the order they appear in it)."""

    kind: str
    schema: str | None = None


@dataclass
class SamplingParams:
    """Per-request decoding settings (validated at the HTTP boundary; the engine trusts them)."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    seed: int | None = None  # same seed + same prompt + same params = same output
    repetition_penalty: float = 1.0  # >1 discourages tokens already in prompt or output (CTRL-style)
    presence_penalty: float = 0.0  # OpenAI: subtract once if the token appeared in the output
    frequency_penalty: float = 0.0  # OpenAI: subtract count times
    stop: list[str] = field(default_factory=list)  # stop strings, not returned in the text
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit (OpenAI)
    structured: StructuredOutput | None = None  # the output must follow this JSON grammar (engine.structured)
    logprobs: int | None = None  # None: none; k >= 0: chosen token's logprob plus top-k alternatives
    prompt_logprobs: int | None = None  # same, for every prompt token (the first one has none)


@dataclass
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass
class TokenLogprob:
    """One position: the token taken, its logprob, and the top alternatives (token_id -> logprob)."""

    token_id: int
    token: str  # the token's text piece as the tokenizer decodes it alone
    logprob: float
    top: dict[int, float] = field(default_factory=dict)


@dataclass
class GenerationOutput:
    """One event of a request's stream: new text since the last event, and the final state when done.

    `text` is a delta that never splits a UTF-8 character and never contains (part of) a stop string.
    `finish_reason`: None while running, then "stop" (EOS or stop string), "length", "cancelled" or "error".
    """

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)  # tokens generated since the last event
    logprobs: list[TokenLogprob] | None = None  # one per token in token_ids when requested
    prompt_logprobs: list[TokenLogprob | None] | None = None  # only on the first event; first entry None
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # total so far
    queue_wait_s: float | None = None  # set on the first event: seconds between submit and prefill start
    cached_tokens: int = 0  # set on the first event: prompt tokens reused from the KV cache, not computed


class EngineError(Exception):
    """A request the engine refuses (e.g. prompt longer than the context); the server maps it to a 400 that
    names the request field `param`."""

    def __init__(self, message: str, param: str = "prompt") -> None:
        super().__init__(message)
        self.param = param
