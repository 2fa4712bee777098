"""The `fbserve` command line: subcommand registration and `serve`'s options."""
from __future__ import annotations

import argparse
import subprocess
import sys
import types

import pytest

from server import cli


def test_help_lists_serve():
    out = subprocess.run([sys.executable, "-m", "server.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "serve" in out.stdout


def test_serve_options():
    args = cli.build_parser().parse_args(["serve", "--model", "/m", "--port", "9000", "--device", "cpu",
                                          "--max-batch", "4", "--max-seq-len", "256", "--log-level", "DEBUG"])
    assert (args.model, args.port, args.device, args.max_batch, args.max_seq_len, args.log_level) == \
        ("/m", 9000, "cpu", 4, 256, "debug")
    assert args.func is cli.serve
    defaults = cli.build_parser().parse_args(["serve"])
    assert (defaults.model, defaults.host, defaults.device) == ("default", "127.0.0.1", "auto")
    assert (defaults.threads, defaults.decode_threads) == (None, None)
    threads = cli.build_parser().parse_args(["serve", "--threads", "4", "--decode-threads", "2"])
    assert (threads.threads, threads.decode_threads) == (4, 2)
    assert defaults.prefix_caching == "on"
    assert cli.build_parser().parse_args(["serve", "--prefix-caching", "off"]).prefix_caching == "off"
    assert defaults.kv_cache_dtype == "auto"


def test_kv_cache_dtype_choices_are_the_models():
    from models.llama import KV_CACHE_DTYPES

    for name in KV_CACHE_DTYPES:
        assert cli.build_parser().parse_args(["serve", "--kv-cache-dtype", name]).kv_cache_dtype == name
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--kv-cache-dtype", "fp8"])


def test_subcommand_modules(monkeypatch, caplog):
    def register(subparsers):
        subparsers.add_parser("extra").set_defaults(func=lambda args: 7)

    monkeypatch.setitem(sys.modules, "fake_ext", types.SimpleNamespace(register=register))
    monkeypatch.setitem(sys.modules, "broken_ext", types.SimpleNamespace())
    monkeypatch.setattr(cli, "SUBCOMMAND_MODULES", ["fake_ext", "no_such_pkg.check", "broken_ext"])
    assert cli.main(["extra"]) == 7
    assert "no_such_pkg.check unavailable: module not found" in caplog.text
    assert "broken_ext.register(subparsers) failed" in caplog.text  # logged, and serve still works


def test_missing_dependency_of_a_subcommand_module_is_not_hidden(monkeypatch, caplog):
    def fail(name):
        raise ModuleNotFoundError("No module named 'dep'", name="dep")

    monkeypatch.setattr(cli.importlib, "import_module", fail)
    parser = argparse.ArgumentParser()
    assert not cli.register_subcommands(parser.add_subparsers(), "quant.cli")
    assert "failed to import" in caplog.text


def test_resolve_device():
    assert cli.resolve_device("cpu") == "cpu"
    torch = pytest.importorskip("torch")
    assert cli.resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
