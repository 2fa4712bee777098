"""`fbserve kernels check`: compile every shipped kernel config ahead of time for every supported
GPU arch (no GPU needed) and read the cost off the binary.

One row per kernel x config x arch: registers, spilled bytes (cuobjdump --dump-resource-usage:
STACK + LOCAL), shared memory (Triton's launch requirement, checked against the arch's limit) and
the narrowest/widest global load of the weights, found by following the weight pointer parameter
through the PTX (ld.global.v4.b32 = 16 bytes), and for gemv_kernel the SASS instructions of its
K-block loop per weight (the math column's "N/w": that kernel is bound by instruction issue, so this is
its cost).  QDEC's two kernels (cuda_ext/qdec_kernel.py: the gather, whose "weights" are the residual
rows in host memory, and the selection, which reads activations only) and the fused RMSNorm and rotary
kernels (cuda_ext/fused.py, no weights) are compiled with their fixed launch parameters.  Exit status 1 on a compile error, a spill, shared memory over the limit, or a weight
load narrower than 16 bytes.  Then the static roofline: bytes
one call moves / ideal bytes (cuda_ext/roofline.py).

Usage: python -m cuda_ext.check [--arch sm_90 ...] [--kind decode ...] [--full] [--jobs N] [--markdown]
Default variants per config: 3-bit bf16 and 4-bit fp16 (sm_75: 3-bit fp16), --full: every bits x dtype;
decode configs also compile 3-bit fp16 as a merged layer of 3 segments (engine.merge: the epilogue's
per-segment t, the fused branch's t 256 wide), branch_down with t 256 wide.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

from . import configs

ARCH_CC = {"sm_75": 75, "sm_80": 80, "sm_86": 86, "sm_87": 87, "sm_89": 89, "sm_90": 90, "sm_120": 120}
GROUP = 128  # the group size is one constant in the code; it does not change registers or loads
RANK_P = 128  # the largest branch tile: the worst case for registers
T_RANK_P = 256  # the widest t = x @ A^T (a merged layer's: launch.MAX_T): branch_gemv's and the fused
# branch's tile (branch_down_kernel takes it in column tiles of RANK_P)
SEGMENTS = 3  # merged q/k/v: the epilogue's worst case (3 segments), compiled as one more variant
SEGMENTED_VARIANT = (3, "fp16")  # what the served merged layers run on CUDA (fp16 activations)
DEFAULT_VARIANTS = [(3, "bf16"), (4, "fp16")]  # the most planes / the fp32 dequant: worst registers
# decode also compiles 3-bit fp16: at m = 1 fp16 runs gemv_kernel's half2 path, a code path of its own
DECODE_VARIANTS = [(3, "fp16"), *DEFAULT_VARIANTS]
FULL_VARIANTS = [(b, d) for b in (2, 3, 4) for d in ("fp16", "bf16")]
MIN_WEIGHT_LOAD = 16
# QDEC's kernels (cuda_ext/qdec_kernel.py): fixed launch parameters
QDEC_KINDS = ("qdec_gather", "qdec_select", "qdec_fused", "qdec_add")
FUSED_KINDS = ("rms_norm", "rope")  # cuda_ext/fused.py: fixed launch parameters, no weights
FIXED_KINDS = (*QDEC_KINDS, *FUSED_KINDS)
NO_WEIGHTS = ("qdec_select", "qdec_add", *FUSED_KINDS)  # kernels the 16-byte weight-load check does not apply to
ALL_KINDS = (*configs.KINDS, *FIXED_KINDS)
GEMV_TAIL_ROWS = 8  # gemv_kernel is specialised on its tail block; 8 rows = Llama-2's K = 11008


@dataclass
class Job:
    arch: str
    kind: str
    rule_no: int
    rule: dict
    bits: int
    dtype: str
    segments: int = 1  # > 1: a merged layer's epilogue (N_SEG), t T_RANK_P wide in the fused branch

    @property
    def variant(self) -> str:
        """The table's name of this variant: 3bfp16, fp16 (no weights), 3bfp16x3seg (a merged layer)."""
        return (f"{self.bits}b{self.dtype}" if self.bits else self.dtype) + (
            f"x{self.segments}seg" if self.segments > 1 else "")


