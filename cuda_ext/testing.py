"""Random quantized layers and error metrics shared by tests and benchmarks (never zeros)."""
from __future__ import annotations

import statistics
from collections.abc import Callable

import torch

from .packing import PackedWeight, layout_dims, pack


def random_codes(n: int, k: int, bits: int, group_size: int, seed: int = 0,
                 device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """quant-convention tensors of a random layer: codes uint8 (N, K), scales fp16 (N, G) in
    [0.004, 0.02), zeros fp16 (N, G) integers in [0, 2**bits - 1]."""
    g = torch.Generator().manual_seed(seed)
    groups = -(-k // group_size)
    codes = torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.uint8)
    scales = (torch.rand(n, groups, generator=g) * 0.016 + 0.004).half()
    zeros = torch.randint(0, 1 << bits, (n, groups), generator=g).half()
    return codes.to(device), scales.to(device), zeros.to(device)


def random_layer(n: int, k: int, bits: int, group_size: int, rank: int = 0, seed: int = 0,
                 device: str | torch.device = "cpu"
                 ) -> tuple[PackedWeight, torch.Tensor | None, torch.Tensor | None]:
    """(packed weight, A fp16 (r, K) or None, B fp16 (N, r) or None) of a random layer, packed on `device`
    (the same words on every device; packing a Llama-sized layer on the CPU takes seconds)."""
    packed = pack(*random_codes(n, k, bits, group_size, seed, device=device), bits, group_size)
    if not rank:
        return packed, None, None
    g = torch.Generator().manual_seed(seed + 1)
    a = (torch.randn(rank, k, generator=g) * 0.05).half().to(device)
    b = (torch.randn(n, rank, generator=g) * 0.05).half().to(device)
    return packed, a, b


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """mean |y - ref| / mean |ref| in fp32 (Marlin's test metric)."""
    y, ref = y.float(), ref.float()
    return float((y - ref).abs().mean() / ref.abs().mean().clamp_min(1e-12))


def random_packed(n: int, k: int, bits: int, group_size: int, device: str | torch.device = "cuda") -> PackedWeight:
    """A PackedWeight of random words made directly on `device` (benchmarks: every int32 is a valid
    packing, so no codes need packing; padding is not zero here)."""
    d = layout_dims(k, n, bits)
    groups = -(-k // group_size)
    qweight = torch.randint(-2 ** 31, 2 ** 31 - 1, (d["rows"], d["n_pad"]), dtype=torch.int32, device=device)
    scales = (torch.rand(groups, d["n_pad"], device=device) * 0.016 + 0.004).half()
    zeros = torch.randint(0, 1 << bits, (groups, d["n_pad"]), device=device).half()
    return PackedWeight(qweight, scales, zeros, bits, group_size, k, n)


def cuda_median_ms(fn: Callable[[], object], reps: int = 30, warm: int = 3) -> float:
    """Median milliseconds of fn() over `reps` calls timed with CUDA events, after `warm` untimed calls."""
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def cuda_graph_ms(step: Callable[[], None], reps: int = 20) -> float:
    """Median ms of one replay of a CUDA graph capturing step() (what a served decode step costs: no
    launch overhead); two warm-up calls outside the graph compile the Triton kernels and allocate."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    ms = cuda_median_ms(g.replay, reps, warm=1)
    del g
    return ms
