"""Async plumbing between the engine's streams and HTTP: merging, SSE frames, disconnect handling."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from server.errors import APIError, ClientDisconnected, error_body, status_label

log = logging.getLogger("fbserve.server")
T = TypeVar("T")

DONE_FRAME = "data: [DONE]\n\n"
DISCONNECT_POLL_S = 0.05  # a cancelled request stops within one decode step of the client leaving


def sse_frame(payload: BaseModel | dict) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


_END = object()


class StreamTimeout(Exception):
    """The deadline of `merge_streams` passed; its streams were closed (their requests cancelled)."""


async def merge_streams(streams: list[AsyncIterator[T]],
                        deadline: float | None = None) -> AsyncIterator[tuple[int, T]]:
    """Interleave several async iterators as `(index, item)` in arrival order.

    An exception from any stream is re-raised here; past `deadline` (time.monotonic()), StreamTimeout is.
    Closing this generator (or cancelling its consumer) cancels every pump task, which closes each stream:
    the engine then drops those requests.
    """
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                queue.put_nowait((index, item))
            queue.put_nowait((index, _END))
        except Exception as exc:  # handed to the consumer; CancelledError is not caught
            queue.put_nowait((index, exc))
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            if deadline is None:
                index, item = await queue.get()
            else:
                try:  # asyncio.timeout, not wait_for: 3.11's wait_for can swallow an outer cancellation
                    async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                        index, item = await queue.get()
                except TimeoutError:
                    raise StreamTimeout() from None
            if item is _END:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def cancel_on_disconnect(request: Request, awaitable: Awaitable[T]) -> T:
    """Await `awaitable` in a task, cancelling it (and raising ClientDisconnected) if the client leaves.

    Used for non-streaming responses, where nothing else notices a disconnect before the work is done.
    """
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientDisconnected()
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


class SSEResponse(StreamingResponse):
    """`text/event-stream` whose body generator is always closed, so its `finally` cancels generation.

    Starlette cancels the stream on disconnect, but a generator suspended at `yield` (while its frame
    was being sent) would otherwise only be finalized by the garbage collector.
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None] | None = None,
                 **kwargs: Any) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **kwargs.pop("headers", {})}
        super().__init__(content, headers=headers, **kwargs)
        self.on_close = on_close  # runs last: accounting for a body that was never started is not lost

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
            if self.on_close is not None:
                self.on_close()


def in_band_error(exc: Exception) -> tuple[str, str]:
    """(requests_total status, SSE frame) for an error raised after the response started."""
    if isinstance(exc, APIError):
        return status_label(exc.status), sse_frame(error_body(exc.status, exc.message, exc.param, exc.code))
    log.error("stream failed: %s: %s", type(exc).__name__, exc)
    return "error", sse_frame(error_body(500, f"generation failed: {exc}"))


async def sse_events(first: T, rest: AsyncIterator[T], render: Callable[[T], str | None], head: list[str],
                     tail: Callable[[], list[str]], on_finish: Callable[[str], None]) -> AsyncIterator[str]:
    """SSE body: `head` frames, one frame per item (`render` may skip one), `tail()`, then `[DONE]`.

    An error mid-stream becomes an in-band error frame followed by `[DONE]`. However it ends (done,
    error, or closed because the client left), `rest` is closed and `on_finish(status)` is called.
    """
    status = "cancelled"  # unless we reach the end: the client left and Starlette closed us
    try:
        try:
            for frame in head:
                yield frame
            item: Any = first
            while item is not _END:
                frame = render(item)
                if frame is not None:
                    yield frame
                item = await anext(rest, _END)
            for frame in tail():
                yield frame
            status = "success"
        except Exception as exc:
            status, frame = in_band_error(exc)
            yield frame
        yield DONE_FRAME
    finally:
        aclose = getattr(rest, "aclose", None)
        if aclose is not None:
            await aclose()
        on_finish(status)