@dataclass
class Result:
    job: Job
    error: str = ""
    regs: int = 0
    spill: int = 0
    smem: int = 0
    loads: list[int] = field(default_factory=list)
    math: str = ""  # wgmma / mma (tensor cores) or fma
    loop_per_weight: float = 0.0  # gemv_kernel: SASS instructions in its K-block loop per weight
    seconds: float = 0.0


def _kernel_source(job: Job):
    """(ASTSource, index of the weight pointer parameter, or None: no weights) for a job."""
    from triton.compiler import ASTSource

    from .gemv import gemv_kernel
    from .kernels import branch_down_kernel, branch_gemv_kernel, qgemm_kernel
    from .launch import branch_gemv_tiles, fused_branch_block_k
    from .fused import rms_norm_kernel, rope_kernel
    from .qdec_kernel import qdec_add_kernel, qdec_fused_kernel, qdec_gather_kernel, qdec_select_kernel
    dt, r = job.dtype, job.rule
    if job.kind == "qdec_gather":  # the weights are the residual rows, read from pinned host memory
        fn = qdec_gather_kernel
        ptrs = {"x_ptr": f"*{dt}", "idx_ptr": "*i32", "rc_ptr": "*u8", "rs_ptr": "*fp16", "acc_ptr": "*fp32"}
        consts = dict(BLOCK_S=r["block_s"], BLOCK_B=r["block_b"])
        div16 = list(ptrs) + ["N", "NB", "stride_xm", "stride_im", "stride_am"]
        weight = "rc_ptr"
    elif job.kind == "qdec_fused":  # selection + gather in one launch; weights: the residual rows
        fn = qdec_fused_kernel
        ptrs = {"x_ptr": f"*{dt}", "idx_ptr": "*i32", "rc_ptr": "*u8", "rs_ptr": "*fp16", "part_ptr": "*fp32",
                "lo": "fp32", "width": "fp32"}
        consts = dict(CHUNK=1024, BUCKETS=32, BLOCK_S=r["block_s"], BLOCK_B=r["block_b"])
        div16 = ["x_ptr", "idx_ptr", "rc_ptr", "rs_ptr", "part_ptr", "K", "N", "NB", "stride_xm", "stride_im"]
        weight = "rc_ptr"
    elif job.kind == "qdec_add":  # y += the chunks' partial sums; no weights
        fn = qdec_add_kernel
        ptrs = {"y_ptr": f"*{dt}", "part_ptr": "*fp32"}
        consts = dict(BLOCK=r["block"])
        div16 = ["y_ptr", "part_ptr", "N", "stride_ym"]
        weight = None
    elif job.kind == "qdec_select":  # reads activations only
        fn = qdec_select_kernel
        ptrs = {"x_ptr": f"*{dt}", "out_ptr": "*i32", "lo": "fp32", "width": "fp32"}
        consts = dict(CHUNK=1024, BUCKETS=32)
        div16 = ["x_ptr", "out_ptr", "K", "stride_xm", "stride_om"]
        weight = None
    elif job.kind == "rms_norm":  # Llama-3-8B's hidden size, the widest row block shipped models use
        fn = rms_norm_kernel
        ptrs = {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "y_ptr": f"*{dt}", "eps": "fp32"}
        consts = dict(BLOCK=r["block"])
        div16 = ["x_ptr", "w_ptr", "y_ptr", "N", "stride_x", "stride_y"]
        weight = None
    elif job.kind == "rope":
        fn = rope_kernel
        ptrs = {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "cos_ptr": f"*{dt}", "sin_ptr": f"*{dt}"}
        consts = dict(D=r["head_dim"], BLOCK_D=r["head_dim"])
        div16 = list(ptrs) + ["stride_q", "stride_k", "stride_c"]
        weight = None
    elif job.kind == "branch_down" and r["block_m"] == 1:  # one row: branch_gemv_kernel
        fn = branch_gemv_kernel
        ptrs = {"x_ptr": f"*{dt}", "a_ptr": "*fp16", "t_ptr": "*fp32", "ws_ptr": "*fp32", "cnt_ptr": "*i32"}
        consts = dict(RANK_P=T_RANK_P, USE_WS=True, **branch_gemv_tiles(configs.BranchConfig(
            **{k: v for k, v in r.items() if k in configs.BranchConfig.__dataclass_fields__}), T_RANK_P))
        div16 = list(ptrs) + ["K", "rank"]
        weight = "a_ptr"
    elif job.kind == "branch_down":
        fn = branch_down_kernel
        ptrs = {"x_ptr": f"*{dt}", "a_ptr": "*fp16", "t_ptr": "*fp32", "ws_ptr": "*fp32", "cnt_ptr": "*i32"}
        consts = dict(BLOCK_M=r["block_m"], BLOCK_K=r["block_k"], RANK_P=RANK_P, USE_WS=True, INTERP_BF16=False,
                      FP32_DOT=ARCH_CC[job.arch] < 80)
        div16 = list(ptrs) + ["K", "rank", "stride_xm"]
        weight = "a_ptr"
    else:
        ptrs = {"x_ptr": f"*{dt}", "qw_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16", "y_ptr": f"*{dt}",
                "ws_ptr": "*fp32", "cnt_ptr": "*i32", "t_ptr": "*fp32", "b_ptr": "*fp16", "bias_ptr": f"*{dt}",
                "a_ptr": "*fp16", "tws_ptr": "*fp32"}
        common = dict(BITS=job.bits, GROUP=GROUP, BLOCK_N=r["block_n"], RANK_P=RANK_P,
                      USE_WS=r.get("max_split_k", 1) > 1, HAS_BRANCH=True, HAS_BIAS=True, INTERP_BF16=False,
                      N_SEG=job.segments)
        if r["block_m"] < 16:  # CUDA-core decode kernel; a tail block of 8 rows (K = 11008) compiled in
            fn = gemv_kernel
            consts = dict(common, MR=r["block_m"], TAIL_ROWS=GEMV_TAIL_ROWS,
                          HALF2=r["block_m"] == 1 and dt == "fp16")  # as launch.quant_matmul picks it
            t_rank_p = T_RANK_P if job.segments > 1 else RANK_P
            consts.update(FUSED_BRANCH=bool(r.get("fused_branch")), PARTS_P=32, T_RANK_P=t_rank_p,
                          BLOCK_KA=fused_branch_block_k(t_rank_p))
        else:
            fn = qgemm_kernel
            consts = dict(common, BLOCK_M=r["block_m"], BRANCH_TF32=ARCH_CC[job.arch] >= 80,
                          FP32_DOT=ARCH_CC[job.arch] < 80, TAIL_ROWS=GEMV_TAIL_ROWS,
                          HALF2=dt == "fp16" and r["block_m"] <= 16)  # as launch.quant_matmul picks it
        # what the JIT specializes for LLM shapes (multiples of 16): enables the 16-byte loads
        div16 = list(ptrs) + ["N", "Np", "K", "rank", "stride_xm", "stride_ym"]
        weight = "qw_ptr"
    names = fn.arg_names
    div16 = [n for n in div16 if n in names]  # qgemm_kernel has no a_ptr / tws_ptr
    sig = {n: ptrs.get(n, "constexpr" if n in consts else "i32") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in div16}
    return ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs), weight and names.index(weight)


