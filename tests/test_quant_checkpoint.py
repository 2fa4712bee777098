"""Quantize a tiny random Llama end to end: checkpoint written, verified, loaded with QuantLinear, run;
and a damaged checkpoint (a flipped byte, a changed shape) is refused with a clear message."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.config import ModelConfig
from models.llama import Transformer
from models.loader import load_model, read_config
from quant.checkpoint import MANIFEST, TENSORS, CheckpointError, load_quantized_model, sha256_file, verify_checkpoint
from quant.cli import main as quantize_main

WORDS = ("the of and to in a is was for on as with by he at from his an were are which this that be it has "
         "or had first new one their its also after two but who they time been not her city team she than "
         "other up when school only into out all years three most over may war some would there about").split()


def _text(n_words: int = 6000, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(WORDS), (n_words,), generator=g).tolist()
    return " ".join(WORDS[i] for i in idx)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A random 2-layer Llama in a HF-style directory with a word-level tokenizer.

    hidden 96 and intermediate 160 are not multiples of 64: both have a partial last group at g64.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("tiny")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(str(d))
    cfg = ModelConfig(vocab_size=len(vocab), hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=24, rope_theta=10000.0,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = Transformer(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05) if p.dim() > 1 else torch.nn.init.ones_(p)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(cfg.to_dict()))
    (d / "calib.txt").write_text(_text())
    return d


def _quantize(src: Path, out: Path, *extra: str) -> Path:
    rc = quantize_main(["--model", str(src), "--out", str(out), "--calib", str(src / "calib.txt"),
                        "--n-samples", "6", "--seqlen", "32", "--group-size", "64", "--rank", "4",
                        "--rounds", "1", "--eval-windows", "0", "--no-progress", *extra])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def quantized(tiny_model, tmp_path_factory) -> Path:
    return _quantize(tiny_model, tmp_path_factory.mktemp("q") / "fbq", "--method", "fbquant", "--bits", "3")


def test_end_to_end_quantize_load_forward(tiny_model, quantized) -> None:
    m = json.loads((quantized / MANIFEST).read_text())
    assert (m["method"], m["bits"], m["group_size"], m["rank"], m["base_quantizer"]) == ("fbquant", 3, 64, 4, "gptq")
    assert m["calibration"] == {"file": str(tiny_model / "calib.txt"), "n_samples": 6, "seqlen": 32, "seed": 0}
    assert len(m["quantized_modules"]) == 14 and set(m["layers"]) == set(m["quantized_modules"])
    assert all(0 <= r["error"] < 1 for r in m["layers"].values())
    assert 3 < m["bits_per_weight"] < 8 and "quality" in m
    for f in ("config.json", "tokenizer.json", TENSORS):
        assert (quantized / f).is_file()
    lm = load_model(str(quantized))  # models.loader routes a quantized directory to load_quantized_model
    from engine.quant_linear import QuantLinear

    q_proj = lm.model.model.layers[1].self_attn.q_proj
    assert isinstance(q_proj, QuantLinear) and q_proj.rank == 4 and lm.quantization["method"] == "fbquant"
    ref = load_model(str(tiny_model))
    tokens = lm.tokenizer(_text(40, seed=1), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        lq, lr = lm.model(tokens), ref.model(tokens)
    assert torch.isfinite(lq).all()
    kl = torch.nn.functional.kl_div(lq.log_softmax(-1), lr.log_softmax(-1), log_target=True, reduction="batchmean")
    assert float(kl) / tokens.shape[1] < 0.05


def test_loaded_layers_compute_the_reported_weight(tiny_model, quantized, monkeypatch) -> None:
    """The reference kernel path of a loaded layer equals x @ (dequant + B A)^T, with the fp16 tensors."""
    monkeypatch.setenv("FBSERVE_KERNEL_PATH", "reference")
    model, manifest = load_quantized_model(quantized, read_config(quantized), torch.float32, "cpu")
    from cuda_ext import dequantize_packed

    layer = model.model.layers[0].mlp.down_proj  # 96 x 160: K = 2 * 64 + 32, a partial last group
    w = dequantize_packed(layer.packed).float() + layer.B.float() @ layer.A.float()
    x = torch.randn(3, 160)
    assert torch.allclose(layer(x), x @ w.T, atol=1e-4, rtol=1e-4)
    assert manifest["layers"]["model.layers.0.mlp.down_proj"]["shape"] == [96, 160]


@pytest.mark.parametrize("method,extra", [("rtn", ()), ("gptq", ("--act-order",)), ("lqer", ()),
                                          ("qera", ("--base", "gptq"))])
def test_every_method_writes_a_loadable_checkpoint(tiny_model, tmp_path, method, extra) -> None:
    out = _quantize(tiny_model, tmp_path / method, "--method", method, "--bits", "4", *extra)
    model, m = load_quantized_model(out, read_config(out), torch.float32, "cpu")
    assert m["rank"] == (4 if method in ("lqer", "qera") else 0)
    assert m["base_quantizer"] == ("gptq" if method in ("gptq", "qera") else "rtn")
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 5, 7, 9]]))).all()


def test_linears_are_grouped_by_shared_input(tiny_model) -> None:
    """q/k/v and gate/up share an input (one Gram matrix); o and down stand alone, in every layer, also
    when the allocator reuses a freed input's memory for the next one (identity, not id(), decides)."""
    from quant.sequential import linear_groups, rope_tables, run_layer

    model = load_model(str(tiny_model)).model
    x = model.model.embed_tokens(torch.tensor([[1, 4, 9, 16, 25, 36]]))
    cos, sin = rope_tables(model, 6, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            for _ in range(5):
                assert linear_groups(layer, x, cos, sin) == [
                    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                    ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
            x = run_layer(layer, x, cos, sin)


def test_same_seed_same_checkpoint(tiny_model, quantized, tmp_path) -> None:
    again = _quantize(tiny_model, tmp_path / "again", "--method", "fbquant", "--bits", "3")
    assert sha256_file(again / TENSORS) == sha256_file(quantized / TENSORS)
    other = _quantize(tiny_model, tmp_path / "other", "--method", "fbquant", "--bits", "3", "--seed", "1")
    assert sha256_file(other / TENSORS) != sha256_file(quantized / TENSORS)


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_flipped_byte_is_refused(quantized, tmp_path) -> None:
    d = _copy(quantized, tmp_path / "ck")
    data = bytearray((d / TENSORS).read_bytes())
    data[len(data) // 2] ^= 0x01
    (d / TENSORS).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        verify_checkpoint(d)
    with pytest.raises(CheckpointError):
        load_model(str(d))


def test_changed_shape_is_refused_even_with_matching_checksums(quantized, tmp_path) -> None:
    d = _copy(quantized, tmp_path / "ck")
    state = load_file(str(d / TENSORS))
    name = "model.layers.0.self_attn.v_proj.A"
    state[name] = torch.cat([state[name], state[name][:1]])  # rank 4 -> 5 in one factor
    save_file(state, str(d / TENSORS))
    m = json.loads((d / MANIFEST).read_text())
    m["files"][TENSORS] = sha256_file(d / TENSORS)  # a consistent-looking but wrong checkpoint
    m["tensors"][name]["shape"] = list(state[name].shape)
    (d / MANIFEST).write_text(json.dumps(m))
    verify_checkpoint(d)  # file and manifest agree ...
    with pytest.raises(CheckpointError, match=r"v_proj\.A"):  # ... but not with config.json and the rank
        load_quantized_model(d, read_config(d), torch.float32, "cpu")
    # a shape edited in the manifest alone no longer matches the file
    m["tensors"]["model.norm.weight"]["shape"] = [97]
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        verify_checkpoint(d)


def test_missing_or_invalid_manifest_is_refused(quantized, tmp_path) -> None:
    d = _copy(quantized, tmp_path / "ck")
    m = json.loads((d / MANIFEST).read_text())
    m["bits"] = 5
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="invalid manifest"):
        verify_checkpoint(d)
    (d / TENSORS).unlink()
    (d / MANIFEST).write_text((quantized / MANIFEST).read_text())
    with pytest.raises(CheckpointError, match="missing"):
        verify_checkpoint(d)
    with pytest.raises(CheckpointError, match="not a quantized checkpoint"):
        verify_checkpoint(tmp_path)


def test_cli_reports_missing_calibration_text(tiny_model, tmp_path, capsys) -> None:
    rc = quantize_main(["--model", str(tiny_model), "--out", str(tmp_path / "x"), "--calib", str(tmp_path / "nope.txt")])
    assert rc == 1 and "calibration text not found" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_header_is_valid_safetensors(quantized) -> None:
    """Only safetensors: the file starts with its little-endian header length and a JSON header."""
    raw = (quantized / TENSORS).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    assert header["__metadata__"]["format"] == "pt"
    assert header["model.layers.0.mlp.up_proj.A"]["dtype"] == "F16"


def test_preset_is_built_once_and_rebuilt_when_damaged(tiny_model, tmp_path) -> None:
    from quant.preset import PRESET, ensure_default_checkpoint

    out = ensure_default_checkpoint(home=tmp_path, model=str(tiny_model), calib=tiny_model / "calib.txt",
                                    progress=False)
    m = json.loads((out / MANIFEST).read_text())
    assert (m["method"], m["bits"], m["group_size"], m["rank"]) == (PRESET.method, PRESET.bits,
                                                                    PRESET.group_size, PRESET.rank)
    stamp = (out / TENSORS).stat().st_mtime_ns
    assert ensure_default_checkpoint(home=tmp_path, model=str(tiny_model), calib=tiny_model / "calib.txt") == out
    assert (out / TENSORS).stat().st_mtime_ns == stamp  # found, verified, reused
    data = bytearray((out / TENSORS).read_bytes())
    data[-1] ^= 0xFF
    (out / TENSORS).write_bytes(bytes(data))
    ensure_default_checkpoint(home=tmp_path, model=str(tiny_model), calib=tiny_model / "calib.txt", progress=False)
    verify_checkpoint(out)  # rebuilt
