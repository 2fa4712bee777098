"""Prefix reuse across requests: a free KV-cache slot keeps the keys and values of the tokens it last held.

A new prompt takes the free slot whose held tokens share the longest prefix with it and prefills only the
rest: the next turn of a chat (the history, the model's own reply included, is already there), or requests
that share a system prompt. Without a useful prefix a request takes an empty slot (lowest first: a batch
of low, adjacent slots reads the cache as one view), else the least recently released one, so the
conversations seen last stay longest. A slot sharing only the start of what it holds (the system prompt
every chat of a template begins with) is copied from rather than taken, so its conversation survives.

A prompt that would reuse less than a quarter of itself prefills from the start instead, in the slot it
would take without a match: attention of a prompt that starts at position 0 runs with the causal flag,
which skips the masked half, while one that starts later needs an explicit mask. Measured on 2 cores
(bench/RESULTS.md "Prefix caching"): a 1500-token prompt reusing 4 tokens took 15-18% longer than no reuse,
375 (a quarter) about as long, 750 a quarter to a third less. Positions past the reused prefix are overwritten as the
new request runs, and attention never reads a position beyond the one being computed, so stale entries
are harmless.
"""
from __future__ import annotations

MIN_REUSE_FRACTION_INV = 4  # reuse only a prefix of at least 1/4 of the prompt


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists (a binary search over C-level slice compares)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:  # a[:lo] == b[:lo] holds
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class SlotPool:
    """The free KV-cache slots, least recently released first, with the token ids each still holds."""

    def __init__(self, slots: int, reuse: bool = True) -> None:
        self.reuse = reuse
        self._free: list[int] = list(range(slots))
        self._held: dict[int, list[int]] = {slot: [] for slot in range(slots)}
        self.queried_tokens = 0  # prompt tokens of every acquire (vLLM's prefix_cache_queries)
        self.hit_tokens = 0  # of those, reused from a slot (vLLM's prefix_cache_hits)

    def __len__(self) -> int:
        return len(self._free)

    def acquire(self, prompt_ids: list[int], reusable: bool = True,
                running: dict[int, list[int]] | None = None) -> tuple[int, int, int | None]:
        """Take a slot for `prompt_ids`: (slot, leading prompt tokens to reuse, source slot or None).

        With source None the slot itself holds the reused tokens: all it holds starts the prompt (the next
        turn of its conversation), or it is the slot given up anyway (empty, else least recently released).
        Otherwise the caller copies that many positions from `source` into the slot taken: a free slot that
        shares only the start of what it holds (a system prompt every chat begins with) keeps the rest of
        its conversation for a later turn, and `running` (the slots in use and the tokens they hold so far)
        may share a longer prefix (the other choices of an `n > 1` request, concurrent users).
        At most len(prompt_ids) - 1 are reused: the last prompt token is always computed, as it gives the
        first logits. `reusable=False` (the request wants every prompt position's logits) reuses nothing
        but still takes the least useful slot.
        """
        if not self._free:
            raise RuntimeError("no free KV-cache slot")
        victim = self._spare()  # the slot given up when no slot's tokens are all a prefix of the prompt
        best, best_len, source = victim, 0, None
        if self.reuse and reusable:
            shared = {slot: common_prefix_length(self._held[slot], prompt_ids) for slot in self._free}
            best_len = max(shared.values())
            whole = [slot for slot in self._free if shared[slot] == len(self._held[slot]) == best_len > 0]
            if whole:  # everything the slot holds starts the prompt: the next turn of its conversation
                best = whole[0]
            elif best_len and shared[victim] < best_len:  # copy the shared start; that slot keeps the rest
                source = next(slot for slot in self._free if shared[slot] == best_len)
            for slot, held in (running or {}).items():
                n = common_prefix_length(held, prompt_ids)
                if n > best_len:
                    best, best_len, source = victim, n, slot
        if best_len * MIN_REUSE_FRACTION_INV < len(prompt_ids):  # too little to pay for the masked attention
            best, best_len, source = victim, 0, None
        self._free.remove(best)
        self._held[best] = []  # in use: what it holds is known again only at release
        reused = min(best_len, max(len(prompt_ids) - 1, 0))
        self.queried_tokens += len(prompt_ids)
        self.hit_tokens += reused
        return best, reused, (source if reused else None)

    def _spare(self) -> int:
        """The free slot to fill without a match: an empty one (lowest first), else the least recently released."""
        empty = [slot for slot in self._free if not self._held[slot]]
        return min(empty) if empty else self._free[0]

    def release(self, slot: int, held_ids: list[int]) -> None:
        """Give `slot` back; `held_ids`: the tokens whose keys and values it holds at positions 0.. (empty when
        they cannot be trusted, e.g. after a failed step)."""
        if slot in self._free:
            raise RuntimeError(f"slot {slot} released twice")
        self._held[slot] = list(held_ids) if self.reuse else []
        self._free.append(slot)

    def status(self) -> dict[str, object]:
        """/health's view: on or off, tokens the free slots hold for reuse, and the hit rate so far."""
        if not self.reuse:
            return {"enabled": False, "reason": "disabled (--prefix-caching off)"}
        return {"enabled": True, "held_tokens": sum(len(self._held[slot]) for slot in list(self._free)),
                "queried_tokens": self.queried_tokens, "hit_tokens": self.hit_tokens}