_LOAD = re.compile(r"^\s*(?:@!?%\w+\s+)?(ld\.global[\w.:]*|cp\.async[\w.:]*)\s+(.*);")
_WIDTH = {"b8": 1, "u8": 1, "s8": 1, "b16": 2, "u16": 2, "s16": 2, "f16": 2, "b32": 4, "u32": 4, "s32": 4,
          "f32": 4, "b64": 8, "u64": 8, "s64": 8, "f64": 8, "b128": 16}


def weight_load_widths(ptx: str, param_index: int) -> list[int]:
    """Byte widths of the global loads whose address derives from kernel parameter `param_index`
    (register taint through every instruction except loads, iterated to a fixed point)."""
    lines = [ln.split("//")[0].strip() for ln in ptx.splitlines()]
    tainted = set()
    for ln in lines:
        m = re.match(rf"ld\.param\.\w+\s+(%\w+),\s*\[\w+_param_{param_index}\]", ln)
        if m:
            tainted.add(m.group(1))
    insts = []
    for ln in lines:
        m = re.match(r"^(?:@!?%\w+\s+)?([a-z][\w.:]*)\s+(.*);$", ln)
        if m and not m.group(1).startswith(("ld.", "st.", "cp.", "atom", "red.", "bar", "ret", "bra")):
            regs = re.findall(r"%\w+", m.group(2))
            if regs:
                insts.append((regs[0], regs[1:]))
    changed = True
    while changed:
        changed = False
        for dst, srcs in insts:
            if dst not in tainted and any(s in tainted for s in srcs):
                tainted.add(dst)
                changed = True
    widths = []
    for ln in lines:
        m = _LOAD.match(ln)
        if not m:
            continue
        op, args = m.groups()
        addr = re.findall(r"\[\s*(%\w+)", args)
        src_addr = addr[-1] if op.startswith("cp.async") else (addr[0] if addr else None)
        if src_addr not in tainted:
            continue
        if op.startswith("cp.async"):
            widths.append(int(args.rsplit(",", 1)[-1].strip()))
        else:
            parts = op.split(".")
            vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
            widths.append(vec * next(_WIDTH[p] for p in reversed(parts) if p in _WIDTH))
    return widths


