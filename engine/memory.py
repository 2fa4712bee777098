"""How much memory the KV cache may take, and the context length that fits in it.

The cache is preallocated (slots x max_seq_len tokens), so a context that does not fit would fail at start-up
on a GPU (CUDA out of memory) or, on a CPU, be killed by the kernel's OOM killer once the cache fills. The
plan is made after the weights are loaded: the cache may take `fraction` of the memory then free on its
device. A context length the operator asked for is kept or refused; the default one shrinks to fit.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

log = logging.getLogger("fbserve.engine")

CONTEXT_STEP = 256  # a shrunk context is a multiple of this many tokens
MIN_CONTEXT = 256   # fewer tokens than this is refused (or the requested length, if shorter)
CGROUP_ROOT = Path("/sys/fs/cgroup")


class KVCacheTooLarge(ValueError):
    """The KV cache the operator asked for does not fit in the memory free on its device."""


@dataclass(frozen=True)
class FreeMemory:
    bytes: int
    source: str  # where the figure comes from, for logs and /health


@dataclass(frozen=True)
class KVCachePlan:
    slots: int
    max_seq_len: int
    requested_max_seq_len: int
    bytes: int          # slots x max_seq_len x bytes per token
    budget_bytes: int   # fraction x free
    free: FreeMemory

    @property
    def limited_by_memory(self) -> bool:
        return self.max_seq_len < self.requested_max_seq_len


def _cgroup_headroom(root: Path = CGROUP_ROOT) -> int | None:
    """Bytes this process's memory cgroup may still grow by (a container's limit), or None without a limit.
    Usage counts the page cache; its inactive file pages are reclaimable, so they count as free (the
    "working set" that docker stats and the kubelet report)."""
    for limit_file, usage_file, stat_file, inactive_key in (
            ("memory.max", "memory.current", "memory.stat", "inactive_file"),  # cgroup v2
            ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "memory/memory.stat",
             "total_inactive_file")):  # v1
        try:
            limit_text = (root / limit_file).read_text().strip()
            usage = int((root / usage_file).read_text().strip())
            limit = None if limit_text == "max" else int(limit_text)
        except (OSError, ValueError):
            continue
        if limit is None or limit >= 1 << 60:  # v1 writes "no limit" as a huge page-aligned number
            return None
        try:
            stats = dict(line.split() for line in (root / stat_file).read_text().splitlines() if line.strip())
            usage -= min(int(stats.get(inactive_key, 0)), usage)
        except (OSError, ValueError):
            pass
        return max(limit - usage, 0)
    return None


def free_memory(device: torch.device, cgroup_root: Path = CGROUP_ROOT) -> FreeMemory:
    """Memory free on `device` now: CUDA's free bytes (after torch's allocator returns the blocks it caches
    unused), or the host's available RAM (within a container's limit)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        free, _total = torch.cuda.mem_get_info(device)
        return FreeMemory(int(free), f"torch.cuda.mem_get_info({device})")
    available = FreeMemory(int(psutil.virtual_memory().available), "MemAvailable")
    headroom = _cgroup_headroom(cgroup_root)
    if headroom is not None and headroom < available.bytes:
        return FreeMemory(headroom, "cgroup memory limit - usage")
    return available


def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Keys and values of one token in every layer."""
    return 2 * layers * kv_heads * head_dim * dtype.itemsize


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def plan_kv_cache(slots: int, max_seq_len: int, per_token: int, free: FreeMemory, fraction: float,
                  explicit: bool, element_bytes: int = 2) -> KVCachePlan:
    """The cache for `slots` sequences of `max_seq_len` tokens if it fits in `fraction` of `free`; else, when
    the length was not the operator's (`explicit` False), the longest multiple of CONTEXT_STEP tokens that
    fits (at least MIN_CONTEXT). Raises KVCacheTooLarge, naming the numbers and the flags, otherwise
    (`element_bytes`: the cache dtype's width; a wider one than fp16 is worth naming)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"kv_cache_fraction must be in (0, 1], got {fraction}")
    budget = int(free.bytes * fraction)
    per_slot_token = slots * per_token

    def plan(length: int) -> KVCachePlan:
        return KVCachePlan(slots, length, max_seq_len, length * per_slot_token, budget, free)

    if max_seq_len * per_slot_token <= budget:
        return plan(max_seq_len)
    fits = budget // per_slot_token
    floor = min(MIN_CONTEXT, max_seq_len)
    need = (f"a KV cache of {slots} slots x {max_seq_len} tokens needs {_gib(max_seq_len * per_slot_token)}, "
            f"but {fraction:g} of the {_gib(free.bytes)} free ({free.source}) is {_gib(budget)}")
    narrower = ", use --kv-cache-dtype float16" if element_bytes > 2 else ""
    advice = f"lower --max-batch or --max-seq-len{narrower}, or raise --kv-cache-fraction"
    if explicit:
        raise KVCacheTooLarge(f"{need}: {fits} tokens per slot would fit; {advice}")
    length = fits // CONTEXT_STEP * CONTEXT_STEP
    if length < floor:
        raise KVCacheTooLarge(f"{need}: even {floor} tokens per slot do not fit; {advice}")
    log.warning("%s: the context is %d tokens instead of %d (--max-seq-len and --max-batch choose)", need,
                length, max_seq_len)
    return plan(length)
