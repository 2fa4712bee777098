"""The packed weight layout every fbserve kernel reads ("fbq1"), and its inverse.

quant/ hands over, per linear layer of shape (N=out_features, K=in_features):
  codes  uint8   (N, K)  values in [0, 2**bits - 1]
  scales float16 (N, G)  G = ceil(K / group_size), the last group may be partial
  zeros  float16 (N, G)  integer-valued
with w[n, k] = (codes[n, k] - zeros[n, k // g]) * scales[n, k // g].

Layout (see cuda_ext/README.md for the picture):
  * K is cut into blocks of 512 values; each block is 32 chunks of 16 consecutive k.
    A block is stored as `bits` plane tiles of 16 rows x n_pad int32 words; word (row r, column n)
    of a plane holds the same r-th element of several chunks, one bit-field per chunk:
      4 bit: plane c // 8,  field 4 * (c % 8)
      2 bit: plane c // 16, field 2 * (c % 16)
      3 bit: low 2 bits in plane c // 16, field 2 * (c % 16); high bit in plane 2, bit c
    (3 bit is real 3-bit storage: two 2-bit planes and one 1-bit plane per 512 values.)
  * A K that is not a multiple of 512 ends with one tail block of 32 chunks of `tail_rows`
    (a power of two <= 16) values, so a K like 576 = 512 + 32 * 2 costs no padding at all.
  * Columns (n) are contiguous in memory, padded to n_pad = ceil(N / 16) * 16, so a thread reads
    4 neighbouring columns in one 16-byte load whatever N is.
  * Codes past K hold the zero point of their group (so the weight is exactly 0) where that group
    exists, else 0; scales and zeros of padded columns are 0.
  * scales/zeros are stored transposed, (G, n_pad): one group's values for a run of columns are
    contiguous, so a tile reads them coalesced.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

FORMAT_VERSION = 1
BLOCK_K = 512  # k values per full block
CHUNKS = 32  # chunks per block
ROWS = 16  # rows of a plane tile in a full block (the k extent of one tl.dot)
N_ALIGN = 16  # columns are padded to a multiple of this
SUPPORTED_BITS = (2, 3, 4)
SUPPORTED_GROUPS = (32, 64, 128)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def layout_dims(in_features: int, out_features: int, bits: int) -> dict[str, int]:
    """Sizes of the packed layout: full blocks, tail rows, padded K and N, rows of qweight."""
    n_full, rem = divmod(in_features, BLOCK_K)
    tail_rows = 0
    if rem:
        tail_rows = 1
        while tail_rows * CHUNKS < rem:
            tail_rows *= 2
    return {
        "n_full": n_full,
        "tail_rows": tail_rows,
        "k_pad": n_full * BLOCK_K + tail_rows * CHUNKS,
        "n_pad": _cdiv(out_features, N_ALIGN) * N_ALIGN,
        "rows": bits * (ROWS * n_full + tail_rows),
    }


@dataclass
class PackedWeight:
    """One quantized linear layer in the fbq1 layout.

    qweight: int32 (bits * (16 * n_full + tail_rows), n_pad), see the module docstring.
    scales:  float16 (G, n_pad), G = ceil(in_features / group_size); padded columns 0.
    zeros:   float16 (G, n_pad), integer-valued; padded columns 0.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int
    in_features: int
    out_features: int

    @property
    def dims(self) -> dict[str, int]:
        return layout_dims(self.in_features, self.out_features, self.bits)

    @property
    def groups(self) -> int:
        return _cdiv(self.in_features, self.group_size)

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def to(self, device: torch.device | str) -> PackedWeight:
        return PackedWeight(self.qweight.to(device), self.scales.to(device), self.zeros.to(device),
                            self.bits, self.group_size, self.in_features, self.out_features)

    def meta(self) -> torch.Tensor:
        """int32 (5,): [format version, bits, group_size, in_features, out_features]."""
        return torch.tensor([FORMAT_VERSION, self.bits, self.group_size, self.in_features,
                             self.out_features], dtype=torch.int32)

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Checkpoint tensors: <prefix>qweight int32, scales fp16, zeros fp16, qmeta int32 (5,)."""
        return {prefix + "qweight": self.qweight, prefix + "scales": self.scales,
                prefix + "zeros": self.zeros, prefix + "qmeta": self.meta()}

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], prefix: str = "") -> PackedWeight:
        """Inverse of state_dict; validates the version and every tensor's shape and dtype."""
        meta = [int(v) for v in sd[prefix + "qmeta"].tolist()]
        if meta[0] != FORMAT_VERSION:
            raise ValueError(f"{prefix}qmeta: packed format version {meta[0]}, this build reads {FORMAT_VERSION}")
        pw = cls(sd[prefix + "qweight"], sd[prefix + "scales"], sd[prefix + "zeros"], *meta[1:])
        pw.validate()
        return pw

    def validate(self) -> None:
        """Raise ValueError naming the first tensor whose shape/dtype breaks the layout."""
        _check_params(self.bits, self.group_size)
        d = self.dims
        want = {"qweight": ((d["rows"], d["n_pad"]), torch.int32),
                "scales": ((self.groups, d["n_pad"]), torch.float16),
                "zeros": ((self.groups, d["n_pad"]), torch.float16)}
        for name, (shape, dtype) in want.items():
            t = getattr(self, name)
            if tuple(t.shape) != shape or t.dtype != dtype or not t.is_contiguous():
                raise ValueError(f"packed {name}: expected a contiguous {dtype} {shape} for K={self.in_features}, "
                                 f"N={self.out_features}, bits={self.bits}; got {t.dtype} {tuple(t.shape)}")

    def nbytes(self) -> dict[str, int]:
        """Bytes by kind: 'packed' (qweight) and 'scales_zeros'."""
        return {"packed": self.qweight.numel() * 4,
                "scales_zeros": (self.scales.numel() + self.zeros.numel()) * 2}