def _nvidia_tool(name: str) -> str:
    """Path of a binary shipped in the triton wheel (triton.knobs where it exists, Triton >= 3.4)."""
    try:
        from triton import knobs
        return getattr(knobs.nvidia, name.replace("-", "_")).path
    except ImportError:
        import triton
        return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _tool_version(name: str) -> str:
    out = subprocess.run([_nvidia_tool(name), "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else "?"


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, STACK + LOCAL bytes) from cuobjdump --dump-resource-usage."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_nvidia_tool("cuobjdump"), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", out).group(1))
    spill = int(re.search(r"STACK:(\d+)", out).group(1)) + int(re.search(r"LOCAL:(\d+)", out).group(1))
    return regs, spill


def _sass(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_nvidia_tool("cuobjdump"), "--dump-sass", f.name],
                              capture_output=True, text=True, check=True).stdout


_SASS_INS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def loop_body(sass: str) -> list[str]:
    """Opcodes of the largest loop of a SASS listing (the span from a backward branch's target to
    the branch): for gemv_kernel, its loop over K blocks."""
    ins = [(int(a, 16), op, rest) for a, op, rest in _SASS_INS.findall(sass)]
    loops = []
    for addr, op, rest in ins:
        target = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        if target and int(target.group(1), 16) < addr:
            loops.append((int(target.group(1), 16), addr))
    if not loops:
        return []
    lo, hi = max(loops, key=lambda span: span[1] - span[0])
    return [op.split(".")[0] for addr, op, _ in ins if lo <= addr <= hi]


def compile_job(job: Job) -> Result:
    """Compile one job for its arch and measure it; errors are returned, not raised."""
    import triton
    from triton.backends.compiler import GPUTarget
    res = Result(job)
    t0 = time.time()
    try:
        src, weight_idx = _kernel_source(job)
        k = triton.compile(src, target=GPUTarget("cuda", ARCH_CC[job.arch], 32),
                           options={"num_warps": job.rule["num_warps"], "num_stages": job.rule["num_stages"]})
        res.regs, res.spill = _resource_usage(k.asm["cubin"])
        res.smem = int(k.metadata.shared)
        res.loads = weight_load_widths(k.asm["ptx"], weight_idx) if weight_idx is not None else []
        ptx = k.asm["ptx"]
        res.math = "wgmma" if "wgmma." in ptx else "mma" if "mma.sync" in ptx else "fma"
        # gemv_kernel, and qgemm_kernel's fp16 decode path: one flat loop over K blocks (the other qgemm
        # paths nest run-time loops, where the largest loop is not a K block)
        if job.kind == "decode" and (job.rule["block_m"] < 16 or job.dtype == "fp16"):
            weights = 512 * job.rule["block_n"] // (32 * job.rule["num_warps"])  # per thread per K block
            res.loop_per_weight = len(loop_body(_sass(k.asm["cubin"]))) / weights
    except Exception as e:  # noqa: BLE001 - reported in the table, exit status 1
        res.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
    res.seconds = time.time() - t0
    return res


