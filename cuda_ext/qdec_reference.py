"""QDEC (dynamic error compensation) references: residual storage, channel selection, correction.

The residual R = W - W_hat of a linear (N out, K in) is stored 4-bit symmetric, input-channel-major:

  rcodes  uint8 (K, ceil(N / 2))  row k = the N codes of input channel k, two per byte: code n in the
          low nibble of byte n // 2 when n is even, the high nibble when odd; nibble = code + 8, codes
          in [-7, 7] (nibble 8 is 0; an odd N pads the last high nibble with 8)
  rscales fp16 (N,)               one scale per output channel: R[n, k] ~ code[k, n] * rscales[n]

so fetching input channel k is one contiguous read of ceil(N / 2) bytes.  Per decode step the
correction of one row x (K,) is  y += sum over k in idx of x[k] * dequant(rcodes[k]) (N,).

Selection: K is cut in 1024-channel chunks; each chunk picks k_chunk channels (all of a shorter chunk
when it has fewer), so every row selects the same `selected_count(K, k_chunk)` channels.
  exact   the k_chunk largest |x| of each chunk (torch.topk per chunk)
  approx  no sort: |x| is bucketed into 32 linear buckets between two calibrated thresholds (lo, hi)
          (below lo -> bucket 0, at or above hi -> bucket 31); the buckets above the one where the
          count from the top reaches k_chunk are taken whole, the rest of k_chunk comes from that
          bucket in channel order.  Ties inside a bucket are what makes it approximate.
"""
from __future__ import annotations

import torch

CHUNK = 1024
BUCKETS = 32
CODE_MAX = 7


def selected_count(k: int, k_chunk: int) -> int:
    """Channels selected per row for K input channels: k_chunk per full chunk, min(k_chunk, rest) after."""
    full, rest = divmod(k, CHUNK)
    return full * min(k_chunk, CHUNK) + min(k_chunk, rest)


def pack_rows(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes (K, N) in [-7, 7] -> uint8 (K, ceil(N / 2)), two per byte (layout above)."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be (K, N), got {tuple(codes.shape)}")
    if codes.numel() and int(codes.abs().max()) > CODE_MAX:
        raise ValueError(f"residual codes must lie in [-{CODE_MAX}, {CODE_MAX}]")
    k, n = codes.shape
    nib = (codes.to(torch.int16) + 8).to(torch.uint8)
    if n % 2:
        nib = torch.cat([nib, torch.full((k, 1), 8, dtype=torch.uint8, device=nib.device)], dim=1)
    return (nib[:, 0::2] | (nib[:, 1::2] << 4)).contiguous()


def unpack_rows(rcodes: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 (R, ceil(N / 2)) -> int8 codes (R, N)."""
    lo = (rcodes & 0xF).to(torch.int8) - 8
    hi = (rcodes >> 4).to(torch.int8) - 8
    return torch.stack([lo, hi], dim=-1).reshape(rcodes.shape[0], -1)[:, :n]


def dequant_rows(rcodes: torch.Tensor, rscales: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 (R, N) residual rows (all K rows, or those of `rows` int64 (R,)); R[n, k] = out[k, n]."""
    n = rscales.shape[0]
    sel = rcodes if rows is None else rcodes[rows]
    return unpack_rows(sel, n).float() * rscales.float()[None, :]


def exact_topk(x: torch.Tensor, k_chunk: int) -> torch.Tensor:
    """int64 (M, selected_count(K, k_chunk)): per 1024-chunk, the k_chunk largest |x| of each row of x (M, K)."""
    m, k = x.shape
    a = x.abs().float()
    out = []
    for c0 in range(0, k, CHUNK):
        seg = a[:, c0:c0 + CHUNK]
        kk = min(k_chunk, seg.shape[1])
        if kk:
            out.append(torch.topk(seg, kk, dim=1).indices + c0)
    return torch.cat(out, 1) if out else torch.empty((m, 0), dtype=torch.long, device=x.device)


def bucket_of(a: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """int64 bucket 0..31 of magnitudes `a` (fp32) between the calibrated thresholds lo < hi."""
    width = (hi - lo) / BUCKETS
    return ((a - lo) / width).floor().clamp(0, BUCKETS - 1).long()


def approx_topk(x: torch.Tensor, k_chunk: int, lo: float, hi: float) -> torch.Tensor:
    """int64 (M, selected_count(K, k_chunk)): the bucketed per-chunk selection (module docstring).

    No sort: a 32-bin histogram per chunk, a suffix sum over the bins, and a running count inside the
    threshold bucket.  Indices come out in channel order within each chunk."""
    m, k = x.shape
    if not hi > lo:
        raise ValueError(f"approx top-k needs thresholds lo < hi, got {lo}, {hi}")
    out = []
    for c0 in range(0, k, CHUNK):
        seg = x[:, c0:c0 + CHUNK].abs().float()  # (M, c)
        c = seg.shape[1]
        kk = min(k_chunk, c)
        if kk == 0:
            continue
        b = bucket_of(seg, lo, hi)  # (M, c)
        hist = torch.zeros((m, BUCKETS), dtype=torch.long, device=x.device).scatter_add_(1, b, torch.ones_like(b))
        above = hist.flip(1).cumsum(1).flip(1)  # above[:, j] = channels in buckets >= j
        # threshold bucket t: the highest j with above[j] >= kk (bucket 0 holds everything left)
        t = ((above >= kk).long() * torch.arange(BUCKETS, device=x.device)).amax(1, keepdim=True)  # (M, 1)
        strictly = torch.where(t + 1 < BUCKETS, above.gather(1, (t + 1).clamp(max=BUCKETS - 1)),
                               torch.zeros_like(t))  # (M, 1) taken whole
        in_t = b == t
        rank_in_t = in_t.long().cumsum(1)  # 1-based order of the channel inside bucket t
        take = (b > t) | (in_t & (rank_in_t <= kk - strictly))
        # exactly kk per row, in channel order: each taken channel goes to its rank among the taken, the
        # rest to a spare last column (no nonzero(): no host sync, so a CUDA graph can capture it)
        dest = torch.where(take, take.long().cumsum(1) - 1, kk)
        chans = torch.arange(c0, c0 + c, device=x.device).expand(m, c)
        out.append(torch.empty((m, kk + 1), dtype=torch.long, device=x.device).scatter_(1, dest, chans)[:, :kk])
    return torch.cat(out, 1) if out else torch.empty((m, 0), dtype=torch.long, device=x.device)


def qdec_correction_ref(x: torch.Tensor, idx: torch.Tensor, rcodes: torch.Tensor,
                        rscales: torch.Tensor) -> torch.Tensor:
    """fp32 (M, N): row m = sum_j x[m, idx[m, j]] * dequant(rcodes[idx[m, j]]).

    x: (M, K) any float dtype.  idx: int (M, S) channel indices (duplicates count twice).
    rcodes: uint8 (K, ceil(N/2)); rscales: fp16 (N,).  Meaning of cuda_ext.qdec_kernel."""
    m, s = idx.shape
    n = rscales.shape[0]
    if s == 0:
        return torch.zeros((m, n), dtype=torch.float32, device=x.device)
    idx = idx.long()
    rows = dequant_rows(rcodes, rscales, idx.reshape(-1)).view(m, s, n)  # (M, S, N)
    xs = x.float().gather(1, idx)  # (M, S)
    return torch.einsum("ms,msn->mn", xs, rows)
