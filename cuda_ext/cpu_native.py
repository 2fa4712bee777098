"""fbserve's own CPU kernel (cpu_native.c): quantized matmul + low-rank branch + bias in one pass.

Where the CPU has AVX-512 BF16, or else AVX2 + FMA + F16C (most laptops), and a C compiler is present, the
kernel is compiled once (~1 s) for the best of the two into $FBSERVE_HOME/native/<source and flags hash>/
and loaded with ctypes; `kernel_name()` says which (`fbserve-avx512bf16` / `fbserve-avx2`),
`native_reason()` why neither otherwise, and the CPU path then stays on torch's int4 op (cuda_ext.cpu),
reported as such (no silent switch). FBSERVE_CPU_NATIVE_ISA=avx2 forces the AVX2 build (tests, benchmarks).

Against torch's int4 op + the fp32 branch it reads the codes nearly at their own width (3-bit g128:
3.25 bits per weight, not a 4-bit container), the scales in fp32 (exact) and the fp16 branch factors as stored, and
does the branch inside the same call: 1.3-2.2x faster per SmolLM2 layer at batch 1 (bench/RESULTS.md).

Layout: `tile_words` re-lays the fbq1 codes per 16 output columns and per group (cpu_native.c's
header); `NativeWeight` holds one layer, `NativeGroup` runs one or several layers that read the same
input (q/k/v) as ONE call writing their outputs side by side.

FBSERVE_CPU_NATIVE=0 turns the kernel off (torch's int4 op is used).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .cpu import bf16_prefill_matmul, bf16_prefill_rows
from .packing import PackedWeight, codes_k_major

log = logging.getLogger("fbserve.kernels")
ENV = "FBSERVE_CPU_NATIVE"
SOURCE = Path(__file__).with_name("cpu_native.c")
ISA_ENV = "FBSERVE_CPU_NATIVE_ISA"
BASE_CFLAGS = ["-O3", "-fPIC", "-shared", "-fopenmp"]
# the builds of cpu_native.c, best first: name -> (compiler flags, /proc/cpuinfo flags it needs)
ISAS: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "avx512bf16": (["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mavx512vnni", "-mf16c",
                    "-mfma"], ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512_vnni", "f16c", "fma")),
    "avx2": (["-mavx2", "-mf16c", "-mfma"], ("avx2", "f16c", "fma")),
}
CPU_FLAGS = ISAS["avx512bf16"][1]  # the best build's


class _Part(ctypes.Structure):
    _fields_ = [("words", ctypes.c_void_p), ("sz", ctypes.c_void_p), ("a", ctypes.c_void_p), ("bt", ctypes.c_void_p), ("bias", ctypes.c_void_p)] + [
        (name, ctypes.c_int32) for name in ("n", "n_pad", "bits", "group", "rank", "y_off", "words_per_tile", "pad_")]


class _Layer(ctypes.Structure):
    _fields_ = [("ln1", ctypes.c_void_p), ("ln2", ctypes.c_void_p), ("qkv", ctypes.c_void_p), ("o", ctypes.c_void_p),
                ("gu", ctypes.c_void_p), ("down", ctypes.c_void_p), ("k_cache", ctypes.c_void_p),
                ("v_cache", ctypes.c_void_p), ("eps1", ctypes.c_float), ("eps2", ctypes.c_float),
                ("n_qkv", ctypes.c_int32), ("n_gu", ctypes.c_int32), ("pad_", ctypes.c_int32 * 2)]


class _Dims(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int32) for name in ("C", "H", "Hkv", "D", "I", "max_len", "n_layers", "kv_type")]


KV_TYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # cpu_native.c KV_F32 / KV_F16 / KV_BF16


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def _isa() -> tuple[str | None, str | None]:
    """(the build this CPU runs best, None) or (None, why none): FBSERVE_CPU_NATIVE_ISA may pick a lesser one."""
    flags = _cpu_flags()
    forced = os.environ.get(ISA_ENV, "").strip().lower()
    if forced and forced not in ISAS:
        return None, f"{ISA_ENV}={forced} is not one of {', '.join(ISAS)}"
    candidates = [forced] if forced else list(ISAS)
    for name in candidates:
        if all(f in flags for f in ISAS[name][1]):
            return name, None
    missing = [f for f in ISAS[candidates[-1]][1] if f not in flags]
    return None, f"this CPU lacks {', '.join(missing)}" + ("" if forced else " (and AVX-512 BF16)")


def kernel_name() -> str:
    """`fbserve-<isa>` of the build in use (or that would be: see native_reason())."""
    return f"fbserve-{_isa()[0] or 'unavailable'}"


def _cflags(isa: str) -> list[str]:
    return BASE_CFLAGS + ISAS[isa][0]


def _build_dir(isa: str) -> Path:
    home = Path(os.environ.get("FBSERVE_HOME", Path.home() / ".cache" / "fbserve")).expanduser()
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(_cflags(isa)).encode()).hexdigest()[:16]
    return home / "native" / digest


def _compile(cc: str, out: Path, isa: str) -> None:
    """Compile to a temporary file beside `out`, then rename: concurrent builders never see half a file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *_cflags(isa), str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True,
                              timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[:400]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    """(library, None) or (None, why it is unavailable); built at most once per source version."""
    if os.environ.get(ENV, "1").strip().lower() in ("0", "off", ""):
        return None, f"disabled ({ENV}=0)"
    if platform.machine().lower() not in ("x86_64", "amd64") or platform.system() != "Linux":
        return None, f"needs Linux x86-64 with AVX2 or AVX-512 BF16 ({platform.system()} {platform.machine()})"
    isa, why = _isa()
    if isa is None:
        return None, why
    out = _build_dir(isa) / "libfbq_cpu.so"
    if not out.exists():
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            return None, "no C compiler (cc) to build cuda_ext/cpu_native.c"
        try:
            _compile(cc, out, isa)
        except (OSError, RuntimeError, subprocess.TimeoutExpired) as e:
            return None, f"build failed: {e}"[:500]
        log.info("built the CPU kernel %s (%s)", out, isa)
    try:
        lib = ctypes.CDLL(str(out))
    except OSError as e:
        return None, f"cannot load {out}: {e}"[:500]
    fn = lib.fbq_cpu_matmul
    fn.restype = None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                   ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    fn = lib.fbq_cpu_decode_layers
    fn.restype = None
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    fn = lib.fbq_q8_matmul  # cuda_ext/cpu_q8.py
    fn.restype = None
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                   ctypes.c_int, ctypes.c_void_p]
    return lib, None