def run_jobs(jobs: list[Job], workers: int) -> list[Result]:
    """compile_job over jobs in worker processes.  A compiler that aborts the process (an LLVM
    fatal error) breaks the pool; the unfinished jobs are then rerun one process each, so the
    crash is pinned on its job and reported instead of ending the check."""
    done: dict[int, Result] = {}
    try:
        with ProcessPoolExecutor(max(1, workers)) as pool:
            futures = {pool.submit(compile_job, j): i for i, j in enumerate(jobs)}
            for f in as_completed(futures):
                try:
                    done[futures[f]] = f.result()
                except BrokenProcessPool:
                    pass
    except BrokenProcessPool:
        pass
    for i, job in enumerate(jobs):
        if i in done:
            continue
        try:
            with ProcessPoolExecutor(1) as pool:
                done[i] = pool.submit(compile_job, job).result()
        except BrokenProcessPool:
            done[i] = Result(job, error="the compiler process crashed (fatal LLVM/ptxas error)")
    return [done[i] for i in range(len(jobs))]


def _rules(arch: str, kind: str) -> list[dict]:
    """The configs shipped for a kind on an arch: the arch's table, or a kernel's fixed launch parameters."""
    from . import fused, qdec_kernel
    fixed = {"qdec_gather": qdec_kernel.GATHER_CONFIG, "qdec_select": qdec_kernel.SELECT_CONFIG,
             "qdec_fused": qdec_kernel.FUSED_CONFIG,
             "qdec_add": {"block": qdec_kernel.ADD_BLOCK, "num_warps": qdec_kernel.ADD_WARPS, "num_stages": 1},
             "rms_norm": {"block": 4096, "num_warps": fused.RMS_NORM_WARPS, "num_stages": 1},
             "rope": {"head_dim": 128, "num_warps": fused.ROPE_WARPS, "num_stages": 1}}
    if kind in fixed:
        return [{"m_max": None, **fixed[kind]}]
    rules = configs.load_table(arch)[kind]
    if kind == "decode":  # gemv's fused branch is a config choice: compiled whether or not the table makes it
        rules = rules + [{**r, "fused_branch": True} for r in rules if r["block_m"] == 1 and not r.get("fused_branch")]
    return rules


def _jobs(archs: list[str], full: bool, kinds: list[str]) -> tuple[list[Job], list[str]]:
    jobs, notes = [], []
    for arch in archs:
        for kind in kinds:
            for no, rule in enumerate(_rules(arch, kind)):
                variants = [(0, d) for d in ("fp16", "bf16")] if kind in ("branch_down", *FIXED_KINDS) else (
                    FULL_VARIANTS if full else DECODE_VARIANTS if kind == "decode" else DEFAULT_VARIANTS)
                for bits, dt in variants:
                    if dt == "bf16" and arch == "sm_75" and kind not in FUSED_KINDS:  # fused: any dtype
                        if full or kind in ("branch_down", *FIXED_KINDS):
                            notes.append(f"{arch} {kind}#{no} {bits or ''}{'b ' if bits else ''}bf16: skipped, "
                                         "bf16 needs sm_80+ (the launcher refuses it)")
                            continue
                        dt = "fp16"
                    if not any(j.arch == arch and j.kind == kind and j.rule_no == no and (j.bits, j.dtype) == (bits, dt)
                               for j in jobs):  # sm_75's stand-in fp16 may already be there
                        jobs.append(Job(arch, kind, no, rule, bits, dt))
                if kind == "decode":  # merged layers' segmented epilogue (prefill adds their branches apart)
                    jobs.append(Job(arch, kind, no, rule, *SEGMENTED_VARIANT, segments=SEGMENTS))
    return jobs, notes


