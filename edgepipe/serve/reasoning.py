"""Splitting a streamed Qwen3 reply into `reasoning_content` and `content` as it arrives.

`<think>` and `</think>` are ordinary (non-special) tokens in Qwen3, so they reach the text;
the non-streaming path splits the whole reply with `edgepipe.runtime.split_thinking`, and this
class does the same piece by piece: a piece that may be the start of a tag is held back until
the next one shows whether it is. The joined parts equal `split_thinking`'s, up to the newlines
it strips around the block.
"""

from __future__ import annotations

from edgepipe.runtime.chat import THINK_CLOSE, THINK_OPEN


class ReasoningSplitter:
    """Routes text pieces to reasoning or content.

    Args:
        started: the prompt opened the thinking block (the model starts inside it).
        enabled: whether a reply may open a block at all (False: everything is content).
    """

    def __init__(self, *, started: bool, enabled: bool = True):
        self.enabled = enabled or started
        self.thinking = started
        self._pending = ""
        self._at_start = not started  # only a reply's first text may open a block
        self._strip_next = started  # the newline after <think> is not reasoning
        self._strip_answer = False  # nor the blank line after </think> content

    def push(self, piece: str) -> tuple[str, str]:
        """(reasoning, content) to emit for `piece`."""
        if not self.enabled:
            return "", piece
        text = self._pending + piece
        self._pending = ""
        reasoning = content = ""
        while text:
            if self._at_start:
                stripped = text.lstrip()
                if not stripped:
                    self._pending = text
                    return reasoning, content
                if stripped.startswith(THINK_OPEN):
                    text = stripped[len(THINK_OPEN) :]
                    self.thinking, self._at_start, self._strip_next = True, False, True
                    continue
                if THINK_OPEN.startswith(stripped):
                    self._pending = text  # maybe the start of <think>: wait for more
                    return reasoning, content
                self._at_start = False
            if not self.thinking:
                if self._strip_answer:
                    text = text.lstrip("\n")
                    self._strip_answer = not text
                content += text
                break
            text = self._strip(text)
            cut = text.find(THINK_CLOSE)
            if cut >= 0:
                reasoning += text[:cut].rstrip("\n")
                self.thinking, self._strip_answer = False, True
                text = text[cut + len(THINK_CLOSE) :]
                if not text:
                    break
                continue
            keep = _partial_suffix(text, THINK_CLOSE)
            reasoning += text[: len(text) - keep]
            self._pending = text[len(text) - keep :]
            break
        return reasoning, content

    def flush(self) -> tuple[str, str]:
        """What is still held back at the end."""
        text, self._pending = self._pending, ""
        if self.thinking:
            return text, ""
        return "", text

    def _strip(self, text: str) -> str:
        if self._strip_next:
            text = text.lstrip("\n")
            self._strip_next = not text
        return text


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
