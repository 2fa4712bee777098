"""The QDEC gather kernel COMPILED on a real CUDA GPU vs cuda_ext.qdec_reference (issue 5).

Skipped without CUDA (CI has none); `bash bench/gpu_session.sh` runs it on a lent GPU.  What only a GPU
confirms (cuda_ext/qdec_kernel.py "GPU status"): the zero-copy read of PINNED host residual rows through
the device-addressable pointer, fp32 atomics under real concurrency, the SideStream launch/join, and the
served model's QDEC hooks on CUDA (gather started from the pre-hook on the side stream, joined after the
base kernel).
FBSERVE_GPU_DRYRUN=1 without CUDA runs the CPU-runnable part under TRITON_INTERPRET=1 (typo check).
"""
from __future__ import annotations


import pytest
import torch

from tests.gpu_support import CUDA, DEV, GPU_MARKS, cuda_only_mark, record  # first: it sets TRITON_INTERPRET without CUDA
from cuda_ext.qdec_kernel import qdec_correction  # noqa: E402
from cuda_ext.qdec_reference import exact_topk, pack_rows, qdec_correction_ref  # noqa: E402
from tests.test_qdec_residuals import with_residuals  # noqa: E402,F401  (module fixture)
from tests.test_quant_checkpoint import tiny_model  # noqa: E402,F401

pytestmark = GPU_MARKS
cuda_only = cuda_only_mark("pinned host memory, streams")


def pick(gpu, dry):
    return gpu if CUDA else dry


def residual(k: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-7, 8, (k, n), generator=g, dtype=torch.int8)
    return pack_rows(codes), (torch.rand(n, generator=g) * 0.01 + 0.001).half()


def close(out: torch.Tensor, ref: torch.Tensor, what: str, rows: int = 64, **fields) -> None:
    """fp32 sums of `rows` terms in another order: rtol 1e-4, atol 1e-5 per 64 summed rows (one missing or
    doubled row is ~1e-2 off, far outside)."""
    out = out.cpu()
    err = float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
    record(what, rel_max_err=err, rows=rows, **fields)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5 * max(1.0, rows / 64)), (what, fields, err)


@pytest.mark.parametrize("where", pick(["pinned", "pinned+scales", "device"], ["cpu"]))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("m,k,n,k_chunk", pick([(1, 4096, 4096, 8), (1, 11008, 4096, 128), (2, 4096, 11009, 64),
                                                (2, 4096, 12288, 1024)],
                                               [(1, 576, 960, 8), (2, 1536, 577, 64)]))
def test_gather_matches_reference(m, k, n, k_chunk, dtype, where):
    """Selected rows read from pinned host memory (zero-copy) or device memory: exactly the reference sum."""
    rc, rs = residual(k, n, seed=k + n + m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    idx = exact_topk(x, k_chunk)
    ref = qdec_correction_ref(x, idx, rc, rs)
    if where.startswith("pinned"):
        rc = rc.pin_memory()
        assert rc.is_pinned() and rc.device.type == "cpu"
        if where == "pinned+scales":  # the per-output scales read zero-copy too: no GPU memory at all
            rs = rs.pin_memory()
    elif where == "device":
        rc = rc.to(DEV)
    out = qdec_correction(x.to(DEV), idx.to(DEV), rc, rs)
    assert out.device.type == DEV and out.dtype == torch.float32 and out.shape == (m, n)
    dname = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")
    close(out, ref, "qdec_gather", where=where, dtype=dname, m=m, k=k, n=n, k_chunk=k_chunk, rows=idx.shape[1])
    acc = torch.ones(m, n, device=DEV)
    close(qdec_correction(x.to(DEV), idx.to(DEV), rc, rs, acc), ref + 1, "qdec_gather_acc", rows=idx.shape[1],
          where=where)


def test_repeated_gathers_are_stable():
    """fp32 atomics: repeated launches agree with the reference every time (order changes only rounding)."""
    k, n = pick((11008, 4096), (576, 64))
    rc, rs = residual(k, n, seed=1)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(2)).half()
    idx = exact_topk(x, pick(64, 8))
    ref = qdec_correction_ref(x, idx, rc, rs)
    if CUDA:
        rc = rc.pin_memory()
    outs = [qdec_correction(x.to(DEV), idx.to(DEV), rc, rs) for _ in range(pick(20, 2))]
    for o in outs:
        close(o, ref, "qdec_repeat", rows=idx.shape[1])


