"""QDEC selection and the Triton correction kernel (interpreter on CPU) vs the PyTorch reference."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

import pytest  # noqa: E402

from cuda_ext.qdec_kernel import qdec_correction  # noqa: E402
from cuda_ext.qdec_reference import (approx_topk, exact_topk, pack_rows, qdec_correction_ref,  # noqa: E402
                                     selected_count)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _residual(k: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-7, 8, (k, n), generator=g, dtype=torch.int8)
    scales = (torch.rand(n, generator=g) * 0.01 + 0.001).half()
    return pack_rows(codes), scales


@pytest.mark.parametrize("m,k,n,k_chunk,dtype", [(1, 576, 960, 8, torch.float16), (2, 1536, 577, 64, torch.bfloat16),
                                                 (3, 100, 64, 16, torch.float32)])
def test_kernel_matches_reference(m, k, n, k_chunk, dtype) -> None:
    rc, rs = _residual(k, n, seed=k + n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    idx = exact_topk(x, k_chunk)
    ref = qdec_correction_ref(x, idx, rc, rs)
    if DEV == "cuda":
        rc = rc.pin_memory()  # zero-copy reads of host rows
        x, idx = x.cuda(), idx.cuda()
    out = qdec_correction(x, idx, rc, rs).cpu()
    assert out.dtype == torch.float32 and out.shape == (m, n)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5)
    # accumulates into a given buffer
    acc = torch.ones(m, n, device=x.device)
    assert torch.allclose(qdec_correction(x, idx, rc, rs, acc).cpu(), ref + 1, rtol=1e-4, atol=1e-5)


def test_kernel_rejects_bad_layouts() -> None:
    rc, rs = _residual(64, 32, 0)
    x = torch.randn(1, 64).half().to(DEV)
    idx = torch.zeros(1, 4, dtype=torch.long, device=DEV)
    with pytest.raises(ValueError, match="rcodes"):
        qdec_correction(x, idx, rc[:, :8], rs)
    with pytest.raises(ValueError, match="rscales"):
        qdec_correction(x, idx, rc, rs.float())


def _activations(m: int, k: int, seed: int) -> torch.Tensor:
    """Transformer-like inputs: Laplace bulk, a few persistent outlier channels, heavy per-token tails."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # Laplace.sample takes no generator
    x = torch.distributions.Laplace(0.0, 1.0).sample((m, k))
    outliers = torch.randperm(k, generator=g)[: k // 100]
    x[:, outliers] *= 8
    return x * (torch.rand(m, 1, generator=g) + 0.5)


@pytest.mark.parametrize("k_chunk", [8, 32])
def test_approx_topk_recall_vs_exact(k_chunk) -> None:
    k = 1536 + 576  # a full chunk and a partial one
    calib = _activations(256, k, seed=1).abs().flatten()
    lo, hi = torch.quantile(calib[:: 7][:500_000], torch.tensor([1 - 1 / 8, 1 - 1 / 1024])).tolist()
    x = _activations(64, k, seed=2)
    a, e = approx_topk(x, k_chunk, lo, hi), exact_topk(x, k_chunk)
    assert a.shape == e.shape == (64, selected_count(k, k_chunk))
    assert all(len(set(r)) == len(r) for r in a.tolist())  # no duplicates
    recall = sum(len(set(ra) & set(re)) for ra, re in zip(a.tolist(), e.tolist())) / e.numel()
    print(f"approx recall vs exact at k_chunk {k_chunk}: {recall:.3f}")
    assert recall >= 0.75, recall
    # the selected channels carry most of what the exact top-k carries
    xa, xe = x.abs().gather(1, a).sum(), x.abs().gather(1, e).sum()
    assert float(xa / xe) > 0.9  # measured 0.946 at k_chunk 32


@pytest.mark.parametrize("k_chunk", [8, 64, 1024])
def test_dense_evaluation_correction_matches_reference(k_chunk) -> None:
    """engine.qdec.correction with the evaluation's dense residual copy (a CSR row-gather matmul for few
    channels, a masked matmul for many) is the reference gather sum, for every selection."""
    from cuda_ext.qdec_reference import dequant_rows
    from engine.qdec import QdecLayer, correction, select_channels

    k, n = 1536, 577
    rc, rs = _residual(k, n, seed=3)
    x = torch.randn(40, k, generator=torch.Generator().manual_seed(4))
    layer = QdecLayer("l", "down", rc, rs, 0.5, 2.5, torch.randperm(k, generator=torch.Generator().manual_seed(5)))
    for how in ("exact", "approx", "random", "static"):
        idx = select_channels(x, layer, k_chunk, how, torch.Generator().manual_seed(6))
        assert idx.shape == (40, selected_count(k, k_chunk))
        ref = qdec_correction_ref(x, idx, rc, rs)
        layer.dense = dequant_rows(rc, rs)
        got = correction(x, idx, layer)
        layer.dense = None
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4), (how, float((got - ref).abs().max()))


