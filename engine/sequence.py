"""One request's state while it runs: tokens, sampler state, detokenizer, stop checks."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from engine.detokenizer import IncrementalDetokenizer
from engine.sampling import filtered, make_generator, penalized, sample_token, token_logprobs
from engine.stop import StopStringMatcher
from engine.structured import TokenConstraint
from engine.types import GenerationOutput, GenerationRequest, TokenLogprob


NO_TOKENS = torch.zeros(0, dtype=torch.long)


@dataclass
class Sequence:
    request: GenerationRequest
    emit: object  # callable(GenerationOutput) -> None, thread-safe
    eos_ids: set[int]
    tokenizer: object
    submitted_at: float = field(default_factory=time.monotonic)
    slot: int = -1
    cached_tokens: int = 0  # leading prompt tokens whose keys and values the slot already held
    prefilled: int = 0  # leading prompt tokens whose keys and values are in the slot (prefill runs in chunks)
    prefill_started_at: float | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # gathered chunk by chunk when asked for
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    constraint: TokenConstraint | None = None  # a response format's grammar (engine.structured)

    def __post_init__(self) -> None:
        self.generator = make_generator(self.request.params.seed)
        self.detok = IncrementalDetokenizer(self.tokenizer, self.request.prompt_token_ids)
        self.stops = StopStringMatcher(self.request.params.stop)
        self.context = torch.tensor(self.request.prompt_token_ids, dtype=torch.long)
        self.first_event = True

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def position(self) -> int:
        """Cache position of the next token fed to the model (the last sampled one)."""
        return len(self.request.prompt_token_ids) + len(self.output_ids) - 1

    def fed_ids(self) -> list[int]:
        """The tokens whose keys and values are in the slot, at positions 0..: the prompt and every sampled
        token but the last (fed at the next step, which has not run); while the prompt is being prefilled,
        the part of it done so far."""
        if not self.output_ids:
            return self.request.prompt_token_ids[:self.prefilled]
        return self.request.prompt_token_ids + self.output_ids[:-1]

    def _next_token(self, logits: torch.Tensor, context: torch.Tensor, out_t: torch.Tensor) -> int:
        """The next token; under a grammar, one it allows and takes. Unless top-k / top-p / min-p filter the
        tokens, the model's own choice is tried first, without computing the mask: greedy, an allowed argmax
        is also the argmax under the mask; sampled, a token drawn from all tokens is kept if allowed, else one
        is drawn under the mask, which draws each allowed token with its probability among the allowed ones
        (p(x) + (1 - p(allowed)) p(x) / p(allowed)). Filters would pick their tokens among all, not the allowed."""
        p, c = self.request.params, self.constraint
        if c is None:
            return sample_token(logits, p, self.generator, context, out_t)
        if p.temperature == 0.0 or not filtered(p):
            token = sample_token(logits, p, self.generator, context, out_t)
            if c.accept_if_allowed(token):
                return token
        token = sample_token(logits, p, self.generator, context, out_t, c.mask)
        c.accept(token)
        return token

    def step(self, logits: torch.Tensor, prompt_logprobs: list[TokenLogprob | None] | None = None,
             queue_wait_s: float | None = None) -> GenerationOutput:
        """Sample one token from logits (V,) fp32 CPU, update state, and build this step's event."""
        p = self.request.params
        out_t = context = NO_TOKENS
        if penalized(p):
            out_t = torch.tensor(self.output_ids, dtype=torch.long)
            context = torch.cat((self.context, out_t))
        token = self._next_token(logits, context, out_t)
        self.output_ids.append(token)
        logprobs = None
        if p.logprobs is not None:
            lp, top = token_logprobs(logits, token, p.logprobs)
            logprobs = [TokenLogprob(token, self.detok.token_text(token), lp, top)]
        text, by_string = "", False
        if ((token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids
                or (self.constraint is not None and self.constraint.terminated)):  # a complete grammar ends it
            self.finish_reason = "stop"
        else:
            text, by_string = self.stops.feed(self.detok.add(token))
            if by_string:
                self.finish_reason = "stop"
        if self.finish_reason is None and len(self.output_ids) >= p.max_tokens:
            self.finish_reason = "length"
        if self.finish_reason is not None and not by_string:
            # Finishing: text held back (an incomplete character, a possible stop-string start) is real.
            tail, hit = self.stops.feed(self.detok.flush())
            text += tail if hit else tail + self.stops.flush()
            if hit:
                self.finish_reason = "stop"
        event = GenerationOutput(
            request_id=self.request_id, text=text, token_ids=[token], logprobs=logprobs,
            finish_reason=self.finish_reason, prompt_tokens=len(self.request.prompt_token_ids),
            completion_tokens=len(self.output_ids))
        if self.first_event:
            event.prompt_logprobs = prompt_logprobs
            event.queue_wait_s = queue_wait_s
            event.cached_tokens = self.cached_tokens
            self.first_event = False
        return event