@cuda_only
def test_unpinned_host_residual_raises():
    rc, rs = residual(256, 64, 0)
    x = torch.randn(1, 256, device=DEV).half()
    idx = torch.zeros(1, 8, dtype=torch.long, device=DEV)
    with pytest.raises(ValueError, match="pinned"):
        qdec_correction(x, idx, rc, rs)


@cuda_only
def test_side_stream_overlap_matches_serial():
    """SideStream.launch (correction on its own stream) + base quant_matmul + join == the serial result."""
    from cuda_ext import quant_matmul, quant_matmul_ref
    from cuda_ext.qdec_kernel import SideStream, qdec_correction
    from cuda_ext.testing import random_packed

    n, k = 4096, 4096
    packed = random_packed(n, k, 3, 128, device=DEV)  # random words made on the GPU (no CPU packing)
    a = (torch.randn(32, k, device=DEV) * 0.05).half()
    b = (torch.randn(n, 32, device=DEV) * 0.05).half()
    rc, rs = residual(k, n, seed=5)
    rc = rc.pin_memory()
    side = SideStream(torch.device(DEV))
    for step in range(5):
        x = torch.randn(1, k, device=DEV).half()
        idx = exact_topk(x, 32)
        acc = side.launch(x, lambda v: qdec_correction(v, idx, rc, rs))
        y = quant_matmul(x, packed, a, b)
        y = y.float() + side.join(acc)
        torch.cuda.synchronize()
        ref = quant_matmul_ref(x, packed, a, b).float() + qdec_correction_ref(x.cpu(), idx.cpu(), rc, rs).to(DEV)
        err = float((y - ref).abs().mean() / ref.abs().mean())
        record("qdec_side_stream", step=step, rel_err=err)
        assert err < 2e-3, (step, err)


def _qdec_decode_error(checkpoint, merge: bool) -> float:
    """Relative error of the CUDA model's decode logits with QDEC on every channel (exact selection) against
    the CPU model's (layers apart); `merge`: engine.merge on the CUDA model after QDEC is attached."""
    from engine import qdec
    from engine.merge import merge_projections
    from models.loader import load_model

    tokens = torch.randint(3, 60, (1, 12), generator=torch.Generator().manual_seed(0))
    logits = {}
    for dev, dtype in (("cpu", torch.float32), (DEV, torch.float16)):
        model = load_model(str(checkpoint), device=dev, dtype=dtype).model
        q = qdec.attach(model, checkpoint, mode="cpu", k_chunk=1024, select="exact")
        assert q.enabled, q.reason
        if dev == DEV and merge:
            status = merge_projections(model)
            assert status["enabled"] and status.get("declined") is None, status
            assert len(q.layers) == 4 * len(model.model.layers)  # one residual per merged layer
        model.setup_cache(1, 64)
        slots = torch.tensor([0], device=dev)
        with torch.inference_mode():
            model(tokens[:, :-1].to(dev), torch.arange(11, device=dev)[None], slots)
            logits[dev] = model(tokens[:, -1:].to(dev), torch.tensor([[11]], device=dev), slots).float().cpu()
        if dev == DEV:
            assert q.side is not None and all(r.rcodes.is_pinned() and r.rscales.is_pinned() for r in q.layers.values())
    return float((logits[DEV] - logits["cpu"]).norm() / logits["cpu"].norm())


@cuda_only
def test_served_model_overlaps_qdec_on_cuda_and_matches_cpu(with_residuals):  # noqa: F811
    """engine.qdec on a CUDA model: residuals pinned, the gather launched on the side stream from the
    pre-hook, joined in the hook; decode logits with every channel corrected match the CPU model's."""
    err = _qdec_decode_error(with_residuals, merge=False)
    record("qdec_engine_side_stream", rel_err=err)
    assert err < 1e-2, err


@cuda_only
def test_qdec_on_merged_projections_matches_cpu(with_residuals):  # noqa: F811
    """engine.merge on CUDA with QDEC on: one pinned residual per merged layer (q/k/v, gate/up), its
    gather on the side stream; decode logits match the CPU model's with the layers apart."""
    err = _qdec_decode_error(with_residuals, merge=True)
    record("qdec_merged_projections", rel_err=err)
    assert err < 1e-2, err


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("m,k,k_chunk", pick([(1, 4096, 8), (1, 11008, 16), (4, 14336, 64), (2, 4096, 1024)],
                                             [(1, 2100, 8)]))
