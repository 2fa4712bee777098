"""`fbserve`: the command line. `serve` lives here; other packages register their own subcommands."""
from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

import engine  # noqa: F401  # first, before anything imports torch: it sets OpenMP's wait policy

log = logging.getLogger("fbserve.cli")

# Modules defining `register(subparsers) -> None`, which adds a subparser with `set_defaults(func=...)`.
SUBCOMMAND_MODULES = ["quant.cli", "quant.eval_cli", "cuda_ext.check", "engine.qdec_tune"]
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def resolve_device(choice: str) -> str:
    """`auto` -> cuda when a GPU is visible, else cpu (logged either way)."""
    if choice != "auto":
        return choice
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    log.info("--device auto: using %s%s", device,
             f" ({torch.cuda.get_device_name(0)})" if device == "cuda" else " (no CUDA GPU visible)")
    return device


MAX_BATCH_LIMIT = 16


def _graceful_server(uvicorn: Any, config: Any, app_state: Any) -> Any:
    """A uvicorn.Server whose SIGTERM/SIGINT first marks the app draining (new API requests get 503,
    /health 503) and then lets uvicorn stop listening and wait for in-flight responses up to the grace
    period. A SIGTERM shutdown is a clean exit (status 0), as orchestrators expect."""

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            app_state.draining = True
            super().handle_exit(sig, frame)
            # uvicorn re-raises captured signals after its shutdown, which would end us with -SIGTERM.
            captured = getattr(self, "_captured_signals", None)
            if sig == signal.SIGTERM and captured and captured[-1] == sig:
                captured.pop()

    return Server(config)


def serving_config(args: argparse.Namespace) -> Any:
    from server.admission import ServingConfig, load_api_keys

    keys = load_api_keys(args.api_key or [], args.api_key_file)
    log.info("API keys: %s", f"{len(keys)} configured" if keys else "none (no authentication)")
    return ServingConfig(api_keys=keys, metrics_auth=args.metrics_auth, max_queue=args.max_queue,
                         request_timeout_s=args.request_timeout, max_body_bytes=args.max_body_bytes,
                         max_prompt_tokens=args.max_prompt_tokens, max_n=args.max_n,
                         metrics_compat=None if args.metrics_compat == "none" else args.metrics_compat)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.app import create_app

    device = resolve_device(args.device)
    serving = serving_config(args)

    def build_engine():  # runs in the app's loading thread, after the server listens
        from engine.engine import Engine
        from models.loader import load_model

        from engine.qdec_tune import attach_for_serving

        loaded = load_model(args.model, device)
        attach_for_serving(loaded, args)  # QDEC residuals when asked; never raises for bad residual files
        return Engine(loaded, max_batch=args.max_batch, max_seq_len=args.max_seq_len, threads=args.threads,
                      decode_threads=args.decode_threads, prefix_caching=args.prefix_caching == "on",
                      kv_cache_dtype=args.kv_cache_dtype, kv_cache_fraction=args.kv_cache_fraction,
                      prefill_chunk=args.prefill_chunk)

    failed: list[BaseException] = []
    config = uvicorn.Config(None, host=args.host, port=args.port, log_config=None,  # our logging config
                            log_level=args.log_level.lower(), access_log=True,
                            timeout_graceful_shutdown=args.shutdown_grace)

    def on_load_error(exc: BaseException) -> None:
        failed.append(exc)
        server.should_exit = True

    config.app = create_app(build_engine, device=device, on_load_error=on_load_error, config=serving)
    server = _graceful_server(uvicorn, config, config.app.state.server)
    server.run()
    return 1 if failed else 0


