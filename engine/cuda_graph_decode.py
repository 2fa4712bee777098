"""Batch decode steps on CUDA replayed from CUDA graphs (one kernel-launch sequence per step, not
hundreds of Python-issued launches).

    decoder = install(model, max_batch, max_seq_len)    # None off CUDA / when declined; status() says why
    logits = decoder.step(token_ids, positions, slots)  # host lists of one step's rows -> fp32 (B, V) on CPU

A graph is captured on first use for each (batch bucket, cache-length bucket): batch 1, 2, 4, 8, 16 (up to
max_batch), cache length the next power of two from 128 (up to max_seq_len). The step's inputs live
in one static device buffer (3, max_batch) filled by one host-to-device copy per step; rows that pad the
batch up to its bucket point at a scratch KV slot (the cache gets max_batch + 1 slots), so they never
touch a live sequence. The graphed step is `Transformer.decode_hidden` + lm_head: the same operations
as the eager module path, with the cache read through `slots` up to the bucket length (masked beyond each
row's position) instead of up to the longest row.

QDEC's hooks are captured with the step (selection and gather on the side stream, forked and joined
inside the graph); its counters, which count in Python, are advanced per replay by the rows it ran (padding included).
Declined (status() says why; the engine decodes eagerly): FBSERVE_CUDA_GRAPH=0, a model not on CUDA,
other forward hooks, QDEC in a mode that needs the host (random/static selection, evaluation), or a
failed capture (logged with its exception; every later step runs eagerly).  `capture=False` runs the same static step
eagerly: how tests check the bucketing, padding and scratch slot on a CPU.
GPU status (H100, 2026-11-27, bench/RESULTS.md "Second GPU session"): replayed steps equal the module
path (fp16, bf16), the Engine serves through them (8.6 -> 84.1 tok/s at batch 1 on a random SmolLM2-shaped
model), and with QDEC captured the replays equal eager QDEC decode bitwise (tests/test_gpu_engine.py).
"""
from __future__ import annotations

import logging
import os

import torch
from torch import Tensor

log = logging.getLogger("fbserve.engine")
ENV = "FBSERVE_CUDA_GRAPH"
BATCH_BUCKETS = (1, 2, 4, 8, 16)
MIN_LENGTH_BUCKET = 128


def decline_reason(model: torch.nn.Module) -> str | None:
    """Why graphed decode cannot serve this model (None: it can)."""
    if os.environ.get(ENV, "1") == "0":
        return f"disabled ({ENV}=0)"
    from engine.qdec import graph_decline_reason

    q = getattr(model, "qdec", None)
    qdec_layers = set(q.layers) if q is not None and q.handles else set()
    hooked = [n for n, m in model.named_modules()
              if (m._forward_hooks or m._forward_pre_hooks) and n not in qdec_layers]
    if hooked:
        return f"forward hooks on {len(hooked)} modules: they run in Python once per call, not per replay"
    why = graph_decline_reason(model)
    if why is not None:
        return why
    if model.lm_head.weight.device.type != "cuda":
        return "the model is not on a CUDA device"
    return None


def buckets(max_batch: int, max_seq_len: int) -> tuple[list[int], list[int]]:
    """(batch buckets, cache-length buckets) for a cache of max_batch slots x max_seq_len positions."""
    batch = [b for b in BATCH_BUCKETS if b < max_batch] + [max_batch]
    lengths, n = [], MIN_LENGTH_BUCKET
    while n < max_seq_len:
        lengths.append(n)
        n *= 2
    return batch, lengths + [max_seq_len]


def bucket(value: int, sizes: list[int]) -> int:
    """The smallest size >= value."""
    for s in sizes:
        if s >= value:
            return s
    raise ValueError(f"{value} exceeds the largest bucket {sizes[-1]}")


