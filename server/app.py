"""The FastAPI app: `create_app(engine or engine factory)`, thin routes, error envelope, metrics.

With a factory, the model loads in a background thread once the server is up: `/health` and the API
answer 503 meanwhile, so orchestrators see the process alive and wait for it to become ready.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from engine import qdec
from engine.memory import KVCacheTooLarge
from server import routes_chat, routes_completions, routes_tokenize
from server.admission import Gate, ServingConfig
from server.generation import ServerState, check_model
from server.metrics import DEFAULT, ENGINE_PATHS, Metrics, kernel_paths
from server.model_card import model_card
from server.protocol import ModelCard, ModelList
from server.errors import install_error_handlers

log = logging.getLogger("fbserve.server")

QUANTIZATION_SUMMARY_KEYS = ("method", "bits", "group_size", "rank")


def _is_engine(obj: Any) -> bool:
    return hasattr(obj, "generate") and hasattr(obj, "tokenizer")


def _engine_device(engine: Any) -> str:
    device = getattr(engine, "device", None)
    if device is None:
        try:
            device = next(engine.loaded.model.parameters()).device
        except (AttributeError, StopIteration, TypeError):
            device = "cpu"
    return str(getattr(device, "type", device))


def create_app(engine: Any, *, device: str | None = None, metrics: Metrics | None = None,
               on_load_error: Callable[[BaseException], None] | None = None,
               config: ServingConfig | None = None) -> FastAPI:
    """Build the app around `engine`.

    `engine`: either a started Engine (the caller owns it), or a zero-argument factory returning a new,
    not yet started Engine: the app calls it in a background thread at startup, starts the engine, and
    shuts it down at exit. `on_load_error(exc)` is called (from that thread) if loading fails, e.g. to
    stop the server. `metrics`: defaults to the process-wide `server.metrics.DEFAULT`. `config`: the
    operator's limits (auth, queue, timeouts, sizes); `app.state.server.draining = True` starts refusing
    new API requests (the CLI sets it at SIGTERM).
    """
    factory = None if _is_engine(engine) else engine
    state = ServerState(metrics=metrics or DEFAULT, device=device or "cpu", config=config or ServingConfig())
    if factory is None:
        state.device = device or _engine_device(engine)
        state.set_engine(engine)
    state.metrics.bind_engine(lambda: state.engine, state.device)
    if state.config.metrics_compat == "vllm":
        state.metrics.enable_vllm_names(lambda: state.engine.model_name if state.engine is not None else "")

    def load() -> None:
        started = time.monotonic()
        try:
            built = factory()
            built.start()
        except BaseException as exc:
            state.load_error = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, KVCacheTooLarge):  # the operator's settings, not a bug: no traceback
                log.error("loading the model failed: %s", exc)
            else:
                log.exception("loading the model failed")
            if on_load_error is not None:
                on_load_error(exc)
            return
        state.set_engine(built)
        log.info("model %s ready on %s in %.1f s (context %d tokens); kernel paths: %s", built.model_name,
                 state.device, time.monotonic() - started, built.max_seq_len, kernel_paths(state.device))
        # This thread may exit now: the ~10x CPU slowdown once seen after it exited was OpenMP spinning,
        # fixed for every caller by the wait policy `engine/__init__.py` sets.

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = None
        if factory is not None:
            log.info("loading the model in the background on %s; /health is 503 until it is ready", state.device)
            loader = threading.Thread(target=load, name="fbserve-load", daemon=True)
            loader.start()
        try:
            yield
        finally:
            if loader is not None:
                await asyncio.to_thread(loader.join, 30)
                if state.engine is not None:
                    await asyncio.to_thread(state.engine.shutdown)

    app = FastAPI(title="fbserve", lifespan=lifespan)
    app.state.server = state
    app.state.metrics = state.metrics
    install_error_handlers(app)
    app.add_middleware(Gate, state=state)
    app.include_router(routes_completions.router)
    app.include_router(routes_chat.router)
    app.include_router(routes_tokenize.router)

    @app.get("/health")
    def health() -> JSONResponse:  # sync: the first kernel_paths() call imports the kernel modules
        engine_ = state.engine
        if state.draining:
            return JSONResponse({"status": "shutting_down", "ready": False}, status_code=503)
        if engine_ is None:
            body = ({"status": "error", "ready": False, "error": state.load_error} if state.load_error
                    else {"status": "loading", "ready": False})
            return JSONResponse(body, status_code=503)
        quant = engine_.loaded.quantization
        return JSONResponse({
            "status": "ok",
            "ready": True,
            "model": engine_.model_name,
            "device": state.device,
            "max_seq_len": engine_.max_seq_len,
            "prefill_chunk": getattr(engine_, "prefill_chunk", None),
            "kv_cache": engine_.kv_cache_status() if hasattr(engine_, "kv_cache_status") else None,
            "structured_outputs": (engine_.structured_outputs_status() if hasattr(engine_, "structured_outputs_status")
                                   else None),
            "quantization": {k: quant[k] for k in QUANTIZATION_SUMMARY_KEYS if k in quant} if quant else None,
            "kernel_paths": kernel_paths(state.device),
            "qdec": qdec.health(engine_.model) if hasattr(engine_, "model") else {"enabled": False,
                                                                                  "reason": "not configured"},
            **{path: (getattr(engine_, f"{path}_status")() if hasattr(engine_, f"{path}_status")
                      else {"enabled": False, "reason": "not this engine"}) for path in ENGINE_PATHS},
        })

    @app.get("/v1/models", response_model=ModelList)
    async def list_models() -> ModelList:
        engine_ = state.ready_engine()
        return ModelList(data=[model_card(engine_)])

    @app.get("/v1/models/{model:path}", response_model=ModelCard)
    async def retrieve_model(model: str) -> ModelCard:
        engine_ = state.ready_engine()
        check_model(model, engine_)
        return model_card(engine_)

    @app.get("/metrics")
    def metrics_endpoint() -> Response:  # sync: runs in the threadpool, off the event loop
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
