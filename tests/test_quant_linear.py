"""engine.quant_linear.QuantLinear: dispatch, reporting (kernel_paths, log, weight_bytes), dtypes,
checkpoint names, and the no-silent-fallback rule."""
import logging
import os

import torch

if not torch.cuda.is_available():  # before anything imports triton (see cuda_ext/README.md)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import engine.quant_linear as ql  # noqa: E402
from cuda_ext import quant_matmul_ref  # noqa: E402
from cuda_ext.cpu_native import kernel_name  # noqa: E402
from cuda_ext.testing import random_layer, rel_err  # noqa: E402
from engine.quant_linear import QuantLinear, kernel_paths, weight_bytes  # noqa: E402


def _layer(path=None, rank=8, bias=True, n=64, k=576, bits=3):
    packed, a, b = random_layer(n, k, bits, 128, rank=rank, seed=1)
    bvec = torch.randn(n, generator=torch.Generator().manual_seed(2)) * 0.1 if bias else None
    return QuantLinear(packed, a, b, bvec, path=path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_dispatch_and_dtypes(dtype, cpu_kernel):
    layer = _layer()
    assert layer.path == "cpu_int4"
    x = torch.randn(2, 3, 576).to(dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (2, 3, 64)
    ref = quant_matmul_ref(x, layer.packed, layer.A, layer.B, layer.bias)
    assert rel_err(y, ref) < 1e-2


def test_reference_path_on_request(monkeypatch):
    assert _layer(path="reference").path == "reference"
    monkeypatch.setenv(ql.ENV_PATH, "reference")
    layer = _layer()
    assert layer.path == "reference"
    x = torch.randn(1, 576)
    assert torch.equal(layer(x), quant_matmul_ref(x, layer.packed, layer.A, layer.B, layer.bias))
    with pytest.raises(ValueError, match="kernel path 'fast' unknown"):
        _layer(path="fast")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only: the Triton path in the interpreter")
def test_triton_path_in_interpreter_matches_cpu_path():
    tri, cpu = _layer(path="triton"), _layer()
    x = torch.randn(2, 576).half()
    assert rel_err(tri(x), cpu(x)) < 2e-2


def test_kernel_paths_log_and_weight_bytes(caplog, cpu_kernel):
    ql._ANNOUNCED.clear()
    with caplog.at_level(logging.INFO, logger="fbserve.kernels"):
        layer = _layer(bits=2)
    assert any("kernel path cpu_int4 for 2-bit" in r.getMessage() for r in caplog.records)
    rows = [r for r in kernel_paths() if r["bits"] == 2 and r["path"] == "cpu_int4"]
    assert rows and rows[0]["device"] == "cpu" and rows[0]["layers"] >= 1 and rows[0]["fallback"] is None
    assert rows[0]["prefill"] == ql.cpu_prefill_path()
    assert rows[0]["prefill"].startswith(("bf16-gemm from ", "int4 (", "fbserve-avx512bf16 (", "fbserve-avx2 ("))
    assert rows[0]["decode"] == ql.cpu_decode_kernel()
    assert rows[0]["decode"] == (kernel_name() if cpu_kernel == "native" else "torch-int4 (disabled (FBSERVE_CPU_NATIVE=0))")
    wb = layer.weight_bytes()
    assert wb["packed"] == 64 * 576 * 2 // 8
    assert wb["scales_zeros"] == 2 * 2 * 5 * 64
    assert wb["branch"] == (8 * 576 + 64 * 8) * 2
    if cpu_kernel == "native":  # 2-bit tiles + fp16 scale and zero per group + fp16 B^T + fp32 bias
        assert wb["cpu_int4"] == 64 * 576 * 2 // 8 + 2 * 2 * 5 * 64 + 8 * 64 * 2 + 64 * 4
    else:
        assert wb["cpu_int4"] > (8 * 576 + 64 * 8) * 4  # torch's int4 pack + the fp32 branch copies
    model = torch.nn.Sequential(layer, torch.nn.ReLU(), _layer(bits=2))
    assert weight_bytes(model)["packed"] == 2 * wb["packed"]


def test_checkpoint_names_and_load_state_dict_rebuilds_cpu_pack():
    layer = _layer()
    assert set(layer.state_dict()) == {"qweight", "scales", "zeros", "qmeta", "A", "B", "bias"}
    other = _layer(bias=True)
    packed2, a2, b2 = random_layer(64, 576, 3, 128, rank=8, seed=9)
    src = QuantLinear(packed2, a2, b2, torch.zeros(64))
    other.load_state_dict(src.state_dict())
    x = torch.randn(1, 576)
    assert rel_err(other(x), src(x)) < 1e-6
    again = QuantLinear.from_state_dict(src.state_dict())
    assert again.rank == 8 and rel_err(again(x), src(x)) < 1e-6


def test_dtype_casts_keep_packed_tensors():
    layer = _layer().to(torch.bfloat16)
    assert layer.scales.dtype == torch.float16 and layer.A.dtype == torch.float16
    assert layer.qweight.dtype == torch.int32 and layer.bias.dtype == torch.bfloat16
    assert layer(torch.randn(1, 576).bfloat16()).dtype == torch.bfloat16


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only: simulates a Triton failure")
def test_triton_failure_raises_or_falls_back_loudly(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("ptxas exploded")

    monkeypatch.setattr(ql, "quant_matmul", broken)
    layer = _layer(path="triton")
    x = torch.randn(1, 576).half()
    with pytest.raises(RuntimeError, match="ptxas exploded"):
        layer(x)
    monkeypatch.setenv(ql.ENV_FALLBACK, "1")
    with caplog.at_level(logging.ERROR, logger="fbserve.kernels"):
        y = layer(x)
    assert layer.path == "reference" and "ptxas exploded" in layer.fallback_reason
    assert any("falls back" in r.getMessage() for r in caplog.records)
    assert any(r["fallback"] and "ptxas exploded" in r["fallback"] for r in kernel_paths())
    assert rel_err(y, quant_matmul_ref(x, layer.packed, layer.A, layer.B, layer.bias)) < 2e-3


def test_wrong_width_raises():
    with pytest.raises(ValueError, match="layer expects 576"):
        _layer()(torch.randn(1, 512))


def test_cpu_prefill_rows_use_the_bf16_gemm_when_asked(monkeypatch, cpu_kernel):
    import cuda_ext.cpu as cpu_mod

    layer = _layer()
    x = torch.randn(40, 576)
    monkeypatch.setenv(cpu_mod.BF16_PREFILL_ENV, "0")
    int4 = layer(x)
    assert ql.cpu_prefill_path().startswith(("int4 (disabled", "fbserve-avx512bf16 (disabled", "fbserve-avx2 (disabled"))
    monkeypatch.setenv(cpu_mod.BF16_PREFILL_ENV, "32")
    monkeypatch.setattr(cpu_mod, "_native_bf16", lambda: True)
    assert ql.cpu_prefill_path() == "bf16-gemm from 32 rows"
    bf16 = layer(x)
    ref = QuantLinear(layer.packed, layer.A, layer.B, layer.bias, path="reference")(x)
    assert not torch.equal(bf16, int4)
    assert rel_err(bf16, ref) < 1e-2 and rel_err(int4, ref) < 1e-2
