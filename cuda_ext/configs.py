"""Per-GPU-generation kernel configs, read from cuda_ext/configs/<arch>.json.

A table holds, per kernel kind, an ordered list of rules; the first rule whose `m_max` (rows of x,
null = any) and optional `bits` list match is used.  Kinds:
  decode       m <= 16, split-K over K blocks: qgemm_kernel (tensor cores) where block_m is 16,
               gemv_kernel (CUDA cores, m <= block_m) where block_m is 1, 2 or 4
  prefill      qgemm_kernel for m > 16
  branch_down  branch_down_kernel (t = x @ A^T)
Rule fields: block_m, block_n, num_warps, num_stages, waves (target programs per SM; split-K is
raised until the grid reaches waves * SM count), max_split_k; branch_down: block_k, num_warps,
num_stages, max_split.  Nothing is tuned on the serving path; `python -m cuda_ext.autotune` rewrites
a table on a GPU.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

CONFIG_DIR = Path(__file__).with_name("configs")
ARCHS = ("sm_75", "sm_80", "sm_86", "sm_87", "sm_89", "sm_90", "sm_120")
INTERPRETER = "interpreter"  # table used under TRITON_INTERPRET=1 (small tiles, forced splits)
KINDS = ("decode", "prefill", "branch_down")
DECODE_M_MAX = 16
GEMV_ROWS = (1, 2, 4)  # decode rules with block_m < 16 run gemv_kernel (CUDA cores) for m <= block_m

log = logging.getLogger("fbserve.kernels")


@dataclass(frozen=True)
class GemmConfig:
    """Tile config of qgemm_kernel."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    waves: float = 1.0
    max_split_k: int = 1
    fused_branch: bool = False  # block_m 1: the branch's x @ A^T inside gemv_kernel's launch (no branch_down)
    half2: bool = True  # decode, fp16: packed half2 dequantization (False: gemv's fp32 form, qgemm's K=16 dots)


@dataclass(frozen=True)
class BranchConfig:
    """Tile config of branch_down_kernel."""
    block_m: int
    block_k: int
    num_warps: int
    num_stages: int
    max_split: int = 64


def arch_of(capability: tuple[int, int]) -> str:
    """(9, 0) -> 'sm_90'."""
    return f"sm_{capability[0]}{capability[1]}"


def _arch_num(arch: str) -> int:
    return int(arch.split("_")[1])


@lru_cache(maxsize=None)
def load_table(arch: str) -> dict:
    """The JSON table of `arch`; an arch without one uses the nearest older shipped arch (logged)."""
    path = CONFIG_DIR / f"{arch}.json"
    if not path.exists():
        if arch == INTERPRETER:
            raise FileNotFoundError(path)
        older = [a for a in ARCHS if _arch_num(a) <= _arch_num(arch)]
        if not older:
            raise ValueError(f"no kernel config for {arch}; shipped: {', '.join(ARCHS)} (sm_75 is the oldest)")
        log.warning("no kernel config for %s; using %s's table", arch, older[-1])
        path = CONFIG_DIR / f"{older[-1]}.json"
    with open(path) as f:
        table = json.load(f)
    for kind in KINDS:
        if not table.get(kind):
            raise ValueError(f"{path}: missing rules for '{kind}'")
    return table


def _match(rules: list[dict], m: int, bits: int) -> dict:
    for rule in rules:
        if rule.get("m_max") is not None and m > rule["m_max"]:
            continue
        if "bits" in rule and bits not in rule["bits"]:
            continue
        return rule
    raise ValueError(f"no config rule matches m={m}, bits={bits}")


def _fields(cls: type, rule: dict) -> dict:
    names = cls.__dataclass_fields__.keys()
    return {k: v for k, v in rule.items() if k in names}


def gemm_config(arch: str, m: int, bits: int) -> tuple[str, GemmConfig]:
    """('decode' or 'prefill', config) for x with m rows on `arch`."""
    kind = "decode" if m <= DECODE_M_MAX else "prefill"
    cfg = GemmConfig(**_fields(GemmConfig, _match(load_table(arch)[kind], m, bits)))
    if kind == "decode" and cfg.block_m not in GEMV_ROWS + (16,):
        raise ValueError(f"{arch}: decode rules use block_m=16 (tensor cores) or {GEMV_ROWS} (CUDA cores), "
                         f"got {cfg.block_m}")
    if kind == "decode" and m > cfg.block_m:
        raise ValueError(f"{arch}: decode rule block_m={cfg.block_m} matched m={m} > block_m")
    return kind, cfg


def branch_config(arch: str, m: int) -> BranchConfig:
    """branch_down's config for m rows: block_m 1 is branch_gemv_kernel (one row only), else
    branch_down_kernel's row tile."""
    cfg = BranchConfig(**_fields(BranchConfig, _match(load_table(arch)["branch_down"], m, 0)))
    if cfg.block_m == 1 and m > 1:
        raise ValueError(f"{arch}: branch_down rule block_m=1 matched m={m}: its m_max must be 1")
    return cfg


def all_configs(arch: str) -> list[tuple[str, dict]]:
    """Every (kind, rule) of a table, in file order (what `kernels check` compiles)."""
    table = load_table(arch)
    return [(kind, rule) for kind in KINDS for rule in table[kind]]


def write_rule(arch: str, kind: str, rule: dict, path: Path | None = None) -> Path:
    """Insert `rule` first among `kind`'s rules with the same m_max/bits (replacing such a rule)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    path = path or CONFIG_DIR / f"{arch}.json"
    table = json.loads(path.read_text()) if path.exists() else {"arch": arch}
    rules = [r for r in table.get(kind, [])
             if (r.get("m_max"), r.get("bits")) != (rule.get("m_max"), rule.get("bits"))]
    table[kind] = sorted([rule] + rules, key=lambda r: (r.get("m_max") is None, r.get("m_max") or 0))
    path.write_text(json.dumps(table, indent=1) + "\n")
    load_table.cache_clear()
    return path


def as_rule(cfg: GemmConfig | BranchConfig, **match: object) -> dict:
    """A config as a JSON rule, with match keys (m_max, bits) first."""
    return {**{k: v for k, v in match.items() if v is not None}, **asdict(cfg)}