@pytest.mark.parametrize("m,k,k_chunk,dtype", [(1, 576, 8, torch.float16), (2, 1536, 8, torch.float32),
                                               (3, 4096, 16, torch.bfloat16), (1, 11008, 64, torch.float16),
                                               (1, 100, 200, torch.float32), (2, 2100, 1024, torch.float16),
                                               (1, 2048, 0, torch.float32)])
def test_fused_selection_is_approx_topk(m, k, k_chunk, dtype) -> None:
    """qdec_select (one launch per step) picks exactly approx_topk's channels, in the same order, for full
    and partial chunks, k_chunk above a short chunk's size, and k_chunk 0."""
    from cuda_ext.qdec_kernel import qdec_select

    x = _activations(m, k, seed=k + k_chunk).to(dtype)
    lo, hi = 0.05, 2.5
    ref = approx_topk(x, k_chunk, lo, hi)
    got = qdec_select(x.to(DEV), k_chunk, lo, hi).cpu()
    assert got.dtype == torch.int32 and got.shape == ref.shape == (m, selected_count(k, k_chunk))
    assert torch.equal(got.long(), ref)
    with pytest.raises(ValueError, match="lo < hi"):
        qdec_select(x.to(DEV), k_chunk, 1.0, 1.0)


def test_approx_topk_takes_k_chunk_per_chunk_in_channel_order() -> None:
    """The sync-free formulation (no nonzero()): each chunk's channels ascending, all inside the chunk."""
    x = _activations(2, 2500, seed=3)
    idx = approx_topk(x, 8, 0.05, 2.5)
    assert idx.shape == (2, 8 + 8 + 8)
    for c, c0 in enumerate((0, 1024, 2048)):
        part = idx[:, 8 * c:8 * c + 8]
        assert bool(((part >= c0) & (part < min(c0 + 1024, 2500))).all())
        assert bool((part[:, 1:] > part[:, :-1]).all())


@pytest.mark.parametrize("m,k,n,k_chunk,dtype", [(1, 576, 960, 8, torch.float16), (2, 2100, 577, 16, torch.bfloat16),
                                                 (1, 4096, 300, 64, torch.float16), (3, 100, 64, 200, torch.float32),
                                                 (1, 2048, 33, 0, torch.float16)])
def test_select_gather_in_one_launch_matches_reference(m, k, n, k_chunk, dtype) -> None:
    """qdec_select_gather (selection + gather, one launch, per-chunk partials) sums to the reference
    correction at approx_topk's channels; qdec_add adds the chunks to y and rounds once."""
    from cuda_ext.qdec_kernel import qdec_add, qdec_select_gather

    rc, rs = _residual(k, n, seed=k + n)
    x = _activations(m, k, seed=k + k_chunk).to(dtype)
    lo, hi = 0.05, 2.5
    ref = qdec_correction_ref(x, approx_topk(x, k_chunk, lo, hi), rc, rs)
    if DEV == "cuda":
        rc, rs = rc.pin_memory(), rs.pin_memory()
    part = qdec_select_gather(x.to(DEV), k_chunk, lo, hi, rc, rs)
    chunks = -(-k // 1024)
    assert part.dtype == torch.float32 and part.shape == (m, chunks, n)
    assert torch.allclose(part.sum(1).cpu(), ref, rtol=1e-4, atol=1e-5)
    y = torch.randn(m, n, generator=torch.Generator().manual_seed(1)).to(torch.float16)
    added = qdec_add(y.clone().to(DEV), part).cpu()
    assert torch.equal(added, (y.float() + part.sum(1).cpu()).half())  # fp32 sum in chunk order, one rounding
    with pytest.raises(ValueError, match="lo < hi"):
        qdec_select_gather(x.to(DEV), k_chunk, 1.0, 1.0, rc, rs)
    with pytest.raises(ValueError, match="rcodes"):
        qdec_select_gather(x.to(DEV), k_chunk, lo, hi, rc[:, :2], rs)
