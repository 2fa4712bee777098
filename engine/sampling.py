"""Token sampling: penalties, temperature, top-k / top-p / min-p masks, seeded draws, log-probabilities."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from engine.types import SamplingParams


def make_generator(seed: int | None) -> torch.Generator:
    """A per-request CPU generator: the same seed gives the same draws whatever else is running."""
    g = torch.Generator(device="cpu")
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def penalized(params: SamplingParams) -> bool:
    """Whether the tokens already seen change the logits (the caller then passes them to sample_token)."""
    return params.repetition_penalty != 1.0 or bool(params.presence_penalty) or bool(params.frequency_penalty)


def filtered(params: SamplingParams) -> bool:
    """Whether top-k, top-p or min-p drop tokens before a draw."""
    return bool(params.top_k) or params.top_p < 1.0 or params.min_p > 0.0


def apply_penalties(logits: Tensor, params: SamplingParams, context_ids: Tensor, output_ids: Tensor) -> Tensor:
    """Penalise tokens already seen. logits (V,) fp32; context_ids: prompt + output ids; output_ids: output only."""
    if params.repetition_penalty != 1.0 and context_ids.numel():
        seen = torch.unique(context_ids)
        vals = logits[seen]
        p = params.repetition_penalty
        logits[seen] = torch.where(vals > 0, vals / p, vals * p)
    if (params.presence_penalty or params.frequency_penalty) and output_ids.numel():
        counts = torch.bincount(output_ids, minlength=logits.numel()).to(logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def apply_logit_bias(logits: Tensor, bias: dict[int, float]) -> Tensor:
    """Add OpenAI's `logit_bias` (token id -> bias, -100..100) to logits (V,) in place."""
    if bias:
        ids = torch.tensor(list(bias), dtype=torch.long)
        logits[ids] += torch.tensor(list(bias.values()), dtype=logits.dtype)
    return logits


NUCLEUS_CANDIDATES = 256  # the most likely tokens a top-p nucleus is first looked for among


def outside_nucleus(probs: Tensor, top_p: float) -> Tensor:
    """Bool (V,): tokens whose more likely tokens already hold `top_p` of the mass (at least one token stays).

    A nucleus usually holds a few tokens: it is looked for among the NUCLEUS_CANDIDATES most likely ones
    (`topk`: ~0.1 ms for 49,152 tokens on one core, where a full sort takes 3.4 ms), then 8x more, and only
    a flat distribution needs the sort (bench/RESULTS.md "Sampling")."""
    top, order = most_likely(probs, top_p)
    cum = top.cumsum(-1)
    outside = torch.ones_like(probs, dtype=torch.bool)
    outside[order[(cum - top) < top_p]] = False  # tokens after the last of `order` are outside too
    return outside


def most_likely(probs: Tensor, mass: float) -> tuple[Tensor, Tensor]:
    """(probabilities, token ids) of the most likely tokens in descending order, enough to hold `mass`."""
    for k in (NUCLEUS_CANDIDATES, 8 * NUCLEUS_CANDIDATES):
        if k < probs.numel():
            top, order = torch.topk(probs, k)
            if top.sum() >= mass:
                return top, order
    return torch.sort(probs, descending=True)


def filter_logits(logits: Tensor, params: SamplingParams) -> Tensor:
    """Temperature-scaled logits (V,) with tokens outside top-k / top-p / min-p set to -inf."""
    logits = logits / params.temperature
    if params.top_k and 0 < params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    if params.top_p < 1.0:
        logits = logits.masked_fill(outside_nucleus(torch.softmax(logits, dim=-1), params.top_p), float("-inf"))
    return logits


def draw(probs: Tensor, generator: torch.Generator) -> int:
    """An index i drawn with probability probs[i] / sum(probs) (V,) on the CPU, from one uniform number
    through the inverse CDF (fp64): ~70 us for 49,152 tokens where torch.multinomial takes ~1 ms (and
    sampling is serial, once per running request per step: bench/RESULTS.md "Sampling"). A zero-probability
    token is never drawn."""
    cdf = torch.cumsum(probs, 0, dtype=torch.float64)
    u = torch.rand((), generator=generator, dtype=torch.float64) * cdf[-1]
    i = int(torch.searchsorted(cdf, u, right=True))  # the first i with cdf[i] > u
    return i if i < probs.numel() else int(probs.nonzero()[-1])  # u rounded up to the total: the last token


def sample_token(logits: Tensor, params: SamplingParams, generator: torch.Generator,
                 context_ids: Tensor, output_ids: Tensor, allowed: Callable[[Tensor], Tensor] | None = None) -> int:
    """Pick the next token from raw fp32 logits (V,) on the CPU, which are left as they are. `allowed`, if
    given, sets the logits of tokens a grammar forbids to -inf (in place), after penalties and bias, before
    temperature and filters. `context_ids` (prompt + output) and `output_ids` are read only if `penalized`."""
    penalties = penalized(params)
    if penalties or params.logit_bias or allowed is not None:  # in-place changes: on a copy
        logits = logits.clone()
        if penalties:
            apply_penalties(logits, params, context_ids, output_ids)
        apply_logit_bias(logits, params.logit_bias)
        if allowed is not None:
            allowed(logits)
    if params.temperature == 0.0:
        return int(torch.argmax(logits))
    return draw(torch.softmax(filter_logits(logits, params), dim=-1), generator)


def token_logprobs(logits: Tensor, token_id: int, top: int) -> tuple[float, dict[int, float]]:
    """The model's log-probability of `token_id` under raw logits (V,), and the `top` most likely tokens."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    alternatives: dict[int, float] = {}
    if top > 0:
        values, ids = torch.topk(lp, top)
        alternatives = {int(i): float(v) for i, v in zip(ids, values)}
    return float(lp[token_id]), alternatives