FIXED_LABELS = {  # the fixed-parameter kernels' config column
    "qdec_gather": "rows {block_s} x {block_b} B w{num_warps}",
    "qdec_select": "1024-channel chunk w{num_warps}",
    "qdec_fused": "chunk, {block_s} rows x {block_b} B w{num_warps}",
    "qdec_add": "{block} outputs w{num_warps}",
    "rms_norm": "row of {block} w{num_warps}",
    "rope": "head dim {head_dim} w{num_warps}",
}


def _config_label(kind: str, rule: dict) -> str:
    if kind in FIXED_LABELS:
        return FIXED_LABELS[kind].format(**rule)
    if kind == "branch_down":
        tile = f"m{rule['block_m']} k{rule['block_k']}"
    else:
        tile = f"m{rule['block_m']} n{rule['block_n']} splitK<={rule.get('max_split_k', 1)}"
        tile += " fused branch" if rule.get("fused_branch") else ""
    when = f"m<={rule['m_max']}" if rule.get("m_max") is not None else "any m"
    return f"{when}: {tile} w{rule['num_warps']} s{rule['num_stages']}"


def _table(results: list[Result], markdown: bool) -> tuple[list[str], bool]:
    """One row per kernel x config x arch (worst over its variants); returns (lines, ok)."""
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        groups.setdefault((r.job.kind, r.job.rule_no, r.job.arch), []).append(r)
    head = ["kernel", "config", "arch", "variants", "math", "regs", "spill B", "smem B", "weight load B", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] if markdown else [
        f"{head[0]:<12} {head[1]:<46} {head[2]:<7} {head[3]:<20} {head[4]:<26} {head[5]:>4} {head[6]:>7} "
        f"{head[7]:>7} {head[8]:>13}  {head[9]}"]
    ok_all = True
    for (kind, no, arch), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], ARCH_CC[kv[0][2]])):
        limit = int(configs.load_table(arch)["max_shared_bytes"])
        errs = [r for r in rs if r.error]
        loads = [w for r in rs for w in r.loads]
        regs, spill, smem = max(r.regs for r in rs), max(r.spill for r in rs), max(r.smem for r in rs)
        problems = [f"compile error ({e.job.variant}): {e.error}" for e in errs]
        if spill:
            problems.append("spills")
        if smem > limit:
            problems.append(f"smem > {limit}")
        if not errs and kind not in NO_WEIGHTS and (not loads or min(loads) < MIN_WEIGHT_LOAD):
            problems.append(f"weight loads < {MIN_WEIGHT_LOAD} B" if loads else "no weight load found")
        ok_all &= not problems
        variants = ",".join(r.job.variant for r in rs)
        width = f"{min(loads)}-{max(loads)}" if loads else "-"
        status = "ok" if not problems else "FAIL: " + "; ".join(problems)
        cfg = _config_label(kind, rs[0].job.rule)
        math = "/".join(sorted({r.math for r in rs if r.math})) or "-"
        per_weight: dict[str, float] = {}  # gemv_kernel: the loop's instructions per weight, worst per dtype
        for r in rs:
            if r.loop_per_weight:
                per_weight[r.job.dtype] = max(per_weight.get(r.job.dtype, 0.0), r.loop_per_weight)
        if per_weight:
            math += " " + " ".join(f"{v:.1f}/w {d}" for d, v in sorted(per_weight.items(), reverse=True))
        cells = [kind, cfg, arch, variants, math, str(regs), str(spill), str(smem), width, status]
        lines.append("| " + " | ".join(cells) + " |" if markdown else
                     f"{kind:<12} {cfg:<46} {arch:<7} {variants:<20} {math:<26} {regs:>4} {spill:>7} {smem:>7} "
                     f"{width:>13}  {status}")
    return lines, ok_all


