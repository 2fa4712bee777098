"""POST /v1/completions (legacy completions: echo, logprobs in the legacy format, token prompts)."""
from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from engine.types import GenerationOutput, TokenLogprob
from server.generation import (Choice, ServerState, check_model, check_prompt_ids,
                               completion_logprobs, finish_reason, make_choices, resolve_max_tokens, run_to_end,
                               start_stream, usage_of)
from server.protocol import (CompletionChoice, CompletionRequest, CompletionResponse, CompletionStreamResponse,
                             random_id)
from server.streaming import SSEResponse, cancel_on_disconnect, sse_events, sse_frame

router = APIRouter()

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


def _prompts(body: CompletionRequest, tokenizer: Any) -> tuple[list[list[int]], list[str]]:
    """Token ids and echo text of each prompt (a string, a list of strings, ids, or a list of ids)."""
    p = body.prompt
    items: list[Any] = [p] if isinstance(p, str) or isinstance(p[0], int) else list(p)
    ids, texts = [], []
    for item in items:
        if isinstance(item, str):
            ids.append(tokenizer.encode(item))
            texts.append(item)
        else:
            ids.append(list(item))
            texts.append(tokenizer.decode(item) if body.echo else "")
    return ids, texts


def _prompt_entries(c: Choice) -> list[tuple[int, TokenLogprob | None]]:
    logprobs = list(c.prompt_logprobs or [])
    logprobs += [None] * (len(c.prompt_ids) - len(logprobs))
    return list(zip(c.prompt_ids, logprobs))


@router.post("/v1/completions", response_model=CompletionResponse)
async def create_completion(body: CompletionRequest, request: Request) -> Response | CompletionResponse:
    state: ServerState = request.app.state.server
    engine = state.ready_engine()
    check_model(body.model, engine)
    prompt_ids, echo_texts = _prompts(body, engine.tokenizer)
    state.check_limits(prompt_ids, body.n, len(body._stop_list()))
    params = []
    for ids in prompt_ids:
        check_prompt_ids(ids, len(engine.tokenizer))
        budget = resolve_max_tokens(body.max_tokens, DEFAULT_MAX_TOKENS, len(ids), engine.max_seq_len)
        params.append(body.to_sampling_params(budget))
    choices = make_choices(prompt_ids, body.n, params)
    tracker = request.state.tracker = state.admit(len(choices))
    tracker.timeout_s = state.config.request_timeout_s
    await state.check_sampling(engine, params[0])  # admitted first: --max-queue bounds the grammars compiling
    request_id = random_id("cmpl")
    model = engine.model_name

    if body.stream:
        first, rest = await start_stream(request, engine, choices, tracker, request_id)
        created = int(time.time())

        def render(item: tuple[Choice, GenerationOutput]) -> str | None:
            choice = _event_choice(*item, body, echo_texts, state)
            if choice is None:
                return None
            return sse_frame(CompletionStreamResponse(id=request_id, created=created, model=model, choices=[choice]))

        def tail() -> list[str]:
            if not body.include_usage:
                return []
            return [sse_frame(CompletionStreamResponse(id=request_id, created=created, model=model, choices=[],
                                                       usage=usage_of(choices)))]

        return SSEResponse(sse_events(first, rest, render, [], tail, tracker.finish),
                           on_close=lambda: tracker.finish("cancelled"))

    await cancel_on_disconnect(request, run_to_end(engine, choices, tracker, request_id))
    tracker.finish("success")
    return CompletionResponse(id=request_id, model=model, usage=usage_of(choices),
                              choices=[_choice(c, body, echo_texts, state) for c in choices])


def _choice(c: Choice, body: CompletionRequest, echo_texts: list[str], state: ServerState) -> CompletionChoice:
    logprobs = None
    if body.logprobs is not None:
        entries = _prompt_entries(c) if body.echo else []
        entries += [(e.token_id, e) for e in c.logprobs]
        logprobs, _ = completion_logprobs(entries, state.token_text, 0)
    text = (echo_texts[c.prompt_index] if body.echo else "") + c.text
    return CompletionChoice(index=c.index, text=text, logprobs=logprobs, finish_reason=finish_reason(c.finish_reason))


def _event_choice(c: Choice, out: GenerationOutput, body: CompletionRequest, echo_texts: list[str],
                  state: ServerState) -> CompletionChoice | None:
    """The chunk choice for one event; None when it carries nothing (text held back by the detokenizer)."""
    echo_now = body.echo and c.events == 1
    text = (echo_texts[c.prompt_index] if echo_now else "") + out.text
    logprobs = None
    if body.logprobs is not None:
        entries = _prompt_entries(c) if echo_now else []
        entries += [(e.token_id, e) for e in out.logprobs or []]
        if entries:
            logprobs, c.text_offset = completion_logprobs(entries, state.token_text, c.text_offset)
    if not text and logprobs is None and out.finish_reason is None:
        return None
    return CompletionChoice(index=c.index, text=text, logprobs=logprobs, finish_reason=finish_reason(out.finish_reason))