def test_fused_selection_matches_reference(m, k, k_chunk, dtype):
    """qdec_select compiled (one launch) picks approx_topk's channels exactly."""
    from cuda_ext.qdec_kernel import qdec_select
    from cuda_ext.qdec_reference import approx_topk

    g = torch.Generator().manual_seed(k + m)
    x = (torch.randn(m, k, generator=g) * torch.rand(k, generator=g) * 3).to(dtype)
    ref = approx_topk(x, k_chunk, 0.05, 2.5)
    got = qdec_select(x.to(DEV), k_chunk, 0.05, 2.5).cpu().long()
    agree = float((got == ref).float().mean())
    record("qdec_select", m=m, k=k, k_chunk=k_chunk, agree=agree)
    assert torch.equal(got, ref), agree


@cuda_only
def test_side_stream_captured_in_a_cuda_graph_matches_eager():
    """Selection + gather in one launch on the side stream, forked and joined inside a CUDA graph capture
    around the base kernel, then qdec_add: each replay on new inputs equals the eager reference (what
    graphed QDEC decode does)."""
    from cuda_ext import quant_matmul, quant_matmul_ref
    from cuda_ext.qdec_kernel import SideStream, qdec_add, qdec_select_gather
    from cuda_ext.qdec_reference import approx_topk
    from cuda_ext.testing import random_packed

    n, k, k_chunk = 4096, 4096, 16
    packed = random_packed(n, k, 3, 128, device=DEV)
    rc, rs = residual(k, n, seed=7)
    rc, rs = rc.pin_memory(), rs.pin_memory()
    side = SideStream(torch.device(DEV))
    x = torch.zeros(1, k, device=DEV, dtype=torch.float16)

    def step():
        part = side.launch(x, lambda v: qdec_select_gather(v, k_chunk, 0.05, 2.5, rc, rs))
        y = quant_matmul(x, packed)
        return qdec_add(y, side.join(part)).float()

    warm = torch.cuda.Stream()
    warm.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warm):
        step()
    torch.cuda.current_stream().wait_stream(warm)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for rep in range(4):
        x.copy_(torch.randn(1, k, generator=torch.Generator().manual_seed(rep)).half().to(DEV))
        graph.replay()
        torch.cuda.synchronize()
        xc = x.cpu()
        ref = quant_matmul_ref(x, packed).float().cpu() + qdec_correction_ref(xc, approx_topk(xc, k_chunk, 0.05, 2.5),
                                                                             rc, rs)
        err = float((out.cpu() - ref).abs().max() / ref.abs().max())
        record("qdec_graph_replay", rep=rep, rel_max_err=err)
        assert err < 2e-3, (rep, err)


@cuda_only
def test_tune_qdec_times_graphed_steps_on_cuda(with_residuals, tmp_path):  # noqa: F811
    """`fbserve tune-qdec` on CUDA times the graphed decode step (QDEC captured in it) and saves a choice
    that `attach(mode="auto")` serves."""
    import shutil

    from engine import qdec
    from engine.qdec_tune import tune
    from models.loader import load_model

    ckpt = tmp_path / "ckpt"
    shutil.copytree(with_residuals, ckpt)
    out = tune(str(ckpt), device="cuda", ks=[0, 8, 64], steps=5, budget_pct=50.0)
    record("tune_qdec_cuda", base_ms=out.base_step_s * 1e3, chosen=out.chosen.k_chunk, note=out.note,
           added_ms={t: [round(a * 1e3, 4) for a in v.added_s] for t, v in out.layer_types.items()})
    # every step replayed from a graph (a failed capture re-times everything eagerly and says why in the
    # note: seen 2026-11-27, the added times were those of eager steps, bench/RESULTS.md)
    assert out.device == "cuda" and out.note.startswith("median decode step (batch 1, CUDA graph)"), out.note
    model = load_model(str(ckpt), device=DEV, dtype=torch.float16).model
    q = qdec.attach(model, ckpt, mode="auto")
    assert q.k_source.startswith("tune-qdec choice"), q.k_source
