"""The KV cache sized to the memory free on its device (engine.memory): kept, shortened, or refused clearly."""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import psutil
import pytest
import torch

from engine import memory
from engine.memory import CONTEXT_STEP, FreeMemory, KVCacheTooLarge, kv_bytes_per_token, plan_kv_cache
from server import cli

GIB = 2**30


def test_a_cache_that_fits_is_kept():
    plan = plan_kv_cache(8, 2048, 23040, FreeMemory(4 * GIB, "test"), 0.8, explicit=False)
    assert (plan.slots, plan.max_seq_len, plan.requested_max_seq_len) == (8, 2048, 2048)
    assert plan.bytes == 8 * 2048 * 23040 and plan.budget_bytes == int(4 * GIB * 0.8)
    assert not plan.limited_by_memory


def test_the_default_context_shrinks_to_a_multiple_of_the_step(caplog):
    per_token = 128 * 1024  # Llama-3-8B's fp16 keys and values per token
    free = FreeMemory(int(1.5 * GIB), "test")  # 1.2 GiB budget: 1228 tokens per slot of 8
    with caplog.at_level(logging.WARNING, logger="fbserve.engine"):
        plan = plan_kv_cache(8, 8192, per_token, free, 0.8, explicit=False)
    assert plan.max_seq_len == 1228 // CONTEXT_STEP * CONTEXT_STEP == 1024 and plan.limited_by_memory
    assert plan.bytes <= plan.budget_bytes < plan.bytes + 8 * CONTEXT_STEP * per_token
    assert "instead of 8192" in caplog.text and "8 slots x 8192 tokens" in caplog.text


def test_an_explicit_context_that_does_not_fit_is_refused_with_the_numbers_and_flags():
    with pytest.raises(KVCacheTooLarge) as err:
        plan_kv_cache(8, 8192, 128 * 1024, FreeMemory(int(1.5 * GIB), "torch.cuda.mem_get_info(cuda:0)"), 0.8,
                      explicit=True)
    text = str(err.value)
    for part in ("8 slots x 8192 tokens", "8.00 GiB", "1.50 GiB free", "mem_get_info", "1228 tokens per slot",
                 "--max-batch", "--max-seq-len", "--kv-cache-fraction"):
        assert part in text, part
    assert "--kv-cache-dtype" not in text  # fp16 already
    with pytest.raises(KVCacheTooLarge, match="use --kv-cache-dtype float16"):
        plan_kv_cache(8, 8192, 256 * 1024, FreeMemory(int(1.5 * GIB), "test"), 0.8, explicit=True, element_bytes=4)


def test_too_little_memory_for_even_the_shortest_context_is_refused():
    with pytest.raises(KVCacheTooLarge, match="even 256 tokens per slot"):
        plan_kv_cache(8, 2048, 128 * 1024, FreeMemory(200 * 2**20, "test"), 0.8, explicit=False)
    # a requested length under the floor is the floor
    plan = plan_kv_cache(1, 100, 1000, FreeMemory(100_000, "test"), 1.0, explicit=False)
    assert plan.max_seq_len == 100
    with pytest.raises(KVCacheTooLarge, match="even 100 tokens"):
        plan_kv_cache(1, 100, 1000, FreeMemory(99_000, "test"), 1.0, explicit=False)
    with pytest.raises(ValueError, match="kv_cache_fraction"):
        plan_kv_cache(1, 100, 1000, FreeMemory(100_000, "test"), 1.5, explicit=False)


def test_bytes_per_token():
    assert kv_bytes_per_token(30, 3, 64, torch.float16) == 2 * 30 * 3 * 64 * 2  # SmolLM2-135M
    assert kv_bytes_per_token(32, 8, 128, torch.float32) == 2 * 32 * 8 * 128 * 4


