"""A chat prompt's token ids, for the tests that drive the real engine (the `engine` fixture of conftest.py)."""
from __future__ import annotations

from typing import Any


def chat_ids(engine: Any, text: str) -> list[int]:
    """Token ids of one user message in the model's chat template, with the assistant's turn opened."""
    out = engine.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                               tokenize=True)
    return list(out["input_ids"] if not isinstance(out, list) else out)
