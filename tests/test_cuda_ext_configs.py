"""Per-arch config tables, split-K sizing, the static roofline, the PTX load reader and the
GPU-only tools' behaviour without a GPU."""
import json
import logging
import os

import torch

if not torch.cuda.is_available():  # before anything imports triton (see cuda_ext/README.md)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from cuda_ext import configs  # noqa: E402
from cuda_ext.check import weight_load_widths  # noqa: E402
from cuda_ext.launch import choose_split  # noqa: E402
from cuda_ext.roofline import call_traffic, ideal_parts  # noqa: E402


@pytest.mark.parametrize("arch", configs.ARCHS + (configs.INTERPRETER,))
def test_every_shipped_table_answers_every_m(arch):
    for m in (1, 2, 16, 17, 64, 4096):
        kind, cfg = configs.gemm_config(arch, m, 3)
        assert kind == ("decode" if m <= 16 else "prefill") and cfg.block_n % 16 == 0
        assert configs.branch_config(arch, m).block_k >= 16


def test_newer_arch_uses_nearest_older_table_loudly(caplog):
    with caplog.at_level(logging.WARNING, logger="fbserve.kernels"):
        table = configs.load_table("sm_100")
    assert table["arch"] == "sm_90" and any("sm_100" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="sm_70"):
        configs.load_table("sm_70")


def test_write_rule_replaces_matching_rule(tmp_path):
    path = tmp_path / "sm_90.json"
    path.write_text(json.dumps(configs.load_table("sm_90")))
    rule = configs.as_rule(configs.GemmConfig(16, 64, 4, 2, 3.0, 12), m_max=1)
    configs.write_rule("sm_90", "decode", rule, path)
    decode = json.loads(path.read_text())["decode"]
    assert decode[0] == rule and sum(r.get("m_max") == 1 for r in decode) == 1
    with pytest.raises(ValueError, match="kind must be"):
        configs.write_rule("sm_90", "gemv", rule, path)


