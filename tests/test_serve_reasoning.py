"""ReasoningSplitter: streamed pieces split like `split_thinking` splits the whole reply."""

from __future__ import annotations

import pytest

from edgepipe.runtime import split_thinking
from edgepipe.serve.reasoning import ReasoningSplitter

REPLIES = [
    ("<think>\nLet me think.\n</think>\n\nThe answer is 4.", False),
    ("Let me think.\n</think>\n\nThe answer is 4.", True),
    ("\n<think>\nhmm</think>Done", False),
    ("No thinking here, 2 < 3 and <thin is not a tag", False),
    ("still thinking when tokens ran out", True),
]


def stream(splitter, text, size):
    reasoning = content = ""
    for i in range(0, len(text), size):
        r, c = splitter.push(text[i : i + size])
        reasoning, content = reasoning + r, content + c
    r, c = splitter.flush()
    return reasoning + r, content + c


@pytest.mark.parametrize("size", [1, 2, 3, 7, 100])
@pytest.mark.parametrize("text, started", REPLIES)
def test_streamed_split_equals_the_whole_split(text, started, size):
    reasoning, content = stream(ReasoningSplitter(started=started), text, size)
    whole = split_thinking(text, started=started)
    assert content == whole.answer
    assert reasoning.strip("\n") == (whole.thinking or "")


def test_a_disabled_splitter_passes_everything_as_content():
    assert stream(ReasoningSplitter(started=False, enabled=False), "<think>x</think>y", 2) == (
        "",
        "<think>x</think>y",
    )
