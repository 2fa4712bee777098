"""Incremental detokenization that never emits a broken UTF-8 character."""
from __future__ import annotations

# Prompt tokens kept as left context, so tokenizers that drop a leading space when decoding a lone
# token (SentencePiece) still produce the right first piece.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turn a growing list of token ids into text deltas.

    Each step decodes the ids since the last emitted point together with a little left context and
    emits only the new suffix; while the text ends in U+FFFD (an incomplete multi-byte character),
    it waits for more tokens.
    """

    def __init__(self, tokenizer, prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Append one token; return the new complete text (possibly empty)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix):]
        return ""

    def token_text(self, token_id: int) -> str:
        """A token's own text piece (for logprob listings)."""
        return self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def flush(self) -> str:
        """At the end, emit whatever is left even if it ends in an incomplete character."""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix):] if len(full) > len(prefix) else ""