def native_reason() -> str | None:
    """Why the CPU kernel is not used here (disabled, CPU, compiler, build), or None when it is."""
    return _load()[1]


SLOTS = {2: 8, 3: 5, 4: 4}  # k pairs per 32-bit word: 8 x 2-bit, 5 x 3-bit (2 bits unused), 4 x 4-bit


def tile_words(codes: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Codes (N, K) integer -> int32 words (ceil(N/16), words_per_tile, 16), cpu_native.c's tile layout:
    per group, word q holds pair j = SLOTS*q + s (k = group start + 2j, 2j + 1) at bits bits*s (k even)
    and 16 + bits*s (k odd). K is padded to a multiple of 32 with code 0 (x is zero there)."""
    n, k = codes.shape
    n_pad, k_pad, slots = -(-n // 16) * 16, -(-k // 32) * 32, SLOTS[bits]
    c = torch.zeros(n_pad, k_pad, dtype=torch.int64)
    c[:n, :k] = codes.to(torch.int64).cpu()
    shift = torch.arange(slots) * bits
    parts = []
    for g0 in range(0, k, group_size):
        g1 = min(g0 + group_size, k_pad)
        pairs = (g1 - g0) // 2
        words = -(-pairs // slots)
        v = torch.zeros(n_pad, words * slots, 2, dtype=torch.int64)
        v[:, :pairs] = c[:, g0:g1].view(n_pad, pairs, 2)
        v = v.view(n_pad, words, slots, 2)
        parts.append((v[..., 0] << shift).sum(-1) | (v[..., 1] << (shift + 16)).sum(-1))
    w = torch.cat(parts, dim=1)
    w = torch.where(w >= 2 ** 31, w - 2 ** 32, w).to(torch.int32)
    return w.view(n_pad // 16, 16, -1).transpose(1, 2).contiguous()


def tile_codes(words: torch.Tensor, bits: int, group_size: int, in_features: int, out_features: int) -> torch.Tensor:
    """Inverse of `tile_words`: int64 codes (out_features, in_features)."""
    n_pad, k_pad, slots = words.shape[0] * 16, -(-in_features // 32) * 32, SLOTS[bits]
    w = words.transpose(1, 2).reshape(n_pad, -1).to(torch.int64) & 0xFFFFFFFF
    shift = torch.arange(slots) * bits
    codes = torch.zeros(n_pad, k_pad, dtype=torch.int64)
    col = 0
    for g0 in range(0, in_features, group_size):
        g1 = min(g0 + group_size, k_pad)
        pairs = (g1 - g0) // 2
        rows = -(-pairs // slots)
        blk = w[:, col:col + rows, None]  # (n_pad, rows, 1)
        v = torch.stack((blk >> shift, blk >> (shift + 16)), dim=-1) & ((1 << bits) - 1)  # (n_pad, rows, slots, 2)
        codes[:, g0:g1] = v.reshape(n_pad, rows * slots, 2)[:, :pairs].reshape(n_pad, g1 - g0)
        col += rows
    return codes[:out_features, :in_features]


@dataclass
class NativeWeight:
    """One layer for the CPU kernel, everything a 16-column tile reads contiguous: words int32
    (n_pad/16, words_per_tile, 16); sz fp16 (n_pad/16, G, 2, 16): per tile and group its 16 scales, then its
    16 zeros (the kernel forms L scale and scale (L + zero) from them: header of cpu_native.c); the branch
    a fp16 (r, K) and bt = B^T fp16 (n_pad/16, r, 16), or None; bias fp32 (n_pad) or None."""

    words: torch.Tensor
    sz: torch.Tensor
    a: torch.Tensor | None
    bt: torch.Tensor | None
    bias: torch.Tensor | None
    bits: int
    group_size: int
    in_features: int
    out_features: int

    @property
    def rank(self) -> int:
        return 0 if self.a is None else int(self.a.shape[0])

    def nbytes(self) -> int:
        ts = (self.words, self.sz, self.bt, self.bias)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def part(self, y_off: int) -> _Part:
        ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
        return _Part(self.words.data_ptr(), self.sz.data_ptr(), ptr(self.a), ptr(self.bt),
                     ptr(self.bias), self.out_features, self.words.shape[0] * 16, self.bits, self.group_size,
                     self.rank, y_off, self.words.shape[1], 0)


def _per_tile(t: torch.Tensor) -> torch.Tensor:
    """(rows, n_pad) -> (n_pad / 16, rows, 16) contiguous: one 16-column tile's values together."""
    return t.reshape(t.shape[0], -1, 16).transpose(0, 1).contiguous()


def prepare_native(packed: PackedWeight, a: torch.Tensor | None = None, b: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None) -> NativeWeight:
    """Convert a packed layer (+ fp16 branch A (r, K), B (N, r), bias) for the CPU kernel, once."""
    k, n, bits, g = packed.in_features, packed.out_features, packed.bits, packed.group_size
    codes = codes_k_major(packed.to("cpu"))[:k, :n].t()
    n_pad = -(-n // 16) * 16
    sz = torch.zeros(packed.groups, 2, n_pad, dtype=torch.float16)  # padded columns: scale 0
    sz[:, 0, :n] = packed.scales[:, :n].to(torch.float16).cpu()
    sz[:, 1, :n] = packed.zeros[:, :n].to(torch.float16).cpu()
    sz = sz.reshape(packed.groups, 2, n_pad // 16, 16).permute(2, 0, 1, 3).contiguous()  # (n_pad/16, G, 2, 16)
    bt = None
    if a is not None and a.shape[0] == 0:  # rank 0: no branch
        a = None
    if a is not None:
        bt = torch.zeros(n_pad, a.shape[0], dtype=torch.float16)
        bt[:n] = b.to(torch.float16).cpu()
        bt = _per_tile(bt.t())
        a = a.to(torch.float16).cpu().contiguous()
    bias32 = None
    if bias is not None:
        bias32 = torch.zeros(n_pad)
        bias32[:n] = bias.float().cpu()
    return NativeWeight(tile_words(codes, bits, g), sz, a, bt, bias32, bits, g, k, n)


class NativeGroup:
    """Layers that read the same x, as one kernel call: __call__(x (M, K) fp32) -> (M, sum N) fp32, layer
    i in columns offsets[i] : offsets[i] + out_features."""

    def __init__(self, weights: list[NativeWeight]) -> None:
        lib, why = _load()
        if lib is None:
            raise RuntimeError(f"the CPU kernel is unavailable: {why}")
        if len({w.in_features for w in weights}) != 1:
            raise ValueError(f"one call needs one input width: {[w.in_features for w in weights]}")
        self.weights = weights  # keeps the tensors the parts point at alive
        self.in_features = weights[0].in_features
        self.offsets, off = [], 0
        for w in weights:
            self.offsets.append(off)
            off += w.out_features
        self.out_features = off
        self._parts = (_Part * len(weights))(*[w.part(o) for w, o in zip(weights, self.offsets)])
        self._fn = lib.fbq_cpu_matmul
        k_pad = -(-self.in_features // 32) * 32
        self._scratch_per_row = k_pad * 4 + k_pad // 32 * 4 + sum(w.rank for w in weights) * 4  # X_BYTES = 4

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"x: expected (M, {self.in_features}), got {tuple(x.shape)}")
        if x.dtype != torch.float32 or not x.is_contiguous():
            x = x.float().contiguous()
        m = x.shape[0]
        y = torch.empty(m, self.out_features)
        if m == 0:
            return y
        scratch = torch.empty(m * self._scratch_per_row, dtype=torch.uint8)  # per call: thread-safe
        self._fn(m, self.in_features, x.data_ptr(), self.in_features, y.data_ptr(), self.out_features,
                 len(self.weights), ctypes.addressof(self._parts), torch.get_num_threads(), scratch.data_ptr())
        return y


def native_matmul(x: torch.Tensor, group: NativeGroup, packed: PackedWeight | None = None,
                  a: torch.Tensor | None = None, b: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T (+ (x @ A^T) @ B^T) (+ bias) through `group` (one layer); x (..., K) any float dtype,
    returns (..., N) in x.dtype. Given `packed` (and the layer's fp16 A, B, its bias), calls of >=
    cuda_ext.cpu.bf16_prefill_rows() rows take the dequantize + bf16 GEMM path instead (prefill)."""
    k = group.in_features
    if x.shape[-1] != k:
        raise ValueError(f"x: last dim {x.shape[-1]} != in_features {k}")
    x2 = x.reshape(-1, k)
    min_rows = bf16_prefill_rows() if packed is not None else None
    if min_rows is not None and x2.shape[0] >= min_rows:
        y = bf16_prefill_matmul(x2, packed)
        if a is not None:
            y = torch.addmm(y, x2.float() @ a.float().t(), b.float().t())
        if bias is not None:
            y = y + bias.float()
    else:
        y = group(x2)
    return y.to(x.dtype).reshape(*x.shape[:-1], group.out_features)


@dataclass
class LayerWeights:
    """What one Llama decoder layer's decode step reads: RMSNorm weights (fp32 (C,)) and eps, the four
    projection groups (q/k/v, o, gate/up, down) on the kernel, and the layer's KV cache (`kv_cache`: an
    object with .k and .v (slots, Hkv, max_len, D) in fp32, fp16 or bf16, read at every call: the engine may
    replace it)."""

    ln1: torch.Tensor
    eps1: float
    ln2: torch.Tensor
    eps2: float
    qkv: NativeGroup
    o: NativeGroup
    gate_up: NativeGroup
    down: NativeGroup
    attn: object  # has .kv_cache


class NativeLayers:
    """Whole decoder layers in ONE kernel call per decode step (cpu_native.c `fbq_cpu_decode_layers`):
    __call__(x (B, C) fp32, updated in place; slots, positions (B,) int; cos, sin_signed (B, D) fp32, the
    RoPE factors with rotate_half(x) * sin == roll(x, D/2) * sin_signed). Numerics: the projections as in
    NativeGroup, everything else fp32 (RMSNorm, RoPE, softmax with a ~1-ulp exp, SiLU)."""

    def __init__(self, layers: list[LayerWeights], heads: int, kv_heads: int, head_dim: int, inter: int) -> None:
        lib, why = _load()
        if lib is None:
            raise RuntimeError(f"the CPU kernel is unavailable: {why}")
        if head_dim % 16 or head_dim > 512 or heads % kv_heads:
            raise ValueError(f"unsupported attention shape: heads {heads}, kv heads {kv_heads}, head_dim {head_dim}")
        self.layers, self._fn = layers, lib.fbq_cpu_decode_layers
        c = layers[0].ln1.numel()
        want = {"qkv": (c, (heads + 2 * kv_heads) * head_dim), "o": (heads * head_dim, c),
                "gate_up": (c, 2 * inter), "down": (inter, c)}
        for lw in layers:
            for name, (k, n) in want.items():
                g = getattr(lw, name)
                if (g.in_features, g.out_features) != (k, n):
                    raise ValueError(f"{name}: ({g.in_features} -> {g.out_features}), expected ({k} -> {n})")
        self.c, self.h, self.hkv, self.d, self.inter = c, heads, kv_heads, head_dim, inter
        self._structs = (_Layer * len(layers))()
        for s, lw in zip(self._structs, layers):
            s.ln1, s.ln2 = lw.ln1.data_ptr(), lw.ln2.data_ptr()
            s.eps1, s.eps2 = lw.eps1, lw.eps2
            s.qkv, s.o = ctypes.addressof(lw.qkv._parts), ctypes.addressof(lw.o._parts)
            s.gu, s.down = ctypes.addressof(lw.gate_up._parts), ctypes.addressof(lw.down._parts)
            s.n_qkv, s.n_gu = len(lw.qkv.weights), len(lw.gate_up.weights)
        self._caches: list[int] = []
        groups = [g for lw in layers for g in (lw.qkv, lw.o, lw.gate_up, lw.down)]
        self._mm_per_row = max(g._scratch_per_row for g in groups)

    def _bind_caches(self) -> tuple[int, int]:
        """Point the structs at the current KV caches (re-done only when the engine replaced them);
        (max_len, the C kernel's code for the caches' dtype)."""
        tensors = [(lw.attn.kv_cache.k, lw.attn.kv_cache.v) for lw in self.layers]
        ptrs = [k.data_ptr() for k, _ in tensors]
        dtype = tensors[0][0].dtype
        if ptrs != self._caches:
            for s, (k, v) in zip(self._structs, tensors):
                if not (k.dtype == v.dtype == dtype and dtype in KV_TYPE_CODES):
                    raise ValueError(f"the KV cache must be fp32, fp16 or bf16 in every layer, got {k.dtype}/{v.dtype}")
                if not (k.is_contiguous() and v.is_contiguous()):
                    raise ValueError("the KV cache must be contiguous for the CPU layer kernel")
                s.k_cache, s.v_cache = k.data_ptr(), v.data_ptr()
            self._caches = ptrs
        return int(tensors[0][0].shape[2]), KV_TYPE_CODES[dtype]

    def __call__(self, x: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                 sin_signed: torch.Tensor) -> None:
        if x.dtype != torch.float32 or not x.is_contiguous() or x.dim() != 2 or x.shape[1] != self.c:
            raise ValueError(f"x: expected contiguous fp32 (B, {self.c}), got {x.dtype} {tuple(x.shape)}")
        b = x.shape[0]
        max_len, kv_type = self._bind_caches()
        if int(positions.max()) >= max_len:
            raise ValueError(f"position {int(positions.max())} is beyond the KV cache ({max_len} tokens)")
        dims = _Dims(self.c, self.h, self.hkv, self.d, self.inter, max_len, len(self.layers), kv_type)
        nqkv = (self.h + 2 * self.hkv) * self.d
        threads = min(torch.get_num_threads(), 64)
        floats = (b * (self.c + nqkv + self.h * self.d + 3 * self.inter + self.c) + self.h * b * max_len
                  + self.h * b * threads * (self.d + 2))  # the last: partial attention over key ranges
        scratch = torch.empty(floats)
        mm = torch.empty(b * self._mm_per_row, dtype=torch.uint8)
        slots32, pos32 = slots.to(torch.int32).contiguous(), positions.to(torch.int32).contiguous()
        cos, sin_signed = cos.float().contiguous(), sin_signed.float().contiguous()
        self._fn(b, ctypes.addressof(dims), ctypes.addressof(self._structs), x.data_ptr(), slots32.data_ptr(),
                 pos32.data_ptr(), cos.data_ptr(), sin_signed.data_ptr(), threads, scratch.data_ptr(), mm.data_ptr())