def test_split_k_never_leaves_an_empty_split():
    for n_tiles in (1, 5, 48, 200):
        for n_blocks in (1, 2, 3, 8, 22):
            s = choose_split(n_tiles, n_blocks, 132, 2, 16)
            per = -(-n_blocks // s)
            assert 1 <= s <= n_blocks and (s - 1) * per < n_blocks


def test_roofline_counts_x_rereads_and_padding():
    t = call_traffic(4096, 4096, 1, 4, 128, 0, "sm_90")
    ideal = ideal_parts(4096, 4096, 1, 4, 128, 0)
    assert t.parts["weights"] == ideal["weights"] and t.parts["scales_zeros"] == ideal["scales_zeros"]
    block_n = configs.gemm_config("sm_90", 1, 4)[1].block_n
    assert t.parts["x"] == (4096 // block_n) * ideal["x"]  # x is re-read by each column tile
    assert 1.0 < t.ratio < 1.1 and t.dram_ratio == pytest.approx(1.0, abs=1e-3)


def test_weight_load_reader_follows_the_pointer():
    ptx = """
    ld.param.u64 %rd1, [k_param_1];
    ld.param.u64 %rd2, [k_param_0];
    mad.wide.s32 %rd3, %r1, 4, %rd1;
    add.s64 %rd4, %rd3, 64;
    @%p1 ld.global.L1::evict_first.v4.b32 { %r2, %r3, %r4, %r5 }, [ %rd4 + 0 ];
    ld.global.b16 { %rs1 }, [ %rd2 + 0 ];
    ld.global.b32 %r6, [ %rd3 + 0 ];
    """
    assert weight_load_widths(ptx, 1) == [16, 4]
    assert weight_load_widths(ptx, 0) == [2]


def test_gpu_tools_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("has a GPU: bench/kernels.py would run for minutes")
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("bench_kernels", Path(__file__).parents[1] / "bench" / "kernels.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main([]) == 0
    from cuda_ext import autotune
    assert autotune.main([]) == 1
    one_row = autotune.gemm_candidates(True, 1)  # gemv's forms for one row are candidates, each once
    assert len(set(one_row)) == len(one_row)
    assert any(c.fused_branch for c in one_row) and any(not c.half2 for c in one_row if c.block_m == 1)
    assert not any(c.fused_branch for c in autotune.gemm_candidates(True, 4))  # one row only
    for model, shapes in bench.MODELS.items():  # the "apart" rows: 7 layers, the same weights as the 4
        apart = bench.apart_shapes(model)
        assert len(apart) == 7 and sum(n * k for n, k in apart) == sum(n * k for n, k in shapes)
        assert len({k for _, k in apart}) == len({k for _, k in shapes})
    # the rows are timed in priority order (a step cut short keeps these first), every name a real row
    for model in bench.MODELS:
        variants, vshapes, splits = bench.variant_specs(model)
        names = [v[0] for v in variants]
        assert names[:len(bench.PRIORITY)] == list(bench.PRIORITY) and len(set(names)) == len(names) == 21
        assert all(sum(parts) == n for n, parts in bench.SPLITS[model].items())  # "as served" splits add up
        served = splits["ours 3-bit g128 r64 merged, a branch per part (as served)"]
        shapes = dict(bench.MODELS[model])
        assert bench.stack_ideal_bytes(bench.MODELS[model], 1, 3, 64, served) - bench.stack_ideal_bytes(
            bench.MODELS[model], 1, 3, 64) == bench.LAYERS * sum((len(p) - 1) * 64 * shapes[n] * 2 for n, p in served.items())


def test_kernels_check_decode_on_sm90():
    """`fbserve kernels check` on one arch and kernel: compiles, no spill, 16-byte weight loads."""
    from cuda_ext.check import main
    assert main(["--arch", "sm_90", "--kind", "decode", "--jobs", "2"]) == 0


def test_kernels_check_compiles_qdec_and_fused_kernels(capfd):
    """QDEC's gather and selection kernels and the fused RMSNorm/rotary kernels are part of the check:
    a row each, 16-byte residual-row loads for the gather (the others read no weights)."""
    from cuda_ext.check import main
    kinds = ["qdec_gather", "qdec_select", "rms_norm", "rope"]
    assert main(["--arch", "sm_86", *[a for k in kinds for a in ("--kind", k)], "--jobs", "2"]) == 0
    out = capfd.readouterr().out  # the check runs in a subprocess under the interpreter
    rows = [ln for ln in out.splitlines() if ln.split() and ln.split()[0] in kinds]
    assert [r.split()[0] for r in rows] == kinds
    assert rows[0].split()[-2:] == ["16-16", "ok"] and all(r.split()[-2:] == ["-", "ok"] for r in rows[1:])


@pytest.mark.parametrize("arch", configs.ARCHS)
def test_one_row_decodes_on_cuda_cores_and_more_rows_on_tensor_cores(arch):
    """m = 1 runs gemv_kernel (block_m 1; measured faster on an H100), m = 2..16 the tensor-core
    qgemm_kernel (block_m 16; gemv tied at m = 2 and lost at m = 4 there)."""
    assert configs.gemm_config(arch, 1, 3)[1].block_m == 1
    for m in (2, 4, 16):
        kind, cfg = configs.gemm_config(arch, m, 3)
        assert kind == "decode" and cfg.block_m == 16


@pytest.mark.parametrize("arch", configs.ARCHS)
def test_one_row_branch_runs_branch_gemv(arch):
    """m = 1 computes t = x @ A^T with branch_gemv_kernel (block_m 1: branch_down_kernel's 16-row tiles and
    their reduction took 6-9.5 us a call on an H100), more rows with branch_down_kernel."""
    assert configs.branch_config(arch, 1).block_m == 1
    assert all(configs.branch_config(arch, m).block_m >= 16 for m in (2, 16, 300))


def test_one_row_branch_rule_matching_more_rows_is_refused(monkeypatch):
    table = configs.load_table("sm_90")
    bad = dict(table, branch_down=[dict(table["branch_down"][0], m_max=4)] + table["branch_down"][1:])
    monkeypatch.setattr(configs, "load_table", lambda arch: bad)
    with pytest.raises(ValueError, match="block_m=1 matched m=3"):
        configs.branch_config("sm_90", 3)


def test_decode_rule_with_too_few_rows_is_refused(tmp_path, monkeypatch):
    table = configs.load_table("sm_90")
    bad = dict(table, decode=[{"m_max": 4, "block_m": 2, "block_n": 64, "num_warps": 4, "num_stages": 1}]
               + table["decode"])
    monkeypatch.setattr(configs, "load_table", lambda arch: bad)
    with pytest.raises(ValueError, match="block_m=2 matched m=3"):
        configs.gemm_config("sm_90", 3, 3)


def test_loop_body_is_the_largest_backward_branch_span():
    from cuda_ext.check import loop_body
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LOP3.LUT R2, R3, 0xf, R4, 0xec, !PT ;
        /*0020*/                   FFMA R5, R6, R7, R5 ;
        /*0030*/               @P0 BRA 0x10 ;
        /*0040*/                   FADD R8, R9, R10 ;
        /*0050*/                   BRA 0x40 ;
        /*0060*/                   EXIT ;
    """
    assert loop_body(sass) == ["LOP3", "FFMA", "BRA"]
    assert loop_body("        /*0000*/                   EXIT ;") == []
