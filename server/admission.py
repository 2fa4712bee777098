"""Who may come in, and when: API keys, body size, draining at shutdown, and the bounded wait queue.

`ServingConfig` holds the operator's limits (`fbserve serve` flags). `Gate` is a pure ASGI middleware
that answers before any route runs: 503 while shutting down, 401 without a valid key, 413 for an
oversized body. `Admission` bounds the engine requests in flight (running + waiting); beyond it the
server answers 429 with `Retry-After` instead of letting the queue (and every request's latency) grow.

Error choices (OpenAI envelope throughout):
- 401: type "invalid_request_error", code "invalid_api_key" (as OpenAI).
- 413: type "invalid_request_error", code "request_too_large".
- 429: type "rate_limit_error", code "server_overloaded", header `Retry-After: <seconds>`; the OpenAI
  SDK retries 429 after honouring Retry-After.
- 503 while draining: type "service_unavailable", code "shutting_down", `Connection: close`.
- request timeout: 504, type "timeout_error", code "request_timeout" (streaming: the same envelope as an
  in-band `data:` frame, then `[DONE]`).
"""
from __future__ import annotations

import hmac
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import error_body

API_KEY_ENV = "FBSERVE_API_KEY"
PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")
MAX_STOP_STRINGS = 4  # OpenAI's limit
RETRY_AFTER_S = 1


@dataclass
class ServingConfig:
    """Operator limits; the defaults are what `fbserve serve` uses without flags."""

    api_keys: list[str] = field(default_factory=list)  # empty: no auth
    metrics_auth: bool = False  # /metrics needs a key too
    max_queue: int = 64  # engine requests waiting for a batch slot beyond the running ones
    request_timeout_s: float = 600.0
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int | None = None  # None: the context length is the only bound
    max_n: int = 8
    metrics_compat: str | None = None  # "vllm": also export vLLM's metric names


def load_api_keys(keys: Iterable[str] = (), key_file: str | None = None, env: dict | None = None) -> list[str]:
    """Keys from `--api-key` (repeatable), `--api-key-file` (one per line, # comments) and $FBSERVE_API_KEY
    (comma-separated); blanks dropped, order kept, duplicates removed."""
    env = os.environ if env is None else env
    found = [k.strip() for k in keys]
    if key_file:
        lines = Path(key_file).read_text().splitlines()
        found += [ln.strip() for ln in lines if not ln.strip().startswith("#")]
    found += [k.strip() for k in env.get(API_KEY_ENV, "").split(",")]
    return list(dict.fromkeys(k for k in found if k))


def key_matches(presented: str, keys: list[str]) -> bool:
    """Constant time in the key's content: every configured key is compared, none short-circuits."""
    given = presented.encode()
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given, key.encode())
    return ok


class Gate:
    """ASGI middleware: draining -> 503, auth -> 401, body size -> 413 (Content-Length or counted)."""

    def __init__(self, app: ASGIApp, state: Any) -> None:
        self.app = app
        self.state = state  # server.generation.ServerState: .config, .draining, .metrics

    def _protected(self, path: str) -> bool:
        if path == "/metrics":
            return self.state.config.metrics_auth
        return path.startswith(PROTECTED_PREFIXES)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        config: ServingConfig = self.state.config
        headers = dict(scope["headers"])
        if self.state.draining and path.startswith(PROTECTED_PREFIXES):
            self.state.metrics.requests_rejected.labels(reason="shutting_down").inc()
            await _reply(send, 503, "the server is shutting down", "shutting_down", {"connection": "close"})
            return
        if config.api_keys and self._protected(path):
            auth = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not key_matches(token.strip(), config.api_keys):
                await _reply(send, 401, "Incorrect API key provided. Pass it as `Authorization: Bearer <key>`.",
                             "invalid_api_key", {"www-authenticate": "Bearer"})
                return
        limit = config.max_body_bytes
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            self.state.metrics.requests_rejected.labels(reason="too_large").inc()
            await _reply(send, 413, f"the request body exceeds {limit} bytes", "request_too_large")
            return
        received = 0

        async def counted() -> Message:  # a chunked body has no Content-Length: count what arrives
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:  # FastAPI re-raises an HTTPException met while reading the body
                    raise HTTPException(413, f"the request body exceeds {limit} bytes")
            return message

        await self.app(scope, counted, send)


async def _reply(send: Send, status: int, message: str, code: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(error_body(status, message, code=code)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class Admission:
    """Counts engine requests admitted and not yet finished; refuses those that would overflow the queue.

    Capacity = batch slots + `max_queue`. Counted on the event loop only, so no lock is needed.
    """

    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        self.in_flight = 0

    def capacity(self, slots: int) -> int:
        return slots + self.max_queue

    def try_admit(self, n: int, slots: int) -> bool:
        if self.in_flight + n > self.capacity(slots):
            return False
        self.in_flight += n
        return True

    def release(self, n: int) -> None:
        self.in_flight = max(0, self.in_flight - n)
