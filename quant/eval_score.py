"""Log-likelihood of continuations given contexts, batched: lm-evaluation-harness's `loglikelihood`.

Tokenization follows lm-eval's `_encode_pair`: trailing spaces of the context move to the continuation,
the context and the whole string are encoded without special tokens, and the continuation's tokens are
whole[len(context tokens):], so a token spanning the boundary is scored as part of the continuation.
The model input is (context + continuation)[-(max_len + 1):][:-1]; the last len(continuation) logits
score the continuation. Requests whose model input is identical (e.g. BoolQ's " yes" / " no", one token
each after the same passage) share one forward pass. Inputs are sorted by length, right-padded (the model
is causal, so padding after a row's end changes nothing before it) and batched under a token budget.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

Encode = Callable[[str], list[int]]


def hf_encoder(tokenizer) -> Encode:
    """lm-eval's `tok_encode` for a causal model: no special tokens."""
    return lambda s: tokenizer(s, add_special_tokens=False).input_ids


def encode_pair(encode: Encode, context: str, continuation: str,
                prefix_id: int | None = None) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) as lm-eval; an empty context becomes [prefix_id]."""
    if context == "":
        if prefix_id is None:
            raise ValueError("empty context needs a prefix token (BOS or EOS)")
        return [prefix_id], encode(continuation)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode(context + continuation)
    ctx = encode(context)
    return ctx, whole[len(ctx):]


@dataclass
class _Input:
    tokens: list[int]  # model input
    reads: list[tuple[int, list[int]]]  # (request index, continuation tokens) read off this input's tail


def _inputs(pairs: list[tuple[list[int], list[int]]], max_len: int) -> list[_Input]:
    by_tokens: dict[tuple[int, ...], _Input] = {}
    for i, (ctx, cont) in enumerate(pairs):
        if not cont or len(cont) > max_len:
            raise ValueError(f"request {i}: continuation of {len(cont)} tokens (need 1..{max_len})")
        whole = (ctx + cont)[-(max_len + 1):]
        key = tuple(whole[:-1])
        inp = by_tokens.setdefault(key, _Input(list(key), []))
        inp.reads.append((i, cont))
    return sorted(by_tokens.values(), key=lambda x: -len(x.tokens))


def _batches(inputs: list[_Input], token_budget: int, max_batch: int) -> Iterable[list[_Input]]:
    batch: list[_Input] = []
    for inp in inputs:  # longest first, so batch[0] sets the padded width
        width = len(batch[0].tokens) if batch else len(inp.tokens)
        if batch and ((len(batch) + 1) * width > token_budget or len(batch) >= max_batch):
            yield batch
            batch = []
        batch.append(inp)
    if batch:
        yield batch


@torch.inference_mode()
def loglikelihoods(model: Callable[[Tensor], Tensor], pairs: list[tuple[list[int], list[int]]], max_len: int = 2048,
                   token_budget: int = 4096, max_batch: int = 64,
                   progress: Callable[[Iterable], Iterable] | None = None) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), whether it is the greedy continuation) per token pair.

    `model` maps int64 tokens (B, T) to fp32 logits (B, T, V) of one causal window per row.
    """
    inputs = _inputs(pairs, max_len)
    out: list[tuple[float, bool] | None] = [None] * len(pairs)
    batches = list(_batches(inputs, token_budget, max_batch))
    for batch in progress(batches) if progress else batches:
        width = len(batch[0].tokens)
        tokens = torch.zeros(len(batch), width, dtype=torch.long)  # right-padded with token 0
        for b, inp in enumerate(batch):
            tokens[b, :len(inp.tokens)] = torch.tensor(inp.tokens)
        logits = model(tokens)  # (B, width, V)
        for b, inp in enumerate(batch):
            n = len(inp.tokens)
            for i, cont in inp.reads:
                rows = F.log_softmax(logits[b, n - len(cont):n].float(), dim=-1)  # (len(cont), V)
                target = torch.tensor(cont)
                ll = float(rows.gather(1, target[:, None]).sum())
                out[i] = (ll, bool((rows.argmax(-1) == target).all()))
        del logits
    return out  # type: ignore[return-value]
