"""Checks on what callers feed the model: prompt text and token ids.

The tokenizer and onnxruntime report bad input badly or not at all: a lone surrogate (what
Python makes of undecodable bytes in `sys.argv`) gives the tokenizer's `TypeError:
TextInputSequence must be str`, a token id of -1 silently reads the last embedding row, one past
the vocabulary raises an `IndexError` deep in sampling, and 2**63 an `OverflowError` in numpy.
Each is refused here with `InvalidPrompt`, naming what is wrong.
"""

from __future__ import annotations

from collections.abc import Sequence

from edgepipe.runtime.errors import InvalidPrompt


def check_text(text, what: str = "prompt") -> str:
    """Return `text` if it is a str that encodes as UTF-8, else raise `InvalidPrompt`."""
    if not isinstance(text, str):
        raise InvalidPrompt(f"{what} must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        raise InvalidPrompt(
            f"{what} is not valid text: {bad!r} at character {exc.start} is a lone surrogate "
            "(undecodable bytes, e.g. input that is not UTF-8); pass UTF-8 text"
        ) from None
    return text


def check_ids(ids: Sequence, vocab_size: int, what: str = "prompt") -> list[int]:
    """`ids` as a list of ints, each in `[0, vocab_size)`, else raise `InvalidPrompt`."""
    out = []
    for i, token in enumerate(ids):
        if isinstance(token, bool) or not 0 <= int(token) < vocab_size:
            raise InvalidPrompt(
                f"{what}[{i}] = {token!r} is not a token id: ids are ints in [0, {vocab_size})"
            )
        out.append(int(token))
    return out
