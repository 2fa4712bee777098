"""Stop strings that may span token boundaries: hold back text that could be the start of one."""
from __future__ import annotations


class StopStringMatcher:
    """Feed text deltas; get back what is safe to emit, and whether a stop string was hit.

    Text of the stop string itself (and anything after it) is never emitted.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        """Returns (text to emit now, stopped)."""
        if not self.stops:
            return delta, False
        text = self.pending + delta
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return text[: min(hits)], True
        hold = self._partial_suffix(text)
        self.pending = text[len(text) - hold:] if hold else ""
        return text[: len(text) - hold], False

    def flush(self) -> str:
        """At the end of generation, whatever was held back is real text."""
        out, self.pending = self.pending, ""
        return out

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
