"""Sampler: seeded reproducibility, top-k / top-p / min-p masks, penalties, log-probabilities."""
from __future__ import annotations

import math

import pytest
import torch

from engine.sampling import apply_penalties, draw, filter_logits, make_generator, sample_token, token_logprobs
from engine.types import SamplingParams

EMPTY = torch.tensor([], dtype=torch.long)


def draws(seed: int, n: int = 20, **kw) -> list[int]:
    logits = torch.randn(100, generator=torch.Generator().manual_seed(0))
    g = make_generator(seed)
    p = SamplingParams(temperature=1.0, **kw)
    return [sample_token(logits, p, g, EMPTY, EMPTY) for _ in range(n)]


def test_same_seed_same_draws_and_different_seed_differs():
    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_draws_follow_the_probabilities_and_never_pick_a_zero():
    """20,000 draws from (0.1, 0, 0.2, 0.3, 0.4, 0): frequencies within 4 standard errors, zeros never drawn;
    unnormalised weights draw the same way."""
    probs = torch.tensor([0.1, 0.0, 0.2, 0.3, 0.4, 0.0])
    g, n = make_generator(3), 20000
    counts = torch.bincount(torch.tensor([draw(probs, g) for _ in range(n)]), minlength=6).double() / n
    assert counts[1] == 0 and counts[5] == 0
    assert bool(((counts - probs.double()).abs() <= 4 * (probs.double() * (1 - probs.double()) / n).sqrt()).all()), counts
    assert [draw(probs * 7.5, make_generator(5)) for _ in range(3)] == [draw(probs, make_generator(5)) for _ in range(3)]


def test_a_draw_rounded_up_to_the_total_takes_the_last_possible_token(monkeypatch):
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.tensor(1.0, dtype=torch.float64))
    assert draw(torch.tensor([0.5, 0.5, 0.0]), make_generator(0)) == 1


def test_greedy_is_argmax():
    logits = torch.tensor([0.1, 3.0, -1.0, 2.9])
    assert sample_token(logits, SamplingParams(temperature=0.0), make_generator(0), EMPTY, EMPTY) == 1


def test_top_k_keeps_exactly_k():
    logits = torch.randn(50)
    out = filter_logits(logits, SamplingParams(top_k=5))
    kept = torch.isfinite(out).nonzero().flatten()
    assert set(kept.tolist()) == set(torch.topk(logits, 5).indices.tolist())
    assert set(draws(3, n=200, top_k=3)) <= set(torch.topk(torch.randn(100, generator=torch.Generator().manual_seed(0)), 3).indices.tolist())


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    out = filter_logits(probs.log(), SamplingParams(top_p=0.7))
    # 0.5 alone < 0.7, so 0.3 is kept; 0.5 + 0.3 >= 0.7, so 0.15 and 0.05 go.
    assert torch.isfinite(out).tolist() == [True, True, False, False]
    out = filter_logits(probs.log(), SamplingParams(top_p=0.01))
    assert torch.isfinite(out).tolist() == [True, False, False, False]  # always at least one


@pytest.mark.parametrize("scale", [8.0, 3.0, 0.3])  # a peaked distribution (a few tokens) ... nearly uniform
@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.999])
def test_top_p_on_a_large_vocabulary_keeps_the_nucleus_however_many_tokens_it_holds(scale, top_p):
    """49,152 tokens: the nucleus is found among the top 256, the top 2,048, or by a full sort; every token
    kept has less than top_p of the mass above it (fp64), every token dropped at least (rounding aside)."""
    logits = torch.randn(49_152, generator=torch.Generator().manual_seed(1)) * scale
    kept = torch.isfinite(filter_logits(logits, SamplingParams(top_p=top_p)))
    probs = torch.softmax(logits.double(), -1)
    desc, order = probs.sort(descending=True)
    above = torch.empty_like(probs)
    above[order] = desc.cumsum(0) - desc  # each token: the mass of the tokens more likely than it
    assert kept.any() and (above[kept] < top_p + 1e-5).all() and (above[~kept] >= top_p - 1e-5).all()
    assert abs(int(kept.sum()) - int((above < top_p).sum())) <= 2


