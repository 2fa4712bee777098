"""The generation engine: one worker thread runs prefill and batched decode; asyncio callers stream events.

Scheduling is continuous batching: between decode steps, waiting requests are prefilled into free KV
cache slots and join the batch; finished or cancelled ones leave and free their slot.
"""
from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator

import torch

from engine import qdec
from engine.memory import free_memory, kv_bytes_per_token, plan_kv_cache
from engine.prefix_cache import MIN_REUSE_FRACTION_INV, SlotPool, common_prefix_length
from engine.sequence import Sequence
from engine.structured import GrammarCompiler
from engine.types import EngineError, GenerationOutput, GenerationRequest, TokenLogprob
from models.llama import KV_CACHE_DTYPES, KVCache
from models.loader import LoadedModel

log = logging.getLogger("fbserve.engine")

# Prompt log-probabilities are computed from hidden states in chunks of this many positions, so a
# long echo prompt never materialises (T, vocab) logits at once.
_LOGPROB_CHUNK = 256
# A prompt is prefilled this many tokens at a time, with a decode step of the running requests between
# chunks: a long prompt delays their next tokens by one chunk (~0.4 s on 2 cores), not by its whole prefill.
PREFILL_CHUNK = 256
MAX_BATCH = 16  # KV cache slots; `fbserve serve --max-batch` allows up to this


def _rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def openmp_wait_policy() -> str:
    """OMP_WAIT_POLICY as libgomp read it when torch loaded (see engine/__init__.py for why it matters)."""
    return os.environ.get("OMP_WAIT_POLICY", "").upper()


def cpu_threads(threads: int | None = None, decode_threads: int | None = None,
                team_step: bool = False) -> tuple[int, int]:
    """Intra-op threads of the CPU engine for (prefill, decode steps). Prefill: `threads`, else torch's
    count (OMP_NUM_THREADS or the physical cores). Decode: `decode_threads`, else, where the step is the
    native one-call step (`team_step`: one OpenMP team per step whose barriers spin briefly, then yield),
    the same count: 2 decode threads on 2 cores gave 106-130 tok/s vs 101 with one (bench/RESULTS.md,
    "CPU decode", runs 25-29). Else one fewer (at least 1): a Python step is thousands of small ops, and with
    every core in OpenMP the server's own threads (event loop, HTTP) preempt an OpenMP thread mid-step and
    the team waits: 2 threads on 2 cores decoded at 29 tok/s through the engine, 1 thread at 46 (run 11)."""
    if (threads is not None and threads < 1) or (decode_threads is not None and decode_threads < 1):
        raise ValueError(f"threads must be >= 1, got {threads} / {decode_threads}")
    prefill = threads if threads is not None else torch.get_num_threads()
    if decode_threads is not None:
        return prefill, decode_threads
    return prefill, prefill if team_step else max(1, prefill - 1)


def kv_cache_dtype_for(name: str, model_dtype: torch.dtype, device: torch.device) -> str:
    """The KV cache's dtype name for `name` ("auto" or a KV_CACHE_DTYPES name). "auto": fp16 for a model
    computing in fp32 on a CPU (half the memory, and half the bytes each decode step's attention reads; on
    SmolLM2 the same perplexity over 1024 teacher-forced decode steps, mean KL 6e-5 to an fp32 cache:
    bench/RESULTS.md "KV cache"), else the model's own dtype."""
    if name == "auto":
        if device.type == "cpu" and model_dtype == torch.float32:
            return "float16"
        return next((k for k, v in KV_CACHE_DTYPES.items() if v == model_dtype), "float16")
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be auto or one of {', '.join(KV_CACHE_DTYPES)}, got {name!r}")
    return name