def add_serve_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="run the OpenAI-compatible HTTP server",
                              description="Serve a model over an OpenAI-compatible HTTP API.")
    p.add_argument("--model", default="default", help="'default' (embedded SmolLM2-135M-Instruct), a Hugging "
                                                      "Face or fbserve checkpoint directory, or a .gguf file")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    from engine.qdec_tune import add_serve_arguments

    add_serve_arguments(p)  # --residuals, --qdec-k-chunk, --qdec-budget
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--max-batch", type=_bounded_int(1, MAX_BATCH_LIMIT), default=8,
                   help=f"KV cache slots: requests decoded together (1..{MAX_BATCH_LIMIT})")
    p.add_argument("--max-queue", type=_bounded_int(0, None), default=64,
                   help="requests waiting for a slot beyond the running ones; more get 429 + Retry-After")
    p.add_argument("--request-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="cancel a request running longer (504; in-band error frame when streaming)")
    p.add_argument("--shutdown-grace", type=int, default=30, metavar="SECONDS",
                   help="at SIGTERM, how long in-flight responses may finish")
    p.add_argument("--api-key", action="append", metavar="KEY",
                   help="require `Authorization: Bearer KEY` on /v1/*, /tokenize, /detokenize (repeatable; "
                        "also --api-key-file and $FBSERVE_API_KEY, comma-separated)")
    p.add_argument("--api-key-file", metavar="PATH", help="API keys, one per line")
    p.add_argument("--metrics-auth", action="store_true", help="/metrics requires an API key too")
    p.add_argument("--metrics-compat", choices=["none", "vllm"], default="none",
                   help="also export metrics under vLLM's names (vllm:...)")
    p.add_argument("--max-body-bytes", type=_bounded_int(1, None), default=1 << 20,
                   help="larger request bodies get 413")
    p.add_argument("--max-prompt-tokens", type=_bounded_int(1, None), default=None,
                   help="longer prompts get 400 (default: only the context length bounds them)")
    p.add_argument("--max-n", type=_bounded_int(1, 128), default=8, help="largest `n` (choices) per request")
    p.add_argument("--max-seq-len", type=_bounded_int(1, None), default=None,
                   help="context length, tokens per KV cache slot; refused at start-up if it does not fit in "
                        "--kv-cache-fraction (default: the model's, up to 2048, shortened to what fits)")
    p.add_argument("--threads", type=_bounded_int(1, None), default=None,
                   help="CPU: intra-op threads for prompts (default: torch's, OMP_NUM_THREADS or the physical cores)")
    p.add_argument("--decode-threads", type=_bounded_int(1, None), default=None,
                   help="CPU: intra-op threads for decode steps (default: --threads on fbserve's one-call step, "
                        "whose barriers yield the core; else --threads minus one, at least 1, leaving a core to the "
                        "server's event loop)")
    p.add_argument("--prefix-caching", choices=["on", "off"], default="on",
                   help="a prompt reuses the keys and values a free KV-cache slot still holds for its leading "
                        "tokens (the next turn of a chat, a shared system prompt) and prefills only the rest")
    p.add_argument("--kv-cache-dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto",
                   help="keys and values of the KV cache: auto = float16 for a model computing in float32 on a "
                        "CPU (half the memory of float32), else the model's dtype")
    p.add_argument("--prefill-chunk", type=_bounded_int(1, None), default=None, metavar="TOKENS",
                   help="prompts are prefilled this many tokens at a time (default 256), the one with the fewest "
                        "tokens left first, with a decode step of the running requests between chunks: their next "
                        "token waits for one chunk, not a whole prompt")
    p.add_argument("--kv-cache-fraction", type=_fraction, default=0.8, metavar="F",
                   help="the KV cache (--max-batch slots x --max-seq-len tokens) may take at most this fraction "
                        "of the memory free on the device once the weights are loaded (GPU memory, or available "
                        "RAM within a container's limit)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   type=str.lower)
    p.set_defaults(func=serve)


def _bounded_int(low: int, high: int | None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is not in [{low}, {high if high is not None else 'inf'}]")
        return value
    return parse


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not in (0, 1]")
    return value


def register_subcommands(subparsers: argparse._SubParsersAction, name: str) -> bool:
    """Let module `name` add its subcommands. A module that is absent is skipped with a warning; one that
    fails is skipped with its traceback logged, so a broken extra command never stops `fbserve serve`."""
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name not in {name.rsplit(".", i)[0] for i in range(name.count(".") + 1)}:
            log.exception("subcommands of %s unavailable: it failed to import", name)
            return False
        log.warning("subcommands of %s unavailable: module not found", name)
        return False
    except Exception:
        log.exception("subcommands of %s unavailable: it failed to import", name)
        return False
    try:
        module.register(subparsers)
    except Exception:
        log.exception("subcommands of %s unavailable: %s.register(subparsers) failed", name, name)
        return False
    return True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fbserve", description="Serve low-bit quantized LLMs.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_serve_parser(subparsers)
    for name in SUBCOMMAND_MODULES:
        register_subcommands(subparsers, name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    level = "INFO"
    if "--log-level" in argv and argv.index("--log-level") + 1 < len(argv):
        level = argv[argv.index("--log-level") + 1].upper()
    logging.basicConfig(level=level, format=LOG_FORMAT)
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
