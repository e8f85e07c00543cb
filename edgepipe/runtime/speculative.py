"""Prompt-lookup (n-gram) speculative decoding for one greedy row.

When the output repeats text that is already in the context (a rewrite of a given file, an
answer quoting its document), the tokens that followed the last occurrence of the context's
final n-gram are a good guess for the next ones. `NgramDrafter` proposes up to K such tokens;
the decoder checks them in ONE call that feeds the last token plus the K drafts and returns the
logits of all K + 1 positions (`Request.verify`: the shipped decoder is fed `logits_to_keep` =
K + 1; an all_logits export returns every position anyway). The row takes its own greedy choice
at each position, so the drafts only decide how many tokens one call yields, never which: the
output equals plain greedy decoding. Rejected drafts are rolled back by length: their keys and
values stay in the shared past/present buffer past the row's length, where attention does not
read them and the next call overwrites them.

Sampled decoding is refused (`check_request`): exact speculative sampling needs rejection
sampling against the draft distribution, which an n-gram draft does not have as probabilities,
and an approximate version would change the output distribution silently.

Adaptivity: K grows by 2 after a fully accepted draft and shrinks by 1 otherwise (the schedule
of transformers' assisted generation); when the running acceptance falls below
`off_below`, drafting pauses for `cooldown` plain steps (doubled each time it pauses again), so
on free text the cost is a dictionary lookup per token.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from edgepipe.runtime.errors import GeneratorError

SPECULATIVE = ("ngram",)


def check_request(
    mode: str | None, *, greedy: bool, batch: int, engine, constrained: bool = False
) -> None:
    """Refuse what speculative decoding cannot do exactly, with what to do instead.

    Raises:
        ValueError: an unknown mode, sampling, or a batch.
        GeneratorError: the artifact cannot return the logits of several positions.
    """
    if mode is None:
        return
    if mode not in SPECULATIVE:
        raise ValueError(f"speculative must be one of {SPECULATIVE} or None, got {mode!r}")
    if not greedy:
        raise ValueError(
            "speculative='ngram' needs greedy decoding (do_sample=False): exact speculative "
            "sampling is not implemented; drop speculative= to sample"
        )
    if batch != 1:
        raise ValueError("speculative decoding runs one prompt per call; pass prompts one by one")
    if constrained:
        raise ValueError(
            "speculative decoding does not combine with a constraint (json_schema, regex, "
            "choices, tools): the drafts are not masked; drop speculative= or the constraint"
        )
    if not getattr(engine, "verifies", False):
        raise GeneratorError(
            "this artifact cannot verify drafts: its decoder returns the last position's logits "
            "only and has no logits_to_keep input (built before edgepipe added it); rebuild it, "
            "or export it with all_logits=True (or drop speculative=)"
        )


@dataclass
class DraftStats:
    """What speculation did in one call: verify calls, tokens drafted and accepted, pauses."""

    verify_calls: int = 0
    drafted: int = 0
    accepted: int = 0
    pauses: int = 0


class NgramDrafter:
    """Drafts the tokens that followed the latest earlier occurrence of the context's tail.

    Args:
        tokens: the context so far (prompt, then output as it is appended).
        max_ngram, min_ngram: tail lengths tried, longest first.
        k_start, k_max: draft length at first and at most.
        off_below: pause drafting while the running acceptance (accepted / drafted, an
            exponential average) is below this.
        cooldown: plain steps of the first pause (doubled at each further pause, up to 512).
    """

    def __init__(
        self,
        tokens: list[int],
        *,
        max_ngram: int = 3,
        min_ngram: int = 1,
        k_start: int = 4,
        k_max: int = 8,
        off_below: float = 0.3,
        cooldown: int = 16,
    ):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.k, self.k_max = k_start, k_max
        self.off_below, self.cooldown = off_below, cooldown
        self.acceptance = 1.0
        self.paused = 0
        self.stats = DraftStats()
        self.tokens: list[int] = []
        # n -> {n-gram: the index of the token that followed its latest occurrence}
        self._index: dict[int, dict[tuple[int, ...], int]] = {
            n: {} for n in range(min_ngram, max_ngram + 1)
        }
        for token in tokens:
            self.append(token)

    def append(self, token: int) -> None:
        """Add one token to the context (only tokens the row kept)."""
        tokens = self.tokens
        end = len(tokens)
        for n, index in self._index.items():
            if end >= n:
                index[tuple(tokens[end - n :])] = end
        tokens.append(int(token))

    def draft(self, room: int) -> list[int]:
        """Up to min(K, room) tokens to verify; [] when paused or nothing matches."""
        if self.paused:
            self.paused -= 1
            return []
        limit = min(self.k, room)
        if limit <= 0:
            return []
        tokens = self.tokens
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if len(tokens) < n:
                continue
            start = self._index[n].get(tuple(tokens[-n:]))
            if start is not None:
                return tokens[start : start + limit]
        return []

    def record(self, drafted: int, accepted: int) -> None:
        """Update K and the acceptance after a verify call."""
        stats = self.stats
        stats.verify_calls += 1
        stats.drafted += drafted
        stats.accepted += accepted
        self.k = min(self.k + 2, self.k_max) if accepted == drafted else max(1, self.k - 1)
        self.acceptance = 0.7 * self.acceptance + 0.3 * (accepted / drafted)
        if self.acceptance < self.off_below:
            stats.pauses += 1
            self.paused = min(self.cooldown << (stats.pauses - 1), 512)
            self.acceptance = 1.0  # give drafting a fresh chance after the pause


def draft(row, drafter: NgramDrafter, *, max_steps: int, capacity: int, cached: int) -> list[int]:
    """The drafts a row verifies next ([] while it emits forced tokens).

    Args:
        row: the `Row` (its last token is not fed yet).
        drafter: the row's `NgramDrafter`.
        max_steps: tokens the row may generate at most.
        capacity: KV positions of the row.
        cached: positions the row holds (its prompt and all its tokens but the last).
    """
    if row.forced:
        return []
    # Room: every verified position needs a cache slot, and at most max_steps tokens.
    return drafter.draft(min(max_steps - len(row.out) - 1, capacity - cached - 1))


def take(row, pending, drafts, drafter, *, sampler, stop_ids, thinking, max_steps) -> list:
    """Take the row's tokens from one call's logits rows; record how many drafts held.

    Row i of `pending` gives the token after fed position i (the row's last token, then
    `drafts`). The row takes its own choice at each position and goes on while that choice is
    the draft fed there, so it takes 1 + (accepted drafts) tokens unless it finishes first; its
    cache then holds every taken token but the last, and the rejected drafts' positions lie
    past its length.

    Returns:
        (token, text piece) per token taken.
    """
    taken = []
    accepted = 0
    for i, row_logits in enumerate(pending):
        token = row.next_token(row_logits, sampler, thinking)
        piece = row.accept(token, stop_ids, last=len(row.out) + 1 == max_steps)
        drafter.append(token)
        taken.append((token, piece))
        if row.done or len(row.out) >= max_steps:
            break
        if i < len(drafts):
            if token != drafts[i]:
                break
            accepted += 1
    if drafts:
        drafter.record(len(drafts), accepted)
    return taken


def decode(row, request, logits, *, sampler, stop_ids, thinking, max_steps, drafter) -> Iterator:
    """The decode loop of one row with speculation; yields text pieces, returns t_first.

    Args:
        row: the `Row` (its prompt was prefilled, `logits` are its next-token logits [vocab]).
        request: the engine request (`step` and `verify`).
        sampler, stop_ids, thinking: as the plain loop uses them.
        max_steps: tokens to generate at most.
        drafter: an `NgramDrafter` over the prompt.
    """
    pending = [logits]  # logits rows, each giving the token after the previous one
    drafts: list[int] = []
    t_first = None
    capacity = request.capacity
    while True:
        taken = take(
            row, pending, drafts, drafter,
            sampler=sampler, stop_ids=stop_ids, thinking=thinking, max_steps=max_steps,
        )  # fmt: skip
        if t_first is None:
            t_first = time.perf_counter()
        for _, piece in taken:
            if piece:
                yield piece
        if row.done or len(row.out) >= max_steps:
            return t_first
        cached = len(row.prompt) + len(row.out) - 1  # the last token is not fed yet
        drafts = draft(row, drafter, max_steps=max_steps, capacity=capacity, cached=cached)
        feed = np.array([[row.out[-1], *drafts]], dtype=np.int64)
        lengths = np.array([cached + feed.shape[1]], dtype=np.int64)
        pending = request.verify(feed, lengths)[0] if drafts else request.step(feed, lengths)
