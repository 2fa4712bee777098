"""What both generation endpoints share: engine access, prompt checks, running n choices, accounting.

One API request becomes one engine request per choice (prompts x n). Each choice accumulates its
events; the routes turn the accumulated state (or each event, when streaming) into OpenAI objects.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from engine.types import EngineError, GenerationOutput, GenerationRequest, SamplingParams, TokenLogprob
from server.admission import RETRY_AFTER_S, Admission, ServingConfig
from server.errors import APIError
from server.metrics import Metrics, RequestTracker
from server.protocol import ChatTokenLogprob, ChatTopLogprob, CompletionLogprobs, UsageInfo
from server.streaming import StreamTimeout, cancel_on_disconnect, merge_streams

MODEL_ALIASES = ("default",)  # accepted besides the served model's name
MAX_STOP = 4  # stop strings per request, as OpenAI


class GenerationFailed(Exception):
    """The engine failed a request after accepting it (finish_reason "error")."""


class TokenText:
    """Text of single token ids, as the tokenizer decodes each alone (cached: logprobs ask often)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            text = self.cache[token_id] = self.tokenizer.decode([token_id])
        return text


@dataclass
class ServerState:
    """Per-app state: the engine once loaded (None while loading), metrics, and how the model runs."""

    metrics: Metrics
    device: str = "cpu"
    engine: Any = None
    load_error: str | None = None
    token_text: TokenText | None = None
    config: ServingConfig = field(default_factory=ServingConfig)
    draining: bool = False  # set at SIGTERM: new API requests get 503 while running ones finish
    admission: Admission | None = None

    def __post_init__(self) -> None:
        self.admission = Admission(self.config.max_queue)

    def admit(self, n_choices: int) -> RequestTracker:
        """Start accounting one API request of `n_choices` engine requests, or refuse it (429).

        The returned tracker releases the admission when it finishes (exactly once, on every path).
        """
        slots = getattr(self.engine, "max_batch", 8)
        if not self.admission.try_admit(n_choices, slots):
            self.metrics.requests_rejected.labels(reason="queue_full").inc()
            raise APIError(429, f"the server is overloaded: {self.admission.in_flight} requests in flight "
                                f"(limit {self.admission.capacity(slots)}); retry later", code="server_overloaded",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        tracker = self.metrics.track()
        tracker.on_finish = lambda: self.admission.release(n_choices)
        return tracker

    def check_limits(self, prompts: list[list[int]], n: int, n_stop: int, param: str = "prompt") -> None:
        """Operator limits (--max-n, --max-prompt-tokens) and OpenAI's 4 stop strings: clear 400s."""
        config = self.config
        if n > config.max_n:
            raise APIError(400, f"n must be at most {config.max_n} on this server (got {n})", param="n")
        if n_stop > MAX_STOP:
            raise APIError(400, f"at most {MAX_STOP} stop sequences are allowed (got {n_stop})", param="stop")
        longest = max((len(p) for p in prompts), default=0)
        if config.max_prompt_tokens is not None and longest > config.max_prompt_tokens:
            self.metrics.requests_rejected.labels(reason="too_large").inc()
            raise APIError(400, f"the prompt has {longest} tokens; this server accepts at most "
                                f"{config.max_prompt_tokens} (--max-prompt-tokens)", param=param,
                           code="prompt_too_long")

    async def check_sampling(self, engine: Any, params: SamplingParams) -> None:
        """400s for logit_bias ids outside the vocabulary and for a response format's schema the grammar
        compiler rejects; the grammar is compiled here, in a worker thread (a large schema takes a while), and
        cached by the engine for the request to find. Counts the structured requests by format."""
        vocab_size = len(engine.tokenizer)
        bad = next((t for t in params.logit_bias if t >= vocab_size), None)
        if bad is not None:
            raise APIError(400, f"logit_bias: token id {bad} is outside the vocabulary [0, {vocab_size})",
                           param="logit_bias")
        if params.structured is not None:
            try:
                await asyncio.to_thread(engine.grammars.compile, params.structured)
            except EngineError as exc:
                raise APIError(400, str(exc), param=exc.param) from exc
            self.metrics.structured_requests.labels(format=params.structured.kind).inc()

    def set_engine(self, engine: Any) -> None:
        self.token_text = TokenText(engine.tokenizer)
        self.engine = engine

    def ready_engine(self) -> Any:
        if self.engine is None:
            detail = f"model failed to load: {self.load_error}" if self.load_error else "the model is still loading"
            raise APIError(503, detail, code="model_not_ready")
        return self.engine


def check_model(requested: str | None, engine: Any) -> None:
    if requested is not None and requested != engine.model_name and requested not in MODEL_ALIASES:
        raise APIError(404, f"The model `{requested}` does not exist.", param="model", code="model_not_found")


def check_prompt_ids(ids: list[int], vocab_size: int, param: str = "prompt") -> None:
    if not ids:
        raise APIError(400, "the prompt is empty (0 tokens)", param=param)
    bad = next((t for t in ids if t < 0 or t >= vocab_size), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is outside the vocabulary [0, {vocab_size})", param=param)


def resolve_max_tokens(requested: int | None, default: int | None, prompt_len: int, context: int,
                       param: str = "max_tokens") -> int:
    """The completion budget: `requested`, else `default` capped to the context, else the whole rest.

    Rejects (400) a prompt that leaves no room, or an explicit budget that does not fit.
    """
    room = context - prompt_len
    if room < 0 or (room == 0 and requested != 0):
        raise APIError(400, f"This model's maximum context length is {context} tokens. However, your prompt "
                            f"has {prompt_len} tokens, leaving no room for the completion.", param="prompt",
                       code="context_length_exceeded")
    if requested is None:
        return room if default is None else min(default, room)
    if requested > room:
        raise APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                            f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} in the "
                            f"completion). Please reduce the prompt or the completion length.", param=param,
                       code="context_length_exceeded")
    return requested


