"""UTF-8-safe incremental detokenization and stop strings, for streaming.

Qwen's byte-level BPE tokens are byte strings: one Chinese, Thai or Burmese character or an
emoji often spans two or three tokens. Decoding a prefix of the ids would end in U+FFFD. For a
byte-level tokenizer (the `ByteLevel` decoder of `tokenizer.json`) this module maps each token to
its bytes once and feeds them to Python's incremental UTF-8 decoder, which holds an incomplete
character back until its last byte arrives: O(1) per token, and the joined pieces equal the full
decode. Other tokenizers fall back to re-decoding a short window of recent ids.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable


def _byte_decoder() -> dict[str, int]:
    """Invert GPT-2's byte → printable character map used by byte-level BPE vocabularies."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class TokenBytes:
    """Token id → raw bytes for a byte-level BPE `tokenizers.Tokenizer`, computed on first use.

    Special added tokens map to b"" when skipped, other added tokens to their UTF-8 text. Built
    lazily from `id_to_token` rather than by parsing tokenizer.json again: a parsed 151k-entry
    vocabulary costs tens of MB of peak memory, and a reply touches a few hundred ids.

    Raises:
        ValueError: the tokenizer's decoder is not `ByteLevel`.
    """

    def __init__(self, tokenizer, *, skip_special_tokens: bool = True):
        if type(tokenizer.decoder).__name__ != "ByteLevel":
            raise ValueError("not a byte-level tokenizer")
        self._tokenizer = tokenizer
        self._byte_of = _byte_decoder()
        self._cache: dict[int, bytes] = {}
        for idx, added in tokenizer.get_added_tokens_decoder().items():
            skip = skip_special_tokens and added.special
            self._cache[idx] = b"" if skip else added.content.encode("utf-8")

    def __call__(self, token_id: int) -> bytes:
        cached = self._cache.get(token_id)
        if cached is None:
            token = self._tokenizer.id_to_token(token_id)
            byte_of = self._byte_of
            cached = b"" if token is None else bytes(byte_of[ch] for ch in token if ch in byte_of)
            self._cache[token_id] = cached
        return cached


def token_bytes_for(tokenizer) -> TokenBytes | None:
    """The tokenizer's `TokenBytes`, or None when it is not byte-level (the detokenizer then
    re-decodes a window of ids). Build it once per tokenizer and share it: every
    `IncrementalDetokenizer` of a `Generator` or a `SlotBatch` reads the same table."""
    try:
        return TokenBytes(tokenizer)
    except (ValueError, KeyError):
        return None


class IncrementalDetokenizer:
    """Turns token ids, one at a time, into text pieces that never split a character.

    Args:
        tokenizer: a `tokenizers.Tokenizer` (used by the generic fallback).
        token_bytes: a `TokenBytes` for byte-level vocabularies (fast, exact path), or None.
        skip_special_tokens: drop special tokens from the text (fallback path; `TokenBytes`
            carries its own setting).
    """

    # The fallback re-decodes at most this many trailing ids to find the new text.
    _WINDOW = 8

    def __init__(
        self, tokenizer, token_bytes: TokenBytes | None = None, *, skip_special_tokens=True
    ):
        self._tokenizer = tokenizer
        self._token_bytes = token_bytes
        self._skip = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ids: list[int] = []
        self._prefix = 0  # fallback: ids before this index are already emitted
        self._read = 0

    def add(self, token_id: int) -> str:
        """Add one token; return the text it completes (may be "")."""
        if self._token_bytes is not None:
            return self._utf8.decode(self._token_bytes(token_id))
        self._ids.append(token_id)
        prefix_text = self._tokenizer.decode(self._ids[self._prefix : self._read], self._skip)
        full_text = self._tokenizer.decode(self._ids[self._prefix :], self._skip)
        if full_text.endswith("\ufffd") or len(full_text) <= len(prefix_text):
            return ""
        new = full_text[len(prefix_text) :]
        self._read = len(self._ids)
        self._prefix = max(self._prefix, self._read - self._WINDOW)
        return new

    def flush(self) -> str:
        """Text still held back at the end (an incomplete character becomes U+FFFD, as in
        a full decode)."""
        if self._token_bytes is not None:
            return self._utf8.decode(b"", final=True)
        full_text = self._tokenizer.decode(self._ids[self._prefix :], self._skip)
        prefix_text = self._tokenizer.decode(self._ids[self._prefix : self._read], self._skip)
        self._read = len(self._ids)
        return full_text[len(prefix_text) :]

    def feed(self, token_ids: Iterable[int]) -> list[str]:
        """Add many tokens; return the non-empty pieces (handy in tests)."""
        pieces = [self.add(t) for t in token_ids]
        return [p for p in pieces if p]


class StopStringFilter:
    """Holds back streamed text that might be the start of a stop string.

    `push(piece)` returns the text that is safe to emit and whether a stop string was found;
    on a match the text is cut right before the stop string and everything after is dropped.
    """

    def __init__(self, stop_strings: Iterable[str]):
        self.stop_strings = tuple(stop_strings)
        self._pending = ""
        self.stopped = False
        self.matched: str | None = None

    def push(self, piece: str) -> str:
        if self.stopped:
            return ""
        if not self.stop_strings:
            return piece
        text = self._pending + piece
        hits = [(text.find(s), s) for s in self.stop_strings if s in text]
        if hits:
            cut, self.matched = min(hits)
            self.stopped = True
            self._pending = ""
            return text[:cut]
        hold = self._held_suffix(text)
        self._pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold]

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return "" if self.stopped else out

    def _held_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        best = 0
        for stop in self.stop_strings:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
