"""cuda_ext.fused (one launch for RMSNorm, one for the rotary embedding of q and k) against the PyTorch
module path it replaces on CUDA (models/llama.py), under the Triton interpreter on CPU."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

import pytest  # noqa: E402

from cuda_ext.fused import rms_norm, rope  # noqa: E402
from models.llama import RMSNorm, rotate_half  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # a few units of the last place


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 576), (2, 7, 576), (3, 4096), (5, 100)])
def test_rms_norm_matches_the_module(shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    mod = RMSNorm(shape[-1], 1e-5)
    with torch.no_grad():
        mod.weight.copy_(torch.rand(shape[-1], generator=g) + 0.5)
    mod = mod.to(dtype)
    with torch.no_grad():
        want = mod(x).float()
    got = rms_norm(x.to(DEV), mod.weight.detach().to(DEV), mod.eps)
    assert got.dtype == dtype and got.shape == x.shape
    err = float(((got.float().cpu() - want).abs() / want.abs().clamp_min(1.0)).max())
    assert err < TOL[dtype], err


def _rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """models.llama.Attention's rotary step, in fp32."""
    c, s = cos[:, :, None, :].float(), sin[:, :, None, :].float()
    return x.float() * c + rotate_half(x.float()) * s


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,t,h,hkv,d", [(1, 1, 9, 3, 64), (2, 5, 32, 8, 128), (3, 1, 4, 4, 16), (2, 3, 6, 2, 80)])
def test_rope_matches_the_module_in_place(b, t, h, hkv, d, dtype):
    g = torch.Generator().manual_seed(b * 100 + t * 10 + h)
    qkv = torch.randn(b, t, (h + 2 * hkv) * d, generator=g).to(dtype)  # q, k, v side by side: strided tokens
    q = qkv[..., :h * d].view(b, t, h, d)
    k = qkv[..., h * d:(h + hkv) * d].view(b, t, hkv, d)
    v_before = qkv[..., (h + hkv) * d:].clone()
    ang = torch.rand(b, t, d // 2, generator=g) * 6.3
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(dtype), torch.cat([ang.sin()] * 2, -1).to(dtype)
    want_q, want_k = _rope_ref(q, cos, sin), _rope_ref(k, cos, sin)
    qkv_dev = qkv.to(DEV)
    q_dev = qkv_dev[..., :h * d].view(b, t, h, d)
    k_dev = qkv_dev[..., h * d:(h + hkv) * d].view(b, t, hkv, d)
    got_q, got_k = rope(q_dev, k_dev, cos.to(DEV), sin.to(DEV))
    assert got_q.data_ptr() == q_dev.data_ptr() and got_k.data_ptr() == k_dev.data_ptr()  # in place
    for got, want in ((got_q, want_q), (got_k, want_k)):
        err = float((got.float().cpu() - want).abs().max() / want.abs().max())
        assert err < TOL[dtype], err
    assert torch.equal(qkv_dev[..., (h + hkv) * d:].cpu(), v_before)  # v untouched


def test_bad_shapes_are_refused_with_their_names():
    x = torch.randn(2, 64).to(DEV)
    with pytest.raises(ValueError, match=r"weight must be \(64,\)"):
        rms_norm(x, torch.ones(32, device=DEV), 1e-5)
    q, k = torch.randn(1, 1, 4, 47, device=DEV), torch.randn(1, 1, 2, 47, device=DEV)
    cs = torch.randn(1, 1, 47, device=DEV)
    with pytest.raises(ValueError, match="even head dim"):
        rope(q, k, cs, cs)
    q, k = torch.randn(1, 1, 4, 64, device=DEV), torch.randn(1, 2, 2, 64, device=DEV)
    with pytest.raises(ValueError, match="do not match"):
        rope(q, k, torch.randn(1, 1, 64, device=DEV), torch.randn(1, 1, 64, device=DEV))
