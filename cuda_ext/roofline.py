"""Static byte model of one quant_matmul call: what the kernels' tiling moves vs the ideal.

Counted from the grid and config exactly as launch.py builds them: weight tiles (tail rows and
padded columns included), scale/zero loads (one per group and column tile, repeats in a short
tail block included), x re-read by every column tile, split-K partials written and read back,
the branch's t re-read by every column tile, B, bias, y.  Loads that repeat an address inside
one warp instruction count once (they coalesce); separate loads count every time (no L1 or L2
reuse is assumed), so the ratio is an upper bound on DRAM traffic.
Ideal = packed weights (bits/8 per weight) + scales + zeros + A + B + x + y (+ bias).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import configs
from .launch import branch_grid, gemm_grid, rank_pad
from .packing import BLOCK_K, CHUNKS, layout_dims

# Linear stacks of one decoder layer, (N, K): fused qkv, o, fused gate_up, down.
MODELS: dict[str, list[tuple[int, int]]] = {
    "Llama-2-7B": [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)],
    "Llama-3-8B": [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)],
    "SmolLM2-135M": [(960, 576), (576, 576), (3072, 576), (576, 1536)],
}


L2_PARTS = ("x", "t", "split_k")  # small and re-read within microseconds: served by L2


@dataclass
class Traffic:
    """Bytes of one call by part, and the ideal bytes by part (same keys where they exist)."""
    parts: dict[str, int] = field(default_factory=dict)
    ideal_parts: dict[str, int] = field(default_factory=dict)

    def add(self, other: Traffic) -> Traffic:
        for mine, theirs in ((self.parts, other.parts), (self.ideal_parts, other.ideal_parts)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v
        return self

    @property
    def ideal(self) -> int:
        return sum(self.ideal_parts.values())

    @property
    def moved(self) -> int:
        return sum(self.parts.values())

    @property
    def ratio(self) -> float:
        """All bytes moved / ideal (no cache reuse between load instructions)."""
        return self.moved / self.ideal

    @property
    def dram_ratio(self) -> float:
        """The same with the L2_PARTS counted at their ideal size (their re-reads hit L2)."""
        moved = sum(v if k not in L2_PARTS else self.ideal_parts.get(k, 0) for k, v in self.parts.items())
        return moved / self.ideal

    def excess(self) -> dict[str, int]:
        """Bytes moved beyond the ideal, by part, largest first."""
        ex = {k: v - self.ideal_parts.get(k, 0) for k, v in self.parts.items()}
        return dict(sorted(((k, v) for k, v in ex.items() if v > 0), key=lambda kv: -kv[1]))


def _sz_loads(k: int, group: int, bits: int) -> tuple[int, int]:
    """(group loads per full block, group loads of the tail block that hit an existing group),
    as _block_dot issues them: once per `group // rows` chunks of each plane walked."""
    d = layout_dims(k, 16, bits)
    fields = 8 if bits == 4 else 16  # chunks per plane word walked
    rt, n_groups, kb = d["tail_rows"], -(-k // group), d["n_full"] * BLOCK_K
    tail = 0
    if rt:
        starts = [p * fields + g0 for p in range(CHUNKS // fields) for g0 in range(0, fields, group // rt)]
        tail = sum(1 for c0 in starts if (kb + c0 * rt) // group < n_groups)
    return BLOCK_K // group, tail


def ideal_parts(n: int, k: int, m: int, bits: int, group: int, rank: int, bias: bool = False) -> dict[str, int]:
    """The bytes a perfect kernel moves: every input read once, y written once."""
    g = -(-k // group)
    parts = {"weights": n * k * bits // 8, "scales_zeros": 2 * n * g * 2, "x": m * k * 2, "y": m * n * 2}
    if rank:
        parts.update(A=rank * k * 2, B=n * rank * 2)
    if bias:
        parts["bias"] = n * 2
    return parts


def call_traffic(n: int, k: int, m: int, bits: int, group: int, rank: int, arch: str, num_sms: int | None = None,
                 bias: bool = False) -> Traffic:
    """Bytes one quant_matmul call moves on `arch` (its config table; num_sms defaults to the
    table's reference GPU)."""
    table = configs.load_table(arch)
    sms = num_sms or int(table["num_sms"])
    _, cfg = configs.gemm_config(arch, m, bits)
    d = layout_dims(k, n, bits)
    n_blocks = d["n_full"] + (1 if d["tail_rows"] else 0)
    grid_n, grid_m, split = gemm_grid(m, n, n_blocks, cfg, sms)
    cols = min(grid_n * cfg.block_n, d["n_pad"])  # loaded columns (masked at n_pad)
    per_block, tail = _sz_loads(k, group, bits)
    p: dict[str, int] = {
        "weights": grid_m * d["rows"] * cols * 4,
        "scales_zeros": grid_m * (d["n_full"] * per_block + tail) * cols * 2 * 2,
        "x": grid_n * m * k * 2,
        "y": m * n * 2,
    }
    if split > 1:
        p["split_k"] = 2 * split * grid_n * m * cfg.block_n * 4 + 8 * split * grid_n * grid_m
    if bias:
        p["bias"] = grid_m * n * 2
    if rank:
        bcfg = configs.branch_config(arch, m)
        s_t, gm_t = branch_grid(m, k, bcfg, sms)
        p["A"] = gm_t * rank * k * 2
        p["x"] += m * k * 2
        p["t"] = m * rank * 4 + grid_n * m * rank * 4
        p["B"] = grid_m * n * rank * 2
        if s_t > 1:
            p["split_k"] = p.get("split_k", 0) + 2 * s_t * m * rank_pad(rank) * 4 + 8 * s_t * gm_t
    return Traffic(p, ideal_parts(n, k, m, bits, group, rank, bias))


def model_traffic(model: str, m: int, bits: int, group: int, rank: int, arch: str) -> Traffic:
    """Sum over one decoder layer's linear stack."""
    total = Traffic()
    for n, k in MODELS[model]:
        total.add(call_traffic(n, k, m, bits, group, rank, arch))
    return total


def roofline_rows(arch: str, models: tuple[str, ...] = ("Llama-2-7B", "SmolLM2-135M"), group: int = 128,
                  ms: tuple[int, ...] = (1, 4, 16, 64), ranks: tuple[int, ...] = (0, 64)) -> list[dict]:
    """Rows of the `kernels check` roofline table: model, m, rank, kernel, ratio and DRAM ratio per
    bit width, and the largest excess at 3 bits."""
    rows = []
    for model in models:
        for m in ms:
            for rank in ranks:
                row = {"model": model, "m": m, "rank": rank,
                       "kernel": "decode" if m <= configs.DECODE_M_MAX else "prefill"}
                for bits in (2, 3, 4):
                    t = model_traffic(model, m, bits, group, rank, arch)
                    row[f"{bits}b"] = t.ratio
                    row[f"{bits}b_dram"] = t.dram_ratio
                    if bits == 3:
                        ex = t.excess()
                        row["top_excess"] = ", ".join(f"{k} +{v / t.ideal:.1%}" for k, v in list(ex.items())[:2])
                rows.append(row)
    return rows