@dataclass
class Choice:
    """One engine request (one choice of the response) and what it produced so far."""

    index: int
    prompt_index: int
    prompt_ids: list[int]
    params: SamplingParams
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the engine reused from its prefix cache
    events: int = 0
    text_offset: int = 0  # legacy completions logprobs: where the next token's text starts

    def add(self, out: GenerationOutput) -> None:
        if self.events == 0:
            self.cached_tokens = out.cached_tokens
        self.events += 1
        self.text += out.text
        self.token_ids.extend(out.token_ids)
        if out.logprobs:
            self.logprobs.extend(out.logprobs)
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.completion_tokens = max(out.completion_tokens, len(self.token_ids))
        if out.finish_reason is not None:
            self.finish_reason = out.finish_reason


def make_choices(prompts: list[list[int]], n: int, params: list[SamplingParams]) -> list[Choice]:
    """prompts x n choices; with a seed, choice i of a prompt samples with seed + i (reproducible, distinct)."""
    choices = []
    for p, (ids, base) in enumerate(zip(prompts, params)):
        for i in range(n):
            choice_params = base if base.seed is None else replace(base, seed=base.seed + i)
            choices.append(Choice(index=p * n + i, prompt_index=p, prompt_ids=ids, params=choice_params))
    return choices


def usage_of(choices: list[Choice]) -> UsageInfo:
    prompt = {c.prompt_index: len(c.prompt_ids) for c in choices}  # a prompt counts once for its n choices
    cached: dict[int, int] = {}  # ... and is cached as far as all of its choices found it cached
    for c in choices:
        cached[c.prompt_index] = min(cached.get(c.prompt_index, c.cached_tokens), c.cached_tokens)
    return UsageInfo.of(sum(prompt.values()), sum(c.completion_tokens for c in choices), sum(cached.values()))


async def _no_generation(choice: Choice) -> AsyncIterator[GenerationOutput]:
    """max_tokens=0 without prompt logprobs: nothing for the engine to do."""
    yield GenerationOutput(request_id="", finish_reason="length", prompt_tokens=len(choice.prompt_ids))


