"""Prefix reuse across requests: a free KV-cache slot keeps the keys and values of the tokens it last held.

A new prompt takes the free slot whose held tokens share the longest prefix with it and prefills only the
rest: the next turn of a chat (the history, the model's own reply included, is already there), or requests
that share a system prompt. Without a useful prefix a request takes an empty slot (lowest first: a batch
of low, adjacent slots reads the cache as one view), else the least recently released one, so the
conversations seen last stay longest. Positions past the reused prefix are overwritten as the new request
runs, and attention never reads a position beyond the one being computed, so stale entries are harmless.
"""
from __future__ import annotations


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

    def acquire(self, prompt_ids: list[int], reusable: bool = True) -> tuple[int, int]:
        """Take a slot for `prompt_ids`: (slot, how many leading prompt tokens it already holds).

        At most len(prompt_ids) - 1 are reused: the last prompt token is always computed, as it gives the
        first logits. `reusable=False` (the request wants every prompt position's logits) reuses nothing
        but still takes the least useful slot.
        """
        if not self._free:
            raise RuntimeError("no free KV-cache slot")
        empty = [slot for slot in self._free if not self._held[slot]]
        best, best_len = min(empty) if empty else self._free[0], 0  # an empty slot, else the least recent
        if self.reuse and reusable:
            for slot in self._free:
                shared = common_prefix_length(self._held[slot], prompt_ids)
                if shared > best_len:
                    best, best_len = slot, shared
        self._free.remove(best)
        self._held[best] = []  # in use: what it holds is known again only at release
        reused = min(best_len, max(len(prompt_ids) - 1, 0))
        self.queried_tokens += len(prompt_ids)
        self.hit_tokens += reused
        return best, reused

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
        return {"enabled": True, "held_tokens": sum(len(self._held[slot]) for slot in self._free),
                "queried_tokens": self.queried_tokens, "hit_tokens": self.hit_tokens}