def _check_params(bits: int, group_size: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} unsupported; supported: {SUPPORTED_BITS}")
    if group_size not in SUPPORTED_GROUPS:
        raise ValueError(f"group_size={group_size} unsupported; supported: {SUPPORTED_GROUPS}")


def _plane_fields(bits: int) -> list[tuple[int, int, int, int]]:
    """Per plane: (first chunk, chunks in plane, field width, code bit offset)."""
    if bits == 4:
        return [(8 * p, 8, 4, 0) for p in range(4)]
    if bits == 2:
        return [(0, 16, 2, 0), (16, 16, 2, 0)]
    return [(0, 16, 2, 0), (16, 16, 2, 0), (0, 32, 1, 2)]


def _to_words(chunked: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., 32 chunks, R) int64 codes -> (..., bits, R) int64 words (values < 2**32)."""
    planes = []
    for first, count, width, offset in _plane_fields(bits):
        fields = (chunked[..., first:first + count, :] >> offset) & ((1 << width) - 1)
        shifts = torch.arange(count, device=chunked.device, dtype=torch.int64) * width
        planes.append((fields << shifts[:, None]).sum(dim=-2))
    return torch.stack(planes, dim=-2)


def _block_codes(words: torch.Tensor, bits: int) -> torch.Tensor:
    """One block's words (bits, R, n_pad) int32 -> its codes (32 * R, n_pad) int32, k-major (chunk c holds
    k = c * R + r). int32 shifts sign-extend the top field; the mask removes that."""
    rows, n_pad = words.shape[1], words.shape[2]
    codes = torch.empty(CHUNKS, rows, n_pad, dtype=torch.int32, device=words.device)
    for p, (first, count, width, offset) in enumerate(_plane_fields(bits)):
        shifts = (torch.arange(count, device=words.device, dtype=torch.int32) * width).view(count, 1, 1)
        fields = (words[p].unsqueeze(0) >> shifts) & ((1 << width) - 1)
        if offset:
            codes[first:first + count] |= fields << offset
        else:
            codes[first:first + count] = fields
    return codes.view(CHUNKS * rows, n_pad)


def codes_k_major(packed: PackedWeight) -> torch.Tensor:
    """The codes as int32 (k_pad, n_pad), k-major (the transpose of the (N, K) code matrix, with the
    layout's padding: codes past K hold their group's zero point or 0, padded columns 0)."""
    d = packed.dims
    bits, n_pad, n_full, tail = packed.bits, d["n_pad"], d["n_full"], d["tail_rows"]
    qw = packed.qweight
    parts = [_block_codes(qw[b * bits * ROWS:(b + 1) * bits * ROWS].view(bits, ROWS, n_pad), bits)
             for b in range(n_full)]
    if tail:
        parts.append(_block_codes(qw[n_full * bits * ROWS:].view(bits, tail, n_pad), bits))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def pack(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
         group_size: int) -> PackedWeight:
    """Pack quant's codes uint8 (N, K), scales fp16 (N, G), zeros fp16 (N, G) into the fbq1 layout.

    Raises ValueError naming the argument when a shape, dtype, range or parameter is unsupported.
    """
    _check_params(bits, group_size)
    if codes.dim() != 2 or codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"codes: expected an integer (N, K) tensor, got {codes.dtype} {tuple(codes.shape)}")
    n, k = codes.shape
    g = _cdiv(k, group_size)
    for name, t in (("scales", scales), ("zeros", zeros)):
        if tuple(t.shape) != (n, g):
            raise ValueError(f"{name}: expected (N, G) = ({n}, {g}) for K={k}, group_size={group_size}; "
                             f"got {tuple(t.shape)}")
    c64 = codes.to(torch.int64)
    if k == 0 or n == 0:
        raise ValueError(f"codes: empty layer (N={n}, K={k})")
    if int(c64.min()) < 0 or int(c64.max()) >= (1 << bits):
        raise ValueError(f"codes: values must lie in [0, {(1 << bits) - 1}] for bits={bits}")
    z64 = zeros.to(torch.float64)
    if not torch.equal(z64, z64.round()):
        raise ValueError("zeros: must be integer-valued (the kernels subtract them exactly)")
    d = layout_dims(k, n, bits)
    n_pad, k_pad, n_full, tail = d["n_pad"], d["k_pad"], d["n_full"], d["tail_rows"]

    full = torch.zeros(n_pad, k_pad, dtype=torch.int64, device=codes.device)
    full[:n, :k] = c64
    if k_pad > k:  # pad with the zero point of the (partial) last group so the weight is exactly 0
        grp = torch.arange(k, k_pad, device=codes.device) // group_size
        has = grp < g
        pad = zeros.round().clamp(0, (1 << bits) - 1).to(torch.int64)[:, grp[has]]
        full[:n, k:][:, has] = pad

    parts = []
    if n_full:
        blocks = full[:, :n_full * BLOCK_K].reshape(n_pad, n_full, CHUNKS, ROWS)
        words = _to_words(blocks, bits)  # (n_pad, n_full, bits, 16)
        parts.append(words.permute(1, 2, 3, 0).reshape(-1, n_pad))
    if tail:
        blocks = full[:, n_full * BLOCK_K:].reshape(n_pad, CHUNKS, tail)
        words = _to_words(blocks, bits)  # (n_pad, bits, tail)
        parts.append(words.permute(1, 2, 0).reshape(-1, n_pad))
    qw = torch.cat(parts, dim=0)
    qw = torch.where(qw >= 2 ** 31, qw - 2 ** 32, qw).to(torch.int32).contiguous()

    def _groups_first(t: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(g, n_pad, dtype=torch.float16, device=t.device)
        out[:, :n] = t.to(torch.float16).t()
        return out

    pw = PackedWeight(qw, _groups_first(scales), _groups_first(zeros), bits, group_size, k, n)
    pw.validate()
    return pw


def unpack(packed: PackedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of pack: (codes uint8 (N, K), scales fp16 (N, G), zeros fp16 (N, G))."""
    packed.validate()
    n, k = packed.out_features, packed.in_features
    codes = codes_k_major(packed)[:k, :n].t().to(torch.uint8)
    return codes, packed.scales[:, :n].t().contiguous(), packed.zeros[:, :n].t().contiguous()
