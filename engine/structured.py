"""Structured outputs: a JSON grammar (xgrammar) masks, at every step, the tokens a response may not take next.

`GrammarCompiler` turns a `StructuredOutput` into a compiled grammar over the model's vocabulary (built on
first use: xgrammar's import and the tokenizer's byte table take ~0.5 s; compiled grammars are cached).
Each running sequence holds its own `TokenConstraint`, a matcher over a shared compiled grammar. JSON is
generated compact (no whitespace between tokens of the syntax): a small model cannot then spend its tokens
on newlines, and every answer parses with `json.loads`.
"""
from __future__ import annotations

import importlib.metadata
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from torch import Tensor

from engine.types import STRUCTURED_KINDS, EngineError, StructuredOutput

log = logging.getLogger("fbserve.engine")

ANY_JSON_OBJECT = '{"type": "object"}'
XGRAMMAR_SOURCE_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")  # "[10:13:24] /project/cpp/x.cc:4944: "
CACHED_GRAMMARS = 32  # compiled grammars kept (least recently used dropped): ~1.3 MB each with length bounds


def xgrammar_version() -> str | None:
    try:
        return importlib.metadata.version("xgrammar")
    except importlib.metadata.PackageNotFoundError:
        return None


class GrammarCompiler:
    """Compiles response formats for one tokenizer and vocabulary; thread-safe, cached."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Iterable[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the logits' width (may exceed the tokenizer's own size)
        self.stop_token_ids = sorted(stop_token_ids)
        self._compiler: Any = None
        self._unavailable: str | None = None  # why there is no compiler, once trying to build one failed
        self._cache: OrderedDict[StructuredOutput, Any] = OrderedDict()
        self._lock = threading.Lock()

    def _xgrammar_compiler(self) -> Any:
        """xgrammar's compiler for this tokenizer; EngineError, logged once, where there can be none (xgrammar
        not installed, a tokenizer it cannot read)."""
        with self._lock:
            if self._compiler is None and self._unavailable is None:
                try:
                    import xgrammar as xgr

                    info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                              stop_token_ids=self.stop_token_ids)
                    # its own cache is unbounded (~1.3 MB per schema with length bounds: 1,000 distinct schemas
                    # took 1.3 GB); grammars are cached here instead, CACHED_GRAMMARS at most
                    self._compiler = xgr.GrammarCompiler(info, cache_enabled=False)
                    log.info("structured outputs: xgrammar %s over %d tokens", xgrammar_version(), self.vocab_size)
                except Exception as exc:  # ImportError, or whatever xgrammar raises for this tokenizer
                    self._unavailable = f"{type(exc).__name__}: {exc}"
                    log.error("structured outputs unavailable: %s", self._unavailable)
            if self._compiler is None:
                raise EngineError(f"structured outputs are unavailable on this server ({self._unavailable})",
                                  param="response_format")
            return self._compiler

    def compile(self, spec: StructuredOutput) -> Any:
        """The compiled grammar of `spec`; EngineError (param response_format) for a schema it cannot use."""
        with self._lock:
            if spec in self._cache:
                self._cache.move_to_end(spec)
                return self._cache[spec]
        compiler = self._xgrammar_compiler()
        try:
            if spec.kind == "json_object" or spec.schema is None:
                # strict_mode off: an object with any properties (strict mode would allow only `{}`)
                grammar = compiler.compile_json_schema(ANY_JSON_OBJECT, any_whitespace=False, strict_mode=False)
            elif spec.kind == "json_schema":
                grammar = compiler.compile_json_schema(spec.schema, any_whitespace=False)
            else:
                raise EngineError(f"unknown response format {spec.kind!r}", param="response_format")
        except (RuntimeError, ValueError) as exc:  # xgrammar's errors for schemas it cannot turn into a grammar
            reason = XGRAMMAR_SOURCE_PREFIX.sub("", str(exc)).strip()
            raise EngineError(f"the JSON schema cannot be used: {reason}", param="response_format") from exc
        with self._lock:
            self._cache[spec] = grammar
            while len(self._cache) > CACHED_GRAMMARS:
                self._cache.popitem(last=False)
        return grammar

    def constraint(self, spec: StructuredOutput) -> TokenConstraint:
        return TokenConstraint(self.compile(spec), self.vocab_size)

    def status(self) -> dict[str, object]:
        """/health: the backend, whether it is loaded (or why it cannot be), how many grammars are cached."""
        return {"backend": "xgrammar", "loaded": self._compiler is not None, "version": xgrammar_version(),
                "error": self._unavailable, "formats": ["text", *STRUCTURED_KINDS],
                "cached_grammars": len(self._cache)}


class TokenConstraint:
    """One sequence's place in its grammar: which tokens may come next, and the tokens taken so far."""

    def __init__(self, compiled: Any, vocab_size: int) -> None:
        import xgrammar as xgr

        self._apply = xgr.apply_token_bitmask_inplace
        self.matcher = xgr.GrammarMatcher(compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)  # (1, ceil(V / 32)) int32; token 32 i + j: bit j of i

    def mask(self, logits: Tensor) -> Tensor:
        """Set the logits (V,) fp32 of every token the grammar forbids here to -inf, in place."""
        self.matcher.fill_next_token_bitmask(self.bitmask)
        if not self.bitmask.any():  # a schema whose grammar leads nowhere: no answer can follow it
            raise RuntimeError("the response format's grammar allows no next token")
        self._apply(logits.unsqueeze(0), self.bitmask)
        return logits

    def accept_if_allowed(self, token_id: int) -> bool:
        """Take `token_id` if the grammar allows it here (no mask computed); False leaves the state as it was."""
        return self.matcher.accept_token(token_id)

    def accept(self, token_id: int) -> None:
        if not self.matcher.accept_token(token_id):
            raise RuntimeError(f"token {token_id} was sampled although the grammar forbids it")

    @property
    def terminated(self) -> bool:
        """The grammar is complete and its stop token taken: nothing may follow."""
        return self.matcher.is_terminated()
