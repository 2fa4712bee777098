"""Perplexity windowing, KL / top-1 agreement, and the data-location contract of quant.eval."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from models.config import ModelConfig
from models.llama import Transformer
from quant.eval import DataMissingError, data_dir, evaluate_windows, require_data, token_windows, wikitext2_text

V = 64


class CharTokenizer:
    """One token per character (ord % V): enough to test windowing without a real vocabulary."""

    class _Enc:
        def __init__(self, ids):
            self.input_ids = ids

    def __call__(self, text, verbose=True, add_special_tokens=True):
        return self._Enc([ord(c) % V for c in text])


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    return Transformer(cfg).eval()


def test_windows_are_non_overlapping_and_truncated():
    text = "".join(chr(97 + i % 26) for i in range(50))
    w = token_windows(CharTokenizer(), text, ctx=8)
    assert w.shape == (6, 8)  # floor(50 / 8) windows, the 2-token tail dropped
    assert w.flatten().tolist() == [ord(c) % V for c in text[:48]]
    assert token_windows(CharTokenizer(), text, ctx=8, max_windows=2).shape == (2, 8)
    assert token_windows(CharTokenizer(), text[:5], ctx=8).shape == (1, 5)  # shorter than ctx: one window


@torch.inference_mode()
def test_perplexity_matches_prefix_by_prefix_computation():
    model = tiny_model()
    text = "the quick brown fox jumps over the lazy dog, again and again."
    windows = token_windows(CharTokenizer(), text, ctx=12)  # (5, 12)
    m = evaluate_windows(model, windows, chunk=5)
    nll, count = 0.0, 0
    for w in windows:  # each window alone; its first token is never predicted
        for t in range(1, w.numel()):
            logits = model(w[None, :t])[0, -1]  # sees only w[:t]
            nll -= float(F.log_softmax(logits, -1)[w[t]])
            count += 1
    assert m.windows == 5 and m.positions == count == 5 * 11
    assert m.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)


@torch.inference_mode()
def test_kl_to_itself_is_zero_and_to_a_perturbed_model_positive():
    model = tiny_model()
    windows = torch.randint(0, V, (3, 16), generator=torch.Generator().manual_seed(1))
    same = evaluate_windows(model, windows, reference=model, chunk=7)
    assert abs(same.kl_mean) < 1e-6
    assert same.top1_agreement == 1.0

    noisy = copy.deepcopy(model)
    for p in noisy.parameters():
        p.add_(0.3 * torch.randn_like(p))
    m = evaluate_windows(noisy, windows, reference=model, chunk=7)
    ref, q = model(windows)[:, :-1], noisy(windows)[:, :-1]
    direct = F.kl_div(q.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="sum") / (3 * 15)
    assert m.kl_mean > 1e-3
    assert m.kl_mean == pytest.approx(float(direct), rel=1e-4)
    assert m.top1_agreement < 1.0
    assert m.perplexity == pytest.approx(evaluate_windows(noisy, windows).perplexity)  # ppl is the evaluated model's


def test_missing_data_raises_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FBSERVE_DATA", str(tmp_path))
    assert data_dir() == tmp_path
    with pytest.raises(DataMissingError, match="FBSERVE_DATA") as e:
        wikitext2_text()
    assert str(tmp_path / "wikitext-2-raw" / "wiki.test.raw") in str(e.value)


def test_wikitext2_join_follows_gptq():
    try:
        text = wikitext2_text()
    except DataMissingError as e:
        pytest.skip(str(e))
    # HF rows: "" for a blank line, otherwise the line with its "\n"; joined with "\n\n".
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English film")
    assert text.count("\n\n") >= 4357
    assert require_data("wikitext-2-raw/wiki.test.raw")[0].is_file()