def _cgroup(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n")
    return root


def test_free_host_memory_honours_a_container_limit(tmp_path):
    available = psutil.virtual_memory().available
    cpu = torch.device("cpu")
    assert memory.free_memory(cpu, tmp_path / "none").source == "MemAvailable"
    v2 = _cgroup(tmp_path / "v2", {"memory.max": str(3 * GIB), "memory.current": str(GIB)})
    free = memory.free_memory(cpu, v2)
    assert free.bytes == min(2 * GIB, available) and (free.source == "cgroup memory limit - usage") == (2 * GIB < available)
    assert memory.free_memory(cpu, _cgroup(tmp_path / "v2max", {"memory.max": "max", "memory.current": "5"})).source \
        == "MemAvailable"
    v1 = _cgroup(tmp_path / "v1", {"memory/memory.limit_in_bytes": str(GIB), "memory/memory.usage_in_bytes": str(GIB + 7)})
    assert memory.free_memory(cpu, v1).bytes == 0  # over its limit: nothing free
    cached = _cgroup(tmp_path / "v2cache", {"memory.max": str(3 * GIB), "memory.current": str(2 * GIB),
                                            "memory.stat": f"anon {GIB // 2}\ninactive_file {GIB}\nactive_file 5"})
    assert memory._cgroup_headroom(cached) == 2 * GIB  # the inactive page cache is reclaimable: free
    assert memory._cgroup_headroom(_cgroup(tmp_path / "v2bad", {"memory.max": "lots", "memory.current": "5"})) is None
    v1_none = _cgroup(tmp_path / "v1n", {"memory/memory.limit_in_bytes": "9223372036854771712",
                                          "memory/memory.usage_in_bytes": "5"})
    assert memory.free_memory(cpu, v1_none).source == "MemAvailable"


def test_free_gpu_memory_is_cudas_after_the_allocators_cache_is_returned(monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (calls.append(f"mem_get_info {device}"),
                                                                    (3 * GIB, 8 * GIB))[1])
    free = memory.free_memory(torch.device("cuda", 0))
    assert free == FreeMemory(3 * GIB, "torch.cuda.mem_get_info(cuda:0)")
    assert calls == ["empty_cache", "mem_get_info cuda:0"]


@pytest.fixture(scope="module")
def loaded():
    from models.loader import load_model

    return load_model("default")


def test_engine_shortens_its_default_context_and_reports_it(loaded, monkeypatch):
    """With little free memory the engine's default context shrinks (the cache really is that size, and a
    longer request is refused); /health's kv_cache block says why; an explicit length is refused instead."""
    from engine import engine as engine_module
    from engine.engine import Engine
    from engine.types import EngineError, GenerationRequest, SamplingParams

    per_token = kv_bytes_per_token(30, 3, 64, torch.float16)
    free = FreeMemory(int(2 * 700 * per_token / 0.8), "test")  # 700 tokens for 2 slots -> 512
    monkeypatch.setattr(engine_module, "free_memory", lambda device: free)
    eng = Engine(loaded, max_batch=2)
    status = eng.kv_cache_status()
    assert (eng.max_seq_len, status["max_seq_len"], status["requested_max_seq_len"]) == (512, 512, 2048)
    assert status["limited_by_memory"] and status["free_bytes_at_start"] == free.bytes
    assert status["bytes"] == eng.model.kv_cache_bytes() == 2 * 512 * per_token
    assert eng.model.model.layers[0].self_attn.kv_cache.k.shape[2] == 512
    eng.start()
    try:
        async def too_long():
            request = GenerationRequest("r", [1] * 500, SamplingParams(max_tokens=20))
            return [out async for out in eng.generate(request)]
        with pytest.raises(EngineError, match="maximum context length is 512"):
            asyncio.run(too_long())
    finally:
        eng.shutdown()
    with pytest.raises(KVCacheTooLarge, match="2 slots x 2048 tokens"):  # an explicit length: refused
        Engine(loaded, max_batch=2, max_seq_len=2048)


def test_serve_flags():
    parse = cli.build_parser().parse_args
    assert parse(["serve"]).kv_cache_fraction == 0.8
    assert parse(["serve", "--kv-cache-fraction", "0.5"]).kv_cache_fraction == 0.5
    assert parse(["serve"]).prefill_chunk is None and parse(["serve", "--prefill-chunk", "64"]).prefill_chunk == 64
    for bad in (["--kv-cache-fraction", "0"], ["--kv-cache-fraction", "1.5"], ["--max-seq-len", "0"],
                ["--prefill-chunk", "0"]):
        with pytest.raises(SystemExit):
            parse(["serve", *bad])
