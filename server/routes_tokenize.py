"""POST /tokenize and /detokenize: the served model's tokenizer, for clients that count or build prompts."""
from __future__ import annotations

from fastapi import APIRouter, Request

from server.errors import APIError
from server.generation import ServerState, check_model, check_prompt_ids
from server.protocol import (ChatCompletionRequest, DetokenizeRequest, DetokenizeResponse, TokenizeRequest,
                             TokenizeResponse)
from server.routes_chat import chat_prompt_ids

router = APIRouter()


@router.post("/tokenize", response_model=TokenizeResponse)
def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:  # sync: tokenizing is CPU work
    state: ServerState = request.app.state.server
    engine = state.ready_engine()
    check_model(body.model, engine)
    if body.messages is not None:
        chat = ChatCompletionRequest(messages=body.messages, add_generation_prompt=body.add_generation_prompt)
        ids = chat_prompt_ids(chat, engine.tokenizer)
    else:
        ids = engine.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=engine.max_seq_len)


@router.post("/detokenize", response_model=DetokenizeResponse)
def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    state: ServerState = request.app.state.server
    engine = state.ready_engine()
    check_model(body.model, engine)
    if body.tokens:
        check_prompt_ids(body.tokens, len(engine.tokenizer), param="tokens")
    try:
        text = engine.tokenizer.decode(body.tokens)
    except Exception as exc:  # e.g. an id the vocabulary size admits but the tokenizer has no piece for
        raise APIError(400, f"cannot decode these tokens: {exc}", param="tokens") from exc
    return DetokenizeResponse(prompt=text)
