"""Shared fixtures. `fake_engine` implements the engine interface the server programs against
(engine.engine.Engine) with a character-level tokenizer, so server tests need no model; `engine` is the real
one on the default model."""
from __future__ import annotations

import glob
import os

# Without a GPU, Triton kernels run under its interpreter; this must be set before triton is imported.
# (A device node, not torch.cuda: torch must not be imported before `engine`, see engine/__init__.py.
# Any /dev/nvidiaN counts: a container given one GPU may expose only /dev/nvidia3.)
if not glob.glob("/dev/nvidia[0-9]*"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import asyncio
import random
import string
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from engine.types import EngineError, GenerationOutput, GenerationRequest, TokenLogprob

GREEDY_TEXT = "The capital of France is Paris. " * 4


class FakeTokenizer:
    """One token per character (ids = code points < 256); the chat template marks roles with <role>."""

    eos_token_id = 0

    def __len__(self) -> int:
        return 256

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(ch) % 256 for ch in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        if any(m["role"] == "tool" for m in messages):
            raise ValueError("this template has no tool role")
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


@dataclass
class FakeGrammars:
    """Stands for engine.structured.GrammarCompiler: records what it compiles; a schema saying FAIL is refused."""

    compiled: list = field(default_factory=list)

    def compile(self, spec) -> object:
        if spec.schema and "FAIL" in spec.schema:
            raise EngineError("the JSON schema cannot be used: FAIL", param="response_format")
        self.compiled.append(spec)
        return spec


@dataclass
class FakeEngine:
    """Greedy decoding replays GREEDY_TEXT; sampling draws letters from random.Random(seed).

    A prompt containing "FAIL" fails after two tokens (finish_reason "error"). Records every request,
    and the ids of requests closed before they finished (cancelled).
    """

    max_seq_len: int = 64
    max_batch: int = 8
    token_delay_s: float = 0.0
    model_name: str = "fake-model"
    tokenizer: FakeTokenizer = field(default_factory=FakeTokenizer)
    requests: list[GenerationRequest] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    running: int = 0
    cached_tokens: int = 0  # reported on each request's first event, as a prefix-cache hit
    started: bool = False
    loaded: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(quantization=None))
    grammars: FakeGrammars = field(default_factory=FakeGrammars)

    def start(self) -> None:
        self.started = True

    def shutdown(self) -> None:
        self.started = False

    def stats(self) -> dict:
        return {"running": self.running, "waiting": 0, "kv_cache_bytes": 1024, "kv_cache_used_ratio": 0.0,
                "prefix_cache_queried_tokens": 40, "prefix_cache_hit_tokens": 30}

    def memory_report(self) -> dict:
        return {("cpu", "kv_cache"): 1024}

    def weight_bytes(self) -> dict:
        return {"fp": 4096}

    @staticmethod
    def _logprob(token_id: int, k: int) -> TokenLogprob:
        top = {(token_id + j) % 256: -0.5 - j for j in range(k)}
        return TokenLogprob(token_id=token_id, token=chr(token_id), logprob=-0.5, top=top)

    async def generate(self, request: GenerationRequest):
        p = request.params
        if len(request.prompt_token_ids) + p.max_tokens > self.max_seq_len:
            raise EngineError(f"prompt of {len(request.prompt_token_ids)} tokens does not fit")
        self.requests.append(request)
        self.running += 1
        done = False
        try:
            first = GenerationOutput(request.request_id, prompt_tokens=len(request.prompt_token_ids),
                                     queue_wait_s=0.001, cached_tokens=self.cached_tokens)
            if p.prompt_logprobs is not None:
                first.prompt_logprobs = [None] + [self._logprob(t, p.prompt_logprobs)
                                                  for t in request.prompt_token_ids[1:]]
            if p.max_tokens == 0:
                first.finish_reason = "length"
                done = True
                yield first
                return
            rng = random.Random(p.seed)
            text, sent = "", 0  # like the real detokenizer, hold back text that may start a stop string
            for i in range(p.max_tokens):
                await asyncio.sleep(self.token_delay_s)
                if "FAIL" in self.tokenizer.decode(request.prompt_token_ids) and i == 2:
                    done = True
                    yield GenerationOutput(request.request_id, finish_reason="error", error="fake engine failure")
                    return
                ch = GREEDY_TEXT[i % len(GREEDY_TEXT)] if p.temperature == 0 else rng.choice(string.ascii_lowercase)
                text += ch
                out = first if i == 0 else GenerationOutput(request.request_id)
                out.token_ids, out.completion_tokens = [ord(ch)], i + 1
                if p.logprobs is not None:
                    out.logprobs = [self._logprob(ord(ch), p.logprobs)]
                hits = [text.index(s) for s in p.stop if s in text]
                if hits:
                    end, out.finish_reason = min(hits), "stop"
                elif i == p.max_tokens - 1:
                    end, out.finish_reason = len(text), "length"
                else:
                    held = max((k for s in p.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
                    end = len(text) - held
                out.text, sent = text[sent:end], max(sent, end)
                done = out.finish_reason is not None
                yield out
                if done:
                    return
        finally:
            self.running -= 1
            if not done:
                self.cancelled.append(request.request_id)


@pytest.fixture(scope="module")
def engine():
    """The real engine on the default model (fp32, 4 slots of 256 tokens), started; one per test module."""
    from engine.engine import Engine
    from models.loader import load_model

    eng = Engine(load_model("default"), max_batch=4, max_seq_len=256)
    eng.start()
    yield eng
    eng.shutdown()


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(fake_engine):
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.metrics import Metrics

    with TestClient(create_app(fake_engine, metrics=Metrics()), raise_server_exceptions=False) as c:
        yield c


def _cpu_kernel(monkeypatch, kind: str) -> None:
    """kind: "torch-int4", or "native-<isa>" (a build of fbserve's kernel, cuda_ext.cpu_native.ISAS)."""
    from cuda_ext import cpu_native

    if kind == "torch-int4":
        monkeypatch.setenv(cpu_native.ENV, "0")
    else:
        monkeypatch.delenv(cpu_native.ENV, raising=False)
        monkeypatch.setenv(cpu_native.ISA_ENV, kind.removeprefix("native-"))
    cpu_native._load.cache_clear()
    why = cpu_native.native_reason()
    if kind != "torch-int4" and why is not None:
        pytest.skip(f"fbserve's CPU kernel ({kind}) is unavailable here: {why}")


NATIVE_BUILDS = ["native-avx512bf16", "native-avx2"]


@pytest.fixture(params=[*NATIVE_BUILDS, "torch-int4"])
def cpu_kernel(request, monkeypatch):
    """Run the test once per CPU kernel of the cpu_int4 path: each build of fbserve's (cuda_ext/cpu_native.c;
    skipped, with the reason, where the CPU or compiler cannot run it) and torch's int4 op."""
    _cpu_kernel(monkeypatch, request.param)
    yield "native" if request.param.startswith("native") else request.param
    from cuda_ext import cpu_native

    cpu_native._load.cache_clear()


@pytest.fixture(params=NATIVE_BUILDS)
def native_kernel(request, monkeypatch):
    """fbserve's CPU kernel, once per build (skipped, with the reason, where unavailable)."""
    _cpu_kernel(monkeypatch, request.param)
    yield
    from cuda_ext import cpu_native

    cpu_native._load.cache_clear()


@pytest.fixture
def torch_int4(monkeypatch):
    """The cpu_int4 path on torch's int4 op (tests of that op's own pack and fusion)."""
    _cpu_kernel(monkeypatch, "torch-int4")
    yield
    from cuda_ext import cpu_native

    cpu_native._load.cache_clear()
