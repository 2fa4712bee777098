"""POST /v1/chat/completions: the prompt is the tokenizer's chat template applied to the messages."""
from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from engine.types import GenerationOutput
from server.errors import APIError
from server.generation import (Choice, ServerState, chat_logprobs, check_model, check_prompt_ids,
                               finish_reason, make_choices, resolve_max_tokens, run_to_end, start_stream, usage_of)
from server.protocol import (ChatChoiceLogprobs, ChatCompletionChoice, ChatCompletionRequest,
                             ChatCompletionResponse, ChatCompletionStreamChoice, ChatCompletionStreamResponse,
                             ChatResponseMessage, DeltaMessage, random_id)
from server.streaming import SSEResponse, cancel_on_disconnect, sse_events, sse_frame

router = APIRouter()


def chat_prompt_ids(body: ChatCompletionRequest, tokenizer: Any) -> list[int]:
    try:
        text = tokenizer.apply_chat_template(body.template_messages(), tokenize=False,
                                             add_generation_prompt=body.add_generation_prompt)
    except Exception as exc:  # jinja raises for conversations the template rejects (e.g. role order)
        raise APIError(400, f"the chat template rejected the messages: {exc}", param="messages") from exc
    # The template already wrote the special tokens (BOS, role markers).
    return tokenizer.encode(text, add_special_tokens=False)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response | ChatCompletionResponse:
    state: ServerState = request.app.state.server
    engine = state.ready_engine()
    check_model(body.model, engine)
    ids = chat_prompt_ids(body, engine.tokenizer)
    check_prompt_ids(ids, len(engine.tokenizer), param="messages")
    state.check_limits([ids], body.n, len(body._stop_list()), param="messages")
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    budget = resolve_max_tokens(body.requested_max_tokens, None, len(ids), engine.max_seq_len, param)
    params = body.to_sampling_params(budget)
    choices = make_choices([ids], body.n, [params])
    tracker = request.state.tracker = state.admit(len(choices))
    tracker.timeout_s = state.config.request_timeout_s
    await state.check_sampling(engine, params)  # admitted first: --max-queue bounds the grammars compiling
    request_id = random_id("chatcmpl")
    model = engine.model_name
    top_n = body.top_logprobs or 0

    def logprobs_of(entries: list) -> ChatChoiceLogprobs | None:
        return ChatChoiceLogprobs(content=chat_logprobs(entries, top_n, state.token_text)) if body.logprobs else None

    if body.stream:
        first, rest = await start_stream(request, engine, choices, tracker, request_id)
        created = int(time.time())

        def chunk(choices_: list[ChatCompletionStreamChoice], usage: Any = None) -> str:
            return sse_frame(ChatCompletionStreamResponse(id=request_id, created=created, model=model,
                                                          choices=choices_, usage=usage))

        def render(item: tuple[Choice, GenerationOutput]) -> str | None:
            c, out = item
            if not out.text and not out.logprobs and out.finish_reason is None:
                return None  # text held back by the detokenizer
            delta = DeltaMessage(content=out.text if out.text or out.finish_reason is None else None)
            return chunk([ChatCompletionStreamChoice(index=c.index, delta=delta,
                                                     logprobs=logprobs_of(out.logprobs or []),
                                                     finish_reason=finish_reason(out.finish_reason))])

        head = [chunk([ChatCompletionStreamChoice(index=c.index, delta=DeltaMessage(role="assistant", content=""))])
                for c in choices]

        def tail() -> list[str]:
            return [chunk([], usage_of(choices))] if body.include_usage else []

        return SSEResponse(sse_events(first, rest, render, head, tail, tracker.finish),
                           on_close=lambda: tracker.finish("cancelled"))

    await cancel_on_disconnect(request, run_to_end(engine, choices, tracker, request_id))
    tracker.finish("success")
    return ChatCompletionResponse(
        id=request_id, model=model, usage=usage_of(choices),
        choices=[ChatCompletionChoice(index=c.index, message=ChatResponseMessage(content=c.text),
                                      logprobs=logprobs_of(c.logprobs), finish_reason=finish_reason(c.finish_reason))
                 for c in choices])