def test_min_p_drops_tokens_below_fraction_of_max():
    probs = torch.tensor([0.6, 0.3, 0.06, 0.04])
    out = filter_logits(probs.log(), SamplingParams(min_p=0.09))  # threshold 0.054
    assert torch.isfinite(out).tolist() == [True, True, True, False]


def test_penalties():
    logits = torch.tensor([2.0, -2.0, 1.0, 1.0])
    seen = torch.tensor([0, 1])
    out = apply_penalties(logits.clone(), SamplingParams(repetition_penalty=2.0), seen, EMPTY)
    assert out.tolist() == [1.0, -4.0, 1.0, 1.0]
    out = apply_penalties(logits.clone(), SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
                          EMPTY, torch.tensor([2, 2, 3]))
    assert out.tolist() == [2.0, -2.0, 1.0 - 0.5 - 0.5, 1.0 - 0.5 - 0.25]


def test_logprobs_are_log_softmax_and_top_is_sorted():
    logits = torch.tensor([1.0, 2.0, 3.0])
    lp, top = token_logprobs(logits, 0, 2)
    z = math.log(sum(math.exp(v) for v in (1.0, 2.0, 3.0)))
    assert abs(lp - (1.0 - z)) < 1e-6
    assert list(top) == [2, 1]


def test_logit_bias_and_a_grammar_mask_apply_before_top_k():
    logits = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    greedy = SamplingParams(temperature=0.0)
    assert sample_token(logits, SamplingParams(temperature=0.0, logit_bias={0: -100.0}), make_generator(0),
                        EMPTY, EMPTY) == 1
    assert sample_token(logits, SamplingParams(temperature=0.0, logit_bias={4: 4.5}), make_generator(0),
                        EMPTY, EMPTY) == 4  # 1 + 4.5 > 5

    def only_odd(x: torch.Tensor) -> torch.Tensor:
        x[0::2] = float("-inf")
        return x

    assert sample_token(logits, greedy, make_generator(0), EMPTY, EMPTY, allowed=only_odd) == 1
    top1 = SamplingParams(temperature=1.0, top_k=1)  # top-k over the allowed tokens, not over all of them
    assert {sample_token(logits, top1, make_generator(s), EMPTY, EMPTY, allowed=only_odd) for s in range(5)} == {1}
    assert logits.tolist() == [5.0, 4.0, 3.0, 2.0, 1.0]  # the caller's logits are left as they were


class AllowOnly:
    """A grammar stand-in that allows `tokens` at every step and counts the masks it computes."""

    def __init__(self, tokens: set[int]) -> None:
        self.tokens, self.masks = tokens, 0

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        self.masks += 1
        logits[[t for t in range(logits.numel()) if t not in self.tokens]] = float("-inf")
        return logits

    def accept_if_allowed(self, token_id: int) -> bool:
        return token_id in self.tokens

    def accept(self, token_id: int) -> None:
        assert token_id in self.tokens


def test_sampling_under_a_grammar_draws_each_allowed_token_with_its_share_of_the_allowed_mass():
    """Without filters a token is first drawn from all of them and kept if allowed, else drawn under the mask:
    20,000 draws from (0.4, 0.3, 0.2, 0.1) allowing tokens 1 and 3 give 0.75 / 0.25 (4 standard errors), and a
    mask only for the ~60% of draws that fell outside; with top_p every draw is masked first."""
    from engine.sequence import Sequence
    from engine.types import GenerationRequest

    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    n = 20_000
    for params, masked_share in [(SamplingParams(temperature=1.0, seed=5), (0.55, 0.65)),
                                 (SamplingParams(temperature=1.0, top_p=0.99, seed=5), (1.0, 1.0))]:
        grammar = AllowOnly({1, 3})
        seq = Sequence(GenerationRequest("g", [1, 2], params), emit=None, eos_ids=set(), tokenizer=None,
                       constraint=grammar)
        draws = [seq._next_token(logits, EMPTY, EMPTY) for _ in range(n)]
        assert set(draws) == {1, 3}
        assert abs(draws.count(1) / n - 0.75) < 4 * math.sqrt(0.75 * 0.25 / n), params
        assert masked_share[0] <= grammar.masks / n <= masked_share[1], (params, grammar.masks)
