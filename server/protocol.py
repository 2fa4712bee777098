"""OpenAI-compatible HTTP schemas (pydantic), fields in the order of the OpenAI API reference.

Bounds are validated here, at the boundary, so the engine can trust its `SamplingParams`. Each request
model converts itself into engine parameters with `to_sampling_params(default_max_tokens)`; the route
decides the default because it depends on the prompt length and the context.
Extensions beyond OpenAI use vLLM's names (`top_k`, `min_p`, `repetition_penalty`, `ignore_eos`).
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_serializer,
                      model_validator)

from engine.types import SamplingParams, StructuredOutput

COMPLETION_MAX_LOGPROBS = 5  # OpenAI's limit for the legacy completions `logprobs`
CHAT_MAX_TOP_LOGPROBS = 20
MAX_N = 128
MAX_SCHEMA_CHARS = 64 * 1024  # a response format's JSON schema, serialized
MAX_SCHEMA_DEPTH = 64  # its nesting of JSON objects and arrays (~30 levels of nested schemas: ~15 ms to compile)


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class OpenAIModel(BaseModel):
    # Unknown fields are ignored, as the OpenAI SDK may send newer parameters we do not implement.
    model_config = ConfigDict(extra="ignore")


# ---------------------------------------------------------------- errors

class ErrorInfo(OpenAIModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(OpenAIModel):
    error: ErrorInfo


# ---------------------------------------------------------------- shared request parts

class StreamOptions(OpenAIModel):
    include_usage: bool = False


def invalid_text_location(value: Any, where: str = "") -> str | None:
    """Where the first string of a parsed JSON value is not valid Unicode text (a lone UTF-16 surrogate,
    which JSON's `\\udc80` escapes allow and no tokenizer accepts), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where or "body"
    elif isinstance(value, dict):
        for key, item in value.items():
            found = invalid_text_location(key, where) or invalid_text_location(item, f"{where}.{key}".lstrip("."))
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = invalid_text_location(item, f"{where}.{i}".lstrip("."))
            if found:
                return found
    return None


INT64 = 2**63


class RequestModel(OpenAIModel):
    """A request body: every string in it must be valid Unicode text (checked before the fields)."""

    @model_validator(mode="before")
    @classmethod
    def _valid_text(cls, data: Any) -> Any:
        where = invalid_text_location(data)
        if where:
            raise ValueError(f"{where}: not valid Unicode text (a lone surrogate escape such as \\udcff); send UTF-8")
        return data


def nesting_depth(value: Any) -> int:
    """How deeply JSON objects and arrays nest in `value` (a scalar: 0)."""
    depth, level = 0, [value]
    while level:
        level = [v for item in level if isinstance(item, (dict, list))
                 for v in (item.values() if isinstance(item, dict) else item)]
        depth += 1
    return depth - 1


class JSONSchemaFormat(OpenAIModel):
    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # None: any JSON object
    strict: bool | None = None  # the output always follows the schema here, strict or not


class ResponseFormat(OpenAIModel):
    """OpenAI's `response_format`: plain text, any JSON object, or JSON following a schema (constrained
    decoding, engine.structured)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema is required when the type is \"json_schema\"")
        self.structured()  # the schema's size is checked here, at the boundary
        return self

    def structured(self) -> StructuredOutput | None:
        if self.type == "text":
            return None
        schema = self.json_schema.schema_ if self.type == "json_schema" else None
        if schema is None:
            return StructuredOutput("json_object")
        depth = nesting_depth(schema)
        if depth > MAX_SCHEMA_DEPTH:  # compile time grows fast with depth: 300 nested objects took 5 s
            raise ValueError(f"the JSON schema nests {depth} levels deep (objects and arrays); at most "
                             f"{MAX_SCHEMA_DEPTH} are accepted")
        text = json.dumps(schema)  # key order kept: the properties are generated in the order given
        if len(text) > MAX_SCHEMA_CHARS:
            raise ValueError(f"the JSON schema has {len(text)} characters; at most {MAX_SCHEMA_CHARS} are accepted")
        return StructuredOutput("json_schema", text)


class SamplingFields(RequestModel):
    """The request fields both endpoints share (sampling, streaming, n, stop), and their checks."""

    model: str | None = None
    frequency_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None  # token id (a decimal string) -> bias in [-100, 100]
    n: int = Field(1, ge=1, le=MAX_N)
    presence_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    response_format: ResponseFormat | None = None  # OpenAI's chat field; also taken by /v1/completions
    seed: int | None = Field(None, ge=-INT64, lt=INT64)  # a 64-bit seed, as torch.Generator takes
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    user: str | None = None
    # extensions (vLLM's names)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    ignore_eos: bool = False

    @field_validator("logit_bias")
    @classmethod
    def _token_ids_and_bounds(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not key.isdecimal():
                raise ValueError(f"logit_bias keys must be token ids (decimal strings), got {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values must lie in [-100, 100], got {bias} for token {key}")
        return value

    def _stop_list(self) -> list[str]:
        stop = self.stop
        if stop is None:
            return []
        stops = [stop] if isinstance(stop, str) else list(stop)
        return [s for s in stops if s]  # an empty stop string would end every generation at once

    def _sampling_params(self, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None) -> SamplingParams:
        top_k = self.top_k
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if top_k is None or top_k < 0 else top_k,  # -1 (vLLM) and 0 both mean off
            min_p=self.min_p or 0.0,
            seed=self.seed,
            repetition_penalty=self.repetition_penalty or 1.0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            stop=self._stop_list(),
            ignore_eos=self.ignore_eos,
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
            structured=self.response_format.structured() if self.response_format else None,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )

    def _check_common(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


# ---------------------------------------------------------------- /v1/completions

class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=COMPLETION_MAX_LOGPROBS)
    max_tokens: int | None = Field(None, ge=0)  # None: 16, as OpenAI
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _check(self) -> CompletionRequest:
        self._check_common()
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:  # best_of == n returns every sample: plain n
            raise ValueError("best_of is not supported (use n and pick client-side)")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be an empty list")
        return self

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        max_tokens = default_max_tokens if self.max_tokens is None else self.max_tokens
        return self._sampling_params(max_tokens, self.logprobs, self.logprobs if self.echo else None)


# ---------------------------------------------------------------- /v1/chat/completions

class TextContentPart(OpenAIModel):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)  # deprecated by OpenAI for max_completion_tokens
    top_logprobs: int | None = Field(None, ge=0, le=CHAT_MAX_TOP_LOGPROBS)
    add_generation_prompt: bool = True  # extension
    # Tool calling is not implemented: declared so that a request relying on it gets a 400 naming the
    # field, not a plain-text answer it would take for a tool call.
    tool_choice: str | dict[str, Any] | None = None  # before `tools`: their check reads it
    tools: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None  # before `functions` (OpenAI's deprecated form)
    functions: list[dict[str, Any]] | None = None

    @field_validator("tools", "functions")
    @classmethod
    def _no_tool_calling(cls, value: list[dict[str, Any]] | None, info: ValidationInfo) -> list | None:
        knob = "tool_choice" if info.field_name == "tools" else "function_call"
        if value and info.data.get(knob) != "none":
            raise ValueError(f"tool calling is not supported by this server (send no {info.field_name}, or "
                             f"{knob} \"none\" to have them ignored)")
        return value

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        self._check_common()
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def template_messages(self) -> list[dict[str, str]]:
        """Messages as the chat template expects them: content flattened to one string."""
        out = []
        for m in self.messages:
            message = {"role": m.role, "content": m.text()}
            if m.name:
                message["name"] = m.name
            out.append(message)
        return out

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        requested = self.requested_max_tokens
        max_tokens = default_max_tokens if requested is None else requested
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(max_tokens, logprobs, None)


# ---------------------------------------------------------------- responses

class PromptTokensDetails(OpenAIModel):
    cached_tokens: int = 0  # prompt tokens whose keys and values were reused, not computed (prefix cache)


class UsageInfo(OpenAIModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> UsageInfo:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


class CompletionLogprobs(OpenAIModel):
    """Legacy completions format: parallel lists, one entry per token."""

    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(OpenAIModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(OpenAIModel):
    id: str = Field(default_factory=lambda: random_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class StreamChunk(OpenAIModel):
    """Drops a None `usage` (present only in the final chunk of a stream with include_usage)."""

    @model_serializer(mode="wrap")
    def _drop_null_usage(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        if data.get("usage", 0) is None:
            del data["usage"]
        return data


class CompletionStreamResponse(StreamChunk):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ChatTopLogprob(OpenAIModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(OpenAIModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(OpenAIModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionChoice(OpenAIModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionResponse(OpenAIModel):
    id: str = Field(default_factory=lambda: random_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo


class DeltaMessage(OpenAIModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatCompletionStreamChoice(OpenAIModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionStreamResponse(StreamChunk):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None


# ---------------------------------------------------------------- /v1/models

class QualityCard(OpenAIModel):
    """Quality measured once, when the checkpoint was made (quantization.json "quality")."""

    dataset: str
    perplexity: float
    reference_perplexity: float | None = None  # the unquantized model on the same windows
    kl_divergence: float | None = None  # mean KL(unquantized || quantized) of the next-token distribution
    top1_agreement: float | None = None
    windows: int | None = None
    ctx: int | None = None


class QuantizationCard(OpenAIModel):
    """How the served weights are stored. `method` is "none" for an unquantized model."""

    method: str
    bits_per_weight: float  # codes + scales + zeros + low-rank factors, per weight of the quantized linears
    bits: int | None = None
    group_size: int | None = None
    rank: int | None = None
    quality: list[QualityCard] = Field(default_factory=list)  # empty when none was measured


class ModelCard(OpenAIModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "fbserve"
    max_model_len: int | None = None
    quantization: QuantizationCard | None = None


class ModelList(OpenAIModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)


# ---------------------------------------------------------------- /tokenize, /detokenize (vLLM's shape)

class TokenizeRequest(RequestModel):
    """Either `prompt` (text) or `messages` (rendered with the chat template), not both."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True  # for `prompt`; the chat template writes its own
    add_generation_prompt: bool = True  # for `messages`

    @model_validator(mode="after")
    def _check(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class TokenizeResponse(OpenAIModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(RequestModel):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(OpenAIModel):
    prompt: str