class Engine:
    def __init__(self, loaded: LoadedModel, max_batch: int = 8, max_seq_len: int | None = None,
                 threads: int | None = None, decode_threads: int | None = None,
                 decode_graphs: bool | None = None, merge_projections: bool | None = None,
                 prefix_caching: bool = True, kv_cache_dtype: str = "auto", kv_cache_fraction: float = 0.8,
                 prefill_chunk: int | None = None) -> None:
        """`max_seq_len`: tokens per cache slot; None: the model's context up to 2048, shortened (logged) to what
        fits in `kv_cache_fraction` of the memory free after the weights loaded (engine.memory); a length
        given is kept or, if it does not fit there, refused with engine.memory.KVCacheTooLarge.
        `kv_cache_dtype`: "auto" (`kv_cache_dtype_for`) or a name of models.llama.KV_CACHE_DTYPES.
        `prefill_chunk`: tokens of a prompt prefilled per engine step (None: PREFILL_CHUNK; the same chunks
        whether or not other requests run, so a request's numbers never depend on them).
        `prefix_caching`: a prompt reuses the keys and values a free slot holds for its leading tokens
        (engine.prefix_cache). `decode_graphs`: None replays decode steps from CUDA graphs on a CUDA device
        (engine.cuda_graph_decode); False never; True also off CUDA, where the same static step runs eagerly (tests).
        `merge_projections`: None merges q/k/v and gate/up into one quantized layer each on a CUDA device
        (engine.merge); False never; True also off CUDA (tests: Triton under the interpreter)."""
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.model_name = loaded.name
        config = self.model.config
        requested_len = min(max_seq_len or 2048, config.max_position_embeddings)
        if not 1 <= max_batch <= MAX_BATCH:
            raise ValueError(f"max_batch must be in [1, {MAX_BATCH}], got {max_batch}")
        self.max_batch = max_batch
        self.prefill_chunk = PREFILL_CHUNK if prefill_chunk is None else prefill_chunk
        if self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.device = self.model.model.norm.weight.device
        self.merge_status: dict[str, object] = {"enabled": False, "reason": "not a CUDA device"}
        if merge_projections or (merge_projections is None and self.device.type == "cuda"):
            from engine.merge import merge_projections as merge  # before the graphs capture the module path

            self.merge_status = merge(self.model)
        elif merge_projections is False:
            self.merge_status = {"enabled": False, "reason": "disabled by the caller"}
        self.cpu_decoder = None
        self.threads: dict[str, int] | None = None  # CPU intra-op threads per phase (None on CUDA)
        if self.device.type == "cpu":  # the decode step's fast path (FBSERVE_CPU_DECODE=0 turns it off); before
            # the KV cache is sized: its weight copies take memory, the fp32 ones it replaces give some back
            from engine.cpu_decode import install

            self.cpu_decoder = install(self.model)
            team_step = (self.cpu_decoder is not None and self.cpu_decoder.native_layers is not None
                         and self.cpu_decoder.usable())  # QDEC hooks (attached before) make it decline
            prefill, decode = cpu_threads(threads, decode_threads, team_step)
            # sampling: a few ops over one vocabulary row each, where waking an OpenMP team costs more
            # than it shares (344 -> 224 us per request and token at 8 streams: bench/RESULTS.md "Sampling")
            self.threads = {"prefill": prefill, "decode": decode, "sample": 1}
            log.info("CPU threads: %d for prefill, %d for decode steps, 1 for sampling", prefill, decode)
        self.kv_cache_dtype = kv_cache_dtype_for(kv_cache_dtype, self.model.model.norm.weight.dtype, self.device)
        cache_dtype = KV_CACHE_DTYPES[self.kv_cache_dtype]
        self.model.drop_cache()  # a cache an earlier engine left on this model is not counted as taken
        per_token = kv_bytes_per_token(len(self.model.model.layers), config.num_key_value_heads, config.head_dim,
                                       cache_dtype)
        self.kv_plan = plan_kv_cache(max_batch, requested_len, per_token, free_memory(self.device),
                                     kv_cache_fraction, explicit=max_seq_len is not None,
                                     element_bytes=cache_dtype.itemsize)
        self.max_seq_len = self.kv_plan.max_seq_len
        self.model.setup_cache(max_batch, self.max_seq_len, cache_dtype)
        self.graph_decoder = None
        self.graph_reason: str | None = "not a CUDA device"
        if decode_graphs or (decode_graphs is None and self.device.type == "cuda"):
            from engine.cuda_graph_decode import install as install_graphs

            self.graph_decoder, self.graph_reason = install_graphs(
                self.model, max_batch, self.max_seq_len, capture=self.device.type == "cuda")
        elif decode_graphs is False:
            self.graph_reason = "disabled by the caller"
        eos = set(config.eos_ids())
        if getattr(self.tokenizer, "eos_token_id", None) is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_ids = eos
        self.grammars = GrammarCompiler(self.tokenizer, config.vocab_size, eos)
        self._inbox: queue.Queue[Sequence | None] = queue.Queue()
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._waiting: deque[Sequence] = deque()
        self._running: dict[int, Sequence] = {}  # by slot: prefilling (in _prefilling too) or decoding
        self._prefilling: deque[Sequence] = deque()
        self._slots = SlotPool(max_batch, reuse=prefix_caching)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # ---- public, called from the event loop --------------------------------------------------------
    def start(self) -> None:
        if self.device.type == "cpu" and openmp_wait_policy() != "PASSIVE":
            log.warning("OMP_WAIT_POLICY is %s: OpenMP threads busy-wait, which slows CPU decode up to ~10x on "
                        "a busy CPU; import `engine` before torch or set OMP_WAIT_POLICY=PASSIVE",
                        openmp_wait_policy() or "unset")
        self._thread = threading.Thread(target=self._loop, name="fbserve-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def validate(self, request: GenerationRequest) -> None:
        """Raise EngineError for a request that cannot run (the server answers 400)."""
        n = len(request.prompt_token_ids)
        if n == 0:
            raise EngineError("the prompt is empty")
        if n + request.params.max_tokens > self.max_seq_len:
            raise EngineError(
                f"this model's maximum context length is {self.max_seq_len} tokens, but the request has "
                f"{n} prompt tokens and asks for {request.params.max_tokens} completion tokens")
        vocab = self.model.config.vocab_size
        if any(t < 0 or t >= vocab for t in request.prompt_token_ids):
            raise EngineError(f"prompt token ids must lie in [0, {vocab})")
        bad = next((t for t in request.params.logit_bias if not 0 <= t < vocab), None)
        if bad is not None:
            raise EngineError(f"logit_bias: token id {bad} is outside the vocabulary [0, {vocab})", param="logit_bias")

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        """Stream a request's events; closing or cancelling the iterator cancels the request."""
        self.validate(request)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[GenerationOutput] = asyncio.Queue()

        def emit(event: GenerationOutput) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the consumer's event loop is closed: nobody is left to tell
                log.debug("dropped an event of %s: its event loop is closed", request.request_id)

        structured = request.params.structured  # a schema it cannot use raises EngineError here, like validate
        constraint = None if structured is None else self.grammars.constraint(structured)  # compiled: cached
        seq = Sequence(request, emit, self.eos_ids, self.tokenizer, constraint=constraint)
        self._inbox.put(seq)
        finished = False
        try:
            while True:
                event = await events.get()
                finished = event.finish_reason is not None
                yield event
                if finished:
                    return
        finally:
            if not finished:
                self.cancel(request.request_id)

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self._cancelled.add(request_id)
        self._inbox.put(None)  # wake the worker if idle

    def stats(self) -> dict:
        running = len(self._running)
        used = sum(s.position + 1 if s.output_ids else s.prefilled for s in list(self._running.values()))
        return {
            "running": running,
            "waiting": len(self._waiting) + self._inbox.qsize(),
            "kv_cache_bytes": self.model.kv_cache_bytes(),
            "kv_cache_used_ratio": used / (self.max_batch * self.max_seq_len),
            "prefix_cache_queried_tokens": self._slots.queried_tokens,
            "prefix_cache_hit_tokens": self._slots.hit_tokens,
            **qdec.stats(self.model),
        }

    def kv_cache_status(self) -> dict[str, object]:
        """/health's view of the KV cache: element dtype, bytes allocated, slots and tokens per slot; the
        length asked for, whether free memory shortened it, the budget and the free memory it came from."""
        plan = self.kv_plan
        return {"dtype": self.kv_cache_dtype, "bytes": self.model.kv_cache_bytes(), "slots": self.max_batch,
                "max_seq_len": self.max_seq_len, "requested_max_seq_len": plan.requested_max_seq_len,
                "limited_by_memory": plan.limited_by_memory, "budget_bytes": plan.budget_bytes,
                "free_bytes_at_start": plan.free.bytes, "free_memory_source": plan.free.source}

    def structured_outputs_status(self) -> dict[str, object]:
        """/health's view of `response_format` support (engine.structured)."""
        return self.grammars.status()

    def cpu_decode_status(self) -> dict[str, object]:
        """/health's view of the CPU decode fast path (engine.cpu_decode): on or off, its lm_head path,
        and the intra-op threads of prefill and decode steps (`threads`)."""
        if self.cpu_decoder is not None:
            return {**self.cpu_decoder.status(), "threads": self.threads}
        from engine.cpu_decode import unavailable_reason

        return {"enabled": False, "reason": unavailable_reason(self.model) or "not installed", "threads": self.threads}

    def prefix_cache_status(self) -> dict[str, object]:
        """/health's view of prefix reuse (engine.prefix_cache)."""
        return self._slots.status()

    def merged_projections_status(self) -> dict[str, object]:
        """/health's view of engine.merge: q/k/v and gate/up merged (how many layers) or why not."""
        return self.merge_status

    def cuda_graph_status(self) -> dict[str, object]:
        """/health's view of graphed decode (engine.cuda_graph_decode): on or off and why, graphs captured."""
        if self.graph_decoder is not None:
            return self.graph_decoder.status()
        return {"enabled": False, "reason": self.graph_reason}

    def _use_threads(self, phase: str) -> None:
        if self.threads is not None and torch.get_num_threads() != self.threads[phase]:
            torch.set_num_threads(self.threads[phase])

    def weight_bytes(self) -> dict[str, int]:
        """Model weight bytes by kind: `packed` low-bit weights, `scales` (+zeros), `branch` factors, `fp` rest,
        and the CPU paths' own copies (`cpu_int4`, `cpu_fp16`)."""
        out: dict[str, int] = {"fp": 0}
        seen: set[int] = {id(self.model.inv_freq)}
        for module in self.model.modules():
            if isinstance(module, KVCache):  # not weights
                seen.update(id(t) for t in module.buffers())
                continue
            report = getattr(module, "weight_bytes", None)
            if callable(report) and module is not self.model:
                for kind, n in report().items():
                    out[kind] = out.get(kind, 0) + n
                seen.update(id(t) for t in module.parameters(recurse=False))
                seen.update(id(t) for t in module.buffers(recurse=False))
        for t in list(self.model.parameters()) + list(self.model.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                out["fp"] += t.numel() * t.element_size()
        if self.cpu_decoder is not None:  # the CPU decode step's fp16 copies
            for kind, n in self.cpu_decoder.weight_bytes().items():
                out[kind] = out.get(kind, 0) + n
        return out

    def memory_report(self) -> dict[tuple[str, str], int]:
        """Bytes by (device, kind): `weights_<kind>` (packed, scales, branch, fp rest), `kv_cache_total`
        (allocated) and `kv_cache_used` (positions held by running requests), `pinned_residuals` (QDEC,
        host), process `rss`, CUDA `allocated`/`reserved`."""
        dev = self.device.type
        report = {(dev, f"weights_{k}"): v for k, v in self.weight_bytes().items()}
        stats = self.stats()
        report[(dev, "kv_cache_total")] = stats["kv_cache_bytes"]
        report[(dev, "kv_cache_used")] = int(stats["kv_cache_bytes"] * stats["kv_cache_used_ratio"])
        report[("cpu", "pinned_residuals")] = self._pinned_residual_bytes()
        report[("cpu", "rss")] = _rss_bytes()
        if dev == "cuda":
            report[("cuda", "allocated")] = torch.cuda.memory_allocated(self.device)
            report[("cuda", "reserved")] = torch.cuda.memory_reserved(self.device)
        return report

    def _pinned_residual_bytes(self) -> int:
        """Host bytes of QDEC residuals (modules reporting `residual_bytes()`; none until QDEC lands)."""
        total = 0
        for module in self.model.modules():
            report = getattr(module, "residual_bytes", None)
            if callable(report):
                total += int(report())
        return total

    # ---- the worker thread ----------------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            self._drain_inbox(block=not self._running and not self._waiting)
            self._drop_cancelled()
            try:
                self._admit()
                self._prefill_next()
                if any(seq.output_ids for seq in self._running.values()):
                    self._decode_step()
            except Exception as exc:  # a failed step fails its requests, never the worker
                log.exception("engine step failed")
                for seq in list(self._running.values()):
                    self._finish(seq, GenerationOutput(seq.request_id, finish_reason="error", error=str(exc)),
                                 cache_valid=False)

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            while True:
                if item is not None:
                    self._waiting.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _drop_cancelled(self) -> None:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
        if not cancelled:
            return
        self._waiting = deque(s for s in self._waiting if s.request_id not in cancelled)
        for seq in list(self._running.values()):
            if seq.request_id in cancelled:
                self._release(seq)
                log.info("request %s cancelled after %d tokens", seq.request_id, len(seq.output_ids))

    def _release(self, seq: Sequence, cache_valid: bool = True) -> None:
        """Free the slot; it keeps the keys and values of the tokens fed so far for a later prompt to reuse,
        unless `cache_valid` is False (a step failed part way: what it wrote cannot be trusted)."""
        if self._running.pop(seq.slot, None) is not None:
            self._slots.release(seq.slot, seq.fed_ids() if cache_valid else [])
        if seq in self._prefilling:
            self._prefilling.remove(seq)

    def _finish(self, seq: Sequence, event: GenerationOutput, cache_valid: bool = True) -> None:
        self._release(seq, cache_valid)
        seq.emit(event)

    def _admit(self) -> None:
        """Give waiting requests free slots (and the cached prefix another slot holds), in order; one whose
        prompt starts like a prompt still being prefilled (an `n` > 1 request's other choices, a resent
        prompt) waits until that one is done, to copy its keys and values rather than compute them again."""
        while self._waiting and len(self._slots) and not self._awaits_a_prefill(self._waiting[0]):
            seq = self._waiting.popleft()
            running = {slot: s.fed_ids() for slot, s in self._running.items()} if self._slots.reuse else None
            seq.slot, seq.cached_tokens, source = self._slots.acquire(
                seq.request.prompt_token_ids, reusable=seq.request.params.prompt_logprobs is None, running=running)
            if source is not None:  # another slot holds the prefix: copy it rather than compute it
                self.model.copy_cache_prefix(source, seq.slot, seq.cached_tokens)
            seq.prefilled = seq.cached_tokens
            self._running[seq.slot] = seq
            self._prefilling.append(seq)

    def _awaits_a_prefill(self, seq: Sequence) -> bool:
        """Whether `seq` would reuse enough of a prompt being prefilled (as the prefix cache counts it) that
        is not prefilled that far yet (never without prefix caching, or for a request wanting prompt log-probs)."""
        if not self._slots.reuse or seq.request.params.prompt_logprobs is not None:
            return False
        ids = seq.request.prompt_token_ids
        for other in self._prefilling:
            shared = min(common_prefix_length(other.request.prompt_token_ids, ids), len(ids) - 1)
            if shared * MIN_REUSE_FRACTION_INV >= len(ids) and other.prefilled < shared:
                return True
        return False

    def _prefill_next(self) -> None:
        """Prefill one chunk of the prompt with the fewest tokens left (admission order among equals): an engine
        step is at most one chunk and a decode step, so decoding requests wait for one chunk, not a whole
        prompt, and a short prompt that arrives while a long one is prefilled goes first."""
        if not self._prefilling:
            return
        seq = min(self._prefilling, key=lambda s: len(s.request.prompt_token_ids) - s.prefilled)
        try:
            self._use_threads("prefill")
            self._prefill_chunk(seq)
        except Exception as exc:
            log.exception("prefill of %s failed", seq.request_id)
            self._finish(seq, GenerationOutput(seq.request_id, finish_reason="error", error=str(exc)),
                         cache_valid=False)
        if seq.prefilled == len(seq.request.prompt_token_ids) and seq in self._prefilling:
            self._prefilling.remove(seq)

    def _prefill_chunk(self, seq: Sequence) -> None:
        """Prefill the next `prefill_chunk` prompt tokens of `seq`; after the last, sample its first token."""
        ids = seq.request.prompt_token_ids
        start = seq.prefilled  # keys and values of ids[:start] are already in the slot
        end = min(start + self.prefill_chunk, len(ids))
        if seq.prefill_started_at is None:
            seq.prefill_started_at = time.monotonic()
            if seq.request.params.prompt_logprobs is not None:
                seq.prompt_logprobs = [None]  # the first token has none
        tokens = torch.tensor([ids[start:end]], dtype=torch.long, device=self.device)
        positions = torch.arange(start, end, device=self.device)[None]
        slots = torch.tensor([seq.slot], device=self.device)
        hidden = self.model.hidden_states(tokens, positions, slots)  # (1, end - start, hidden)
        if seq.prompt_logprobs is not None:
            seq.prompt_logprobs += self._prompt_logprobs(hidden[0], ids, start, seq)
        seq.prefilled = end
        if end < len(ids):
            return
        queue_wait = seq.prefill_started_at - seq.submitted_at
        prompt_lp = seq.prompt_logprobs
        if seq.request.params.max_tokens == 0:
            self._finish(seq, GenerationOutput(seq.request_id, finish_reason="length", prompt_logprobs=prompt_lp,
                                               prompt_tokens=len(ids), queue_wait_s=queue_wait,
                                               cached_tokens=seq.cached_tokens))
            return
        logits = self.model.lm_head(hidden[0, -1]).float().cpu()
        self._use_threads("sample")
        self._sample(seq, logits, prompt_lp, queue_wait)

    def _prompt_logprobs(self, hidden: torch.Tensor, ids: list[int], offset: int,
                         seq: Sequence) -> list[TokenLogprob]:
        """Log-probability of each prompt token that follows a position of `hidden` (positions offset..)."""
        top = seq.request.params.prompt_logprobs or 0
        out: list[TokenLogprob] = []
        rows = min(hidden.shape[0], len(ids) - 1 - offset)  # the last prompt position predicts no prompt token
        for start in range(0, rows, _LOGPROB_CHUNK):
            end = min(start + _LOGPROB_CHUNK, rows)
            lp = torch.log_softmax(self.model.lm_head(hidden[start:end]).float(), dim=-1).cpu()  # (n, V)
            targets = torch.tensor(ids[offset + start + 1:offset + end + 1])
            chosen = lp.gather(1, targets[:, None])[:, 0]
            tops = torch.topk(lp, top, dim=-1) if top else None
            for i, tok in enumerate(targets.tolist()):
                alts = {int(t): float(v) for t, v in zip(tops.indices[i], tops.values[i])} if tops else {}
                out.append(TokenLogprob(tok, seq.detok.token_text(tok), float(chosen[i]), alts))
        return out

    def _decode_step(self) -> None:
        self._use_threads("decode")
        seqs = sorted((s for s in self._running.values() if s.output_ids), key=lambda s: s.slot)
        if self.graph_decoder is not None:
            logits = self.graph_decoder.step([s.output_ids[-1] for s in seqs], [s.position for s in seqs],
                                             [s.slot for s in seqs])
        else:
            tokens = torch.tensor([[s.output_ids[-1]] for s in seqs], dtype=torch.long, device=self.device)
            positions = torch.tensor([[s.position] for s in seqs], device=self.device)
            slots = torch.tensor([s.slot for s in seqs], device=self.device)
            logits = self.model(tokens, positions, slots, last_only=True)[:, 0].cpu()  # (B, V)
        self._use_threads("sample")
        for row, seq in enumerate(seqs):
            self._sample(seq, logits[row])

    def _sample(self, seq: Sequence, logits: torch.Tensor, prompt_logprobs: list[TokenLogprob | None] | None = None,
                queue_wait_s: float | None = None) -> None:
        """Sample `seq`'s next token and send its event; a failure there (a grammar with no token left, say)
        fails that request alone, not the batch."""
        try:
            event = seq.step(logits, prompt_logprobs, queue_wait_s)
        except Exception as exc:
            log.exception("sampling failed for %s", seq.request_id)
            self._finish(seq, GenerationOutput(seq.request_id, finish_reason="error", error=f"sampling failed: {exc}"),
                         cache_valid=False)
            return
        if event.finish_reason is not None:
            self._finish(seq, event)
        else:
            seq.emit(event)