def _roofline(arch: str, markdown: bool) -> list[str]:
    from .roofline import roofline_rows
    rows = roofline_rows(arch)
    head = ["model", "kernel", "m", "rank", "2-bit", "3-bit", "4-bit", "largest excess (3-bit)"]
    out = [f"Static roofline on {arch}'s configs (bytes moved / ideal; in brackets: with x, t and split-K "
           "partials served by L2):"]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] if markdown else [
        f"{'model':<14} {'kernel':<8} {'m':>3} {'rank':>4}  {'2-bit':>14} {'3-bit':>14} {'4-bit':>14}  "
        "largest excess (3-bit)"]
    for r in rows:
        cells = [f"{r[b]:.3f} ({r[b + '_dram']:.3f})" for b in ("2b", "3b", "4b")]
        if markdown:
            out.append("| " + " | ".join([r["model"], r["kernel"], str(r["m"]), str(r["rank"]), *cells,
                                          r["top_excess"]]) + " |")
        else:
            out.append(f"{r['model']:<14} {r['kernel']:<8} {r['m']:>3} {r['rank']:>4}  "
                       + " ".join(f"{c:>14}" for c in cells) + f"  {r['top_excess']}")
    return out


def _add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--arch", action="append", choices=sorted(ARCH_CC, key=ARCH_CC.get),
                    help="arch to compile for (repeatable; default: all)")
    ap.add_argument("--kind", action="append", choices=ALL_KINDS, help="kernel kind (repeatable; default: all)")
    ap.add_argument("--full", action="store_true", help="every bits x dtype variant (slower)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    ap.add_argument("--markdown", action="store_true", help="Markdown tables (for bench/RESULTS.md)")
    ap.add_argument("--roofline-arch", default="sm_90", help="arch whose configs the roofline uses")


def _argv_of(args: argparse.Namespace) -> list[str]:
    argv = [f"--arch={a}" for a in args.arch or []] + [f"--kind={k}" for k in args.kind or []]
    argv += ["--full"] * args.full + ["--markdown"] * args.markdown
    return argv + [f"--jobs={args.jobs}", f"--roofline-arch={args.roofline_arch}"]


def run(args: argparse.Namespace) -> int:
    """Run the check for parsed arguments; returns the exit status (0 = every config compiles cleanly)."""
    import triton

    from .launch import interpreting
    if interpreting():  # the kernels were built for the interpreter; compile in a clean process
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, "-m", "cuda_ext.check", *_argv_of(args)], env=env)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated (silences a warning)
    archs = args.arch or list(ARCH_CC)
    jobs, notes = _jobs(archs, args.full, args.kind or list(ALL_KINDS))
    print(f"triton {triton.__version__}; ptxas {_tool_version('ptxas')} (< sm_90), "
          f"{_tool_version('ptxas-blackwell')} (sm_90+); {len(jobs)} compiles on {args.jobs} processes")
    t0 = time.time()
    results = run_jobs(jobs, args.jobs)
    lines, ok = _table(results, args.markdown)
    print("\n".join(lines))
    for n in notes:
        print("note:", n)
    print(f"compiled in {time.time() - t0:.0f} s")
    print()
    print("\n".join(_roofline(args.roofline_arch, args.markdown)))
    print("\nkernels check:", "OK" if ok else "FAILED")
    return 0 if ok else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    """`fbserve kernels check` for server/cli.py's subcommand registry."""
    kernels = subparsers.add_parser("kernels", help="GPU kernel tools", description="GPU kernel tools.")
    sub = kernels.add_subparsers(dest="kernels_command", metavar="COMMAND", required=True)
    check = sub.add_parser("check", help="AOT-compile every kernel config for every arch and check it",
                           description=__doc__.split("\n\n")[0])
    _add_arguments(check)
    check.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    """`python -m cuda_ext.check [options]`; returns the exit status."""
    ap = argparse.ArgumentParser(prog="fbserve kernels check", description=__doc__.split("\n\n")[0])
    _add_arguments(ap)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
