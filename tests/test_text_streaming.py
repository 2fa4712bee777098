"""Stop strings across token boundaries and incremental detokenization of multi-byte characters."""
from __future__ import annotations

import pytest

from engine.detokenizer import IncrementalDetokenizer
from engine.stop import StopStringMatcher
from models.loader import load_model


def feed_all(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    m = StopStringMatcher(stops)
    out, stopped = "", False
    for p in pieces:
        text, stopped = m.feed(p)
        out += text
        if stopped:
            return out, True
    return out + m.flush(), False


def test_stop_string_split_over_pieces_is_not_emitted():
    assert feed_all(["###"], ["Hello #", "#", "# world"]) == ("Hello ", True)


def test_partial_match_that_does_not_complete_is_released():
    assert feed_all(["STOP"], ["a ST", "OR", "Y"]) == ("a STORY", False)
    assert feed_all(["STOP"], ["a ST"]) == ("a ST", False)  # held text is flushed at the end


def test_earliest_of_several_stops_wins():
    assert feed_all(["world", "lo w"], ["Hello", " world"]) == ("Hel", True)


@pytest.fixture(scope="module")
def tokenizer():
    return load_model("default").tokenizer


@pytest.mark.parametrize("text", ["Ça coûte 5 € — 日本語のテキスト 🎉🚀 ok", "Grüße aus Köln, 北京 and ☕"])
def test_incremental_detokenizer_never_emits_broken_utf8(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    # Some characters span several byte-level tokens: the whole point of the test.
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=tokenizer.encode("Say:", add_special_tokens=False))
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.flush())
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text
