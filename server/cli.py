"""`fbserve`: the command line. `serve` lives here; other packages register their own subcommands."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

log = logging.getLogger("fbserve.cli")

# Modules defining `register(subparsers) -> None`, which adds a subparser with `set_defaults(func=...)`.
SUBCOMMAND_MODULES = ["quant.cli", "cuda_ext.check"]
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


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.app import create_app

    device = resolve_device(args.device)

    def build_engine():  # runs in the app's loading thread, after the server listens
        from engine.engine import Engine
        from models.loader import load_model

        loaded = load_model(args.model, device)
        return Engine(loaded, max_batch=args.max_batch, max_seq_len=args.max_seq_len)

    failed: list[BaseException] = []
    config = uvicorn.Config(None, host=args.host, port=args.port, log_config=None,  # our logging config
                            log_level=args.log_level.lower(), access_log=True, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)

    def on_load_error(exc: BaseException) -> None:
        failed.append(exc)
        server.should_exit = True

    config.app = create_app(build_engine, device=device, on_load_error=on_load_error)
    server.run()
    return 1 if failed else 0


def add_serve_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="run the OpenAI-compatible HTTP server",
                              description="Serve a model over an OpenAI-compatible HTTP API.")
    p.add_argument("--model", default="default", help="'default' (embedded SmolLM2-135M-Instruct), a Hugging "
                                                      "Face or fbserve checkpoint directory, or a .gguf file")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together")
    p.add_argument("--max-seq-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   type=str.lower)
    p.set_defaults(func=serve)


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