class GraphDecoder:
    def __init__(self, model: torch.nn.Module, max_batch: int, max_seq_len: int, capture: bool = True) -> None:
        self.model = model
        self.device = model.lm_head.weight.device
        self.capture = capture
        self.batch_buckets, self.length_buckets = buckets(max_batch, max_seq_len)
        self.scratch_slot = max_batch
        model.setup_cache(max_batch + 1, max_seq_len)  # the last slot takes the padding rows' writes
        self.inputs = torch.zeros((3, max_batch), dtype=torch.long, device=self.device)  # tokens, positions, slots
        self.host = torch.zeros((3, max_batch), dtype=torch.long, pin_memory=self.device.type == "cuda")
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.failed: str | None = None
        self.replays = 0
        self.qdec_per_row: dict[tuple[int, int], tuple[int, int]] = {}  # graph -> QDEC (channels, bytes) per row

    def status(self) -> dict[str, object]:
        """/health's "cuda_graph" object."""
        live = self.capture and self.failed is None
        return {"enabled": live, "reason": self.failed or (None if self.capture else "capture off (eager static step)"),
                "captured": sorted(f"b{b}xL{n}" for b, n in self.graphs), "replays": self.replays}

    def _forward(self, b: int, length: int) -> Tensor:
        """The static step on the first b rows of the input buffer: fp32 logits (b, V)."""
        tokens, positions, slots = self.inputs[0, :b, None], self.inputs[1, :b, None], self.inputs[2, :b]
        h = self.model.decode_hidden(tokens, positions, slots, length)
        return self.model.lm_head(h[:, -1]).float()

    def _capture(self, b: int, length: int) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        q = getattr(self.model, "qdec", None)
        before = (q.counters.channels, q.counters.bytes) if q is not None else None
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up off the capture: Triton compiles, cuBLAS workspaces
            for _ in range(2):
                self._forward(b, length)  # rewrites this step's own KV entries with the same values
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the server's other threads (metrics scrapes, HTTP) may call CUDA meanwhile
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = self._forward(b, length)
        if q is not None:  # QDEC's hooks counted 3 steps of b rows in Python: undo; replays count per row
            per_row = ((q.counters.channels - before[0]) // (3 * b), (q.counters.bytes - before[1]) // (3 * b))
            q.counters.channels, q.counters.bytes = before
            self.qdec_per_row[(b, length)] = per_row
        log.info("CUDA graph captured for decode batch %d, cache length %d", b, length)
        return graph, out

    @torch.inference_mode()
    def step(self, token_ids: list[int], positions: list[int], slots: list[int]) -> Tensor:
        """fp32 logits (B, V) on the CPU for one decode step of B rows (host lists, one entry per row)."""
        n = len(token_ids)
        b = bucket(n, self.batch_buckets)
        length = bucket(max(positions) + 1, self.length_buckets)
        self.host[:, :n] = torch.tensor([token_ids, positions, slots])
        self.host[:2, n:b] = 0
        self.host[2, n:b] = self.scratch_slot
        self.inputs[:, :b].copy_(self.host[:, :b], non_blocking=True)
        if not self.capture or self.failed is not None:
            return self._forward(b, length)[:n].cpu()
        key = (b, length)
        if key not in self.graphs:
            try:
                self.graphs[key] = self._capture(b, length)
            except Exception as e:  # noqa: BLE001 - logged, shown in /health, eager from now on
                self.failed = f"capture failed for batch {b}, length {length}: {e!r}"[:300]
                log.exception("CUDA graph decode off, decoding eagerly: %s", self.failed)
                torch.cuda.synchronize(self.device)
                return self._forward(b, length)[:n].cpu()
        graph, out = self.graphs[key]
        graph.replay()
        self.replays += 1
        if key in self.qdec_per_row:  # QDEC's hooks do not run in a replay: count its b rows' fetches
            q = self.model.qdec  # (padding rows fetch too, as in the eager static step)
            q.counters.channels += b * self.qdec_per_row[key][0]
            q.counters.bytes += b * self.qdec_per_row[key][1]
        return out[:n].cpu()  # waits for the replay; the pinned inputs can be refilled after


def install(model: torch.nn.Module, max_batch: int, max_seq_len: int,
            capture: bool | None = None) -> tuple[GraphDecoder | None, str | None]:
    """(decoder, None) or (None, why not). `capture` defaults to True; False (any device) runs the
    static step eagerly, which is how CPU tests exercise it."""
    if capture is None or capture:
        why = decline_reason(model)
        if why is not None:
            log.info("CUDA graph decode off: %s", why)
            return None, why
        capture = True
    return GraphDecoder(model, max_batch, max_seq_len, capture), None
