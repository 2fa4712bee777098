"""Zero-shot tasks: data formats (real rows), lm-eval tokenization of pairs, batched log-likelihood scoring."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quant.eval import DataMissingError, data_dir
from quant.eval_score import encode_pair, loglikelihoods
from quant.tasks import TASK_NAMES, Doc, accuracy, load_task
from models.config import ModelConfig
from models.llama import Transformer

V = 32


def encode(s: str) -> list[int]:
    """Toy tokenizer: 'a'..'z' -> 1..26, anything else -> 27."""
    return [ord(c) - 96 if "a" <= c <= "z" else 27 for c in s]


class NextLetter(nn.Module):
    """Predicts token + 1 with probability 1/2; the other 1/2 spread over the rest of the vocabulary."""

    def forward(self, tokens):
        return math.log(V - 1) * F.one_hot((tokens + 1) % V, V).float()  # (B, T, V)


def tiny_model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    return Transformer(cfg).eval()


def test_scoring_prefers_the_predictable_continuation():
    model = NextLetter()
    pairs = [encode_pair(encode, "abc", x) for x in ["defg", "dxyz", "d"]]
    (ll_good, greedy_good), (ll_bad, greedy_bad), (ll_one, _) = loglikelihoods(model, pairs)
    assert ll_good == pytest.approx(4 * math.log(0.5), rel=1e-5)
    assert ll_one == pytest.approx(math.log(0.5), rel=1e-5)
    assert greedy_good and not greedy_bad
    assert ll_bad < ll_good


def test_acc_norm_divides_by_choice_length_and_can_disagree_with_acc():
    # "dz": one hit then a miss; "defghijklm": ten hits. Raw sum prefers the short one, per character the long one.
    choices = ["dz", "defghijklm"]
    docs = [Doc([("abc", " " + c) for c in choices], gold=1, choices=choices)]
    lls = [[ll for ll, _ in loglikelihoods(NextLetter(), [encode_pair(encode, "abc", c) for c in choices])]]
    assert lls[0][0] > lls[0][1]
    r = accuracy(docs, lls)
    assert (r["acc"], r["acc_norm"], r["n"]) == (0.0, 1.0, 1)


@torch.inference_mode()
def test_padding_batching_and_shared_inputs_do_not_change_scores():
    model = tiny_model()  # vocabulary 64
    g = torch.Generator().manual_seed(0)
    pairs = []
    for n in [3, 9, 5, 17, 1, 12, 7]:
        ctx = torch.randint(0, 64, (n,), generator=g).tolist()
        for m in [1, 1, 4]:  # two one-token continuations after the same context share one input
            pairs.append((ctx, torch.randint(0, 64, (m,), generator=g).tolist()))
    batched = loglikelihoods(model, pairs, token_budget=64, max_batch=4)
    for (ctx, cont), (ll, _) in zip(pairs, batched):
        logits = model(torch.tensor([ctx + cont[:-1]]))[0, -len(cont):]  # one request alone, no padding
        alone = float(F.log_softmax(logits, -1).gather(1, torch.tensor(cont)[:, None]).sum())
        assert ll == pytest.approx(alone, abs=1e-4)


def test_context_truncated_from_the_left_to_max_len():
    model = NextLetter()
    (ll, greedy), = loglikelihoods(model, [(list(range(1, 20)), [20, 21])], max_len=4)
    assert ll == pytest.approx(2 * math.log(0.5), rel=1e-5) and greedy


def test_encode_pair_moves_trailing_spaces_and_splits_at_the_context_length():
    from transformers import AutoTokenizer

    from models.loader import resolve_model_dir
    from quant.eval_score import hf_encoder

    enc = hf_encoder(AutoTokenizer.from_pretrained(str(resolve_model_dir("default"))))
    ctx, cont = encode_pair(enc, "Question: is it?\nAnswer: ", "yes")
    assert ctx == enc("Question: is it?\nAnswer:")
    assert ctx + cont == enc("Question: is it?\nAnswer: yes")
    assert cont == enc(" yes")


def _docs(task, limit=3):
    try:
        return load_task(task, limit)
    except DataMissingError as e:
        pytest.skip(f"data not available: {e}")


def test_piqa_format():
    d = _docs("piqa")[0]
    assert d.requests[0] == ("Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",
                             " Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper "
                             "strips, you will also need to supply it with a water bottle and a food dish.")
    assert len(d.requests) == 2 and d.gold == 0 and d.choices[1].startswith("Provide the guinea pig")


def test_arc_formats_and_numeric_labels():
    d = _docs("arc_easy")[0]
    assert d.requests[0] == ("Question: Which statement best explains why photosynthesis is the foundation of most "
                             "food webs?\nAnswer:", " Sunlight is the source of energy for nearly all ecosystems.")
    assert len(d.requests) == 4 and d.gold == 0
    hard = _docs("arc_challenge", None)
    assert len(hard) == 1172 and {len(x.requests) for x in hard} == {3, 4, 5}
    # Rows labelled 1-4 map answerKey to an index like A-D rows do.
    import json
    rows = [json.loads(line) for line in (data_dir() / "arc" / "ARC-Challenge-Test.jsonl").open()]
    i = next(k for k, r in enumerate(rows) if r["question"]["choices"][0]["label"] == "1")
    assert hard[i].gold == int(rows[i]["answerKey"]) - 1


def test_winogrande_partial_scoring_format():
    d = _docs("winogrande")[0]
    cont = " always got the easier cases."
    assert d.requests == [("Sarah was a much better surgeon than Maria so Sarah", cont),
                          ("Sarah was a much better surgeon than Maria so Maria", cont)]
    assert d.gold == 1  # answer "2"
    labels = (data_dir() / "winogrande" / "dev-labels.lst").read_text().split()
    assert [x.gold + 1 for x in _docs("winogrande", 50)] == [int(x) for x in labels[:50]]


def test_boolq_format():
    d = _docs("boolq")[0]
    ctx = d.requests[0][0]
    assert ctx.startswith("All biomass goes through at least some of these steps")
    assert ctx.endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert [c for _, c in d.requests] == [" no", " yes"] and d.gold == 0  # answer false


def test_every_task_loads_with_a_limit():
    for name in TASK_NAMES:
        docs = _docs(name, 5)
        assert len(docs) == 5
        assert all(0 <= d.gold < len(d.requests) == len(d.choices) for d in docs)