async def run_choices(engine: Any, choices: list[Choice], tracker: RequestTracker,
                      request_id: str) -> AsyncIterator[tuple[Choice, GenerationOutput]]:
    """Run every choice on the engine concurrently, yielding `(choice, event)` as events arrive.

    Closing this generator cancels every engine request still running.
    """
    streams = []
    for c in choices:
        if c.params.max_tokens == 0 and c.params.prompt_logprobs is None:
            streams.append(_no_generation(c))
        else:
            streams.append(engine.generate(GenerationRequest(f"{request_id}-{c.index}", c.prompt_ids, c.params)))
    timeout_s = getattr(tracker, "timeout_s", None)
    deadline = None if timeout_s is None else tracker.arrival + timeout_s
    merged = merge_streams(streams, deadline)
    try:
        async for i, out in merged:
            choice = choices[i]
            tracker.observe(i, len(choice.prompt_ids), choice.events == 0, out.queue_wait_s, len(out.token_ids))
            if out.finish_reason == "error" or out.error:
                raise GenerationFailed(out.error or "generation failed")
            choice.add(out)
            yield choice, out
    except EngineError as exc:
        raise APIError(400, str(exc), param=exc.param) from exc
    except StreamTimeout as exc:  # merge_streams already cancelled every engine request
        tracker.metrics.requests_rejected.labels(reason="timeout").inc()
        raise APIError(504, f"the request did not finish within {timeout_s:g} s (--request-timeout); "
                            "it was cancelled", code="request_timeout") from exc
    finally:
        await merged.aclose()


async def run_to_end(engine: Any, choices: list[Choice], tracker: RequestTracker, request_id: str) -> None:
    gen = run_choices(engine, choices, tracker, request_id)
    try:
        async for _ in gen:
            pass
    finally:
        await gen.aclose()


async def start_stream(request: Any, engine: Any, choices: list[Choice], tracker: RequestTracker,
                       request_id: str) -> tuple[tuple[Choice, GenerationOutput], AsyncIterator[Any]]:
    """Wait for the first event before the response starts, so an engine refusal is still an HTTP 400."""
    gen = run_choices(engine, choices, tracker, request_id)
    try:
        first = await cancel_on_disconnect(request, gen.__anext__())
    except BaseException:
        await gen.aclose()
        raise
    return first, gen


def completion_logprobs(entries: list[tuple[int, TokenLogprob | None]], token_text: TokenText,
                        offset: int) -> tuple[CompletionLogprobs, int]:
    """Legacy format; every top_logprobs dict also holds the chosen token. Returns the next offset."""
    lp = CompletionLogprobs()
    for token_id, entry in entries:
        token = entry.token if entry is not None else token_text(token_id)
        lp.tokens.append(token)
        lp.text_offset.append(offset)
        offset += len(token)
        if entry is None:  # the first prompt token has no context to be predicted from
            lp.token_logprobs.append(None)
            lp.top_logprobs.append(None)
            continue
        lp.token_logprobs.append(entry.logprob)
        top = {token_text(t): v for t, v in entry.top.items()}
        top.setdefault(token, entry.logprob)
        lp.top_logprobs.append(top)
    return lp, offset


def chat_logprobs(entries: list[TokenLogprob], top_n: int, token_text: TokenText) -> list[ChatTokenLogprob]:
    out = []
    for e in entries:
        top = sorted(e.top.items(), key=lambda kv: kv[1], reverse=True)[:top_n]
        alternatives = [ChatTopLogprob(token=(t := token_text(i)), logprob=v, bytes=list(t.encode()))
                        for i, v in top]
        out.append(ChatTokenLogprob(token=e.token, logprob=e.logprob, bytes=list(e.token.encode()),
                                    top_logprobs=alternatives))
    return out


def finish_reason(reason: str | None) -> str | None:
    """Engine reasons to OpenAI's; "cancelled" never reaches a client that is still listening."""
    return reason if reason in (None, "stop", "length") else "stop"

