"""One row of a generate call: its tokens, its text so far, its stop state, its thinking budget,
its constraint.

`Generator` runs the rows of a batch in lock step; each row samples (or is forced) its next
token and turns it into text on its own, so rows stop independently. A row with a constraint
(`constrain.LogitsConstraint`, one matcher per row) masks its logits before sampling, advances
the matcher with the sampled token, and stops once the constrained text is complete.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgepipe.runtime.chat import opens_thinking
from edgepipe.runtime.constrain import LogitsConstraint
from edgepipe.runtime.detokenize import IncrementalDetokenizer, StopStringFilter
from edgepipe.runtime.sampling import Sampler


@dataclass
class Thinking:
    """Thinking-budget bookkeeping for `Generator.chat()`.

    Attributes:
        budget: thinking tokens allowed before the block is closed.
        started: whether the prompt already opened the thinking block.
        open_id, close_id: the ids of `<think>` and `</think>`.
        close_ids: the ids forced when the budget is spent (`</think>` and the blank line).
    """

    budget: int
    started: bool
    open_id: int | None
    close_id: int | None
    close_ids: list[int]


def thinking_plan(tokenizer, prompt: str, enable_thinking, budget) -> Thinking | None:
    """The thinking-budget bookkeeping of a chat reply: None without a budget or with thinking
    off. `Generator.chat` and the server's chat endpoint both plan rows with it.

    Args:
        tokenizer: the `tokenizers.Tokenizer` (the ids of `<think>` and `</think>`).
        prompt: the rendered prompt (does it already open the thinking block?).
        enable_thinking: the template switch (False: no thinking, no budget).
        budget: thinking tokens allowed, or None.

    Raises:
        ValueError: a budget that is not an int >= 0, or a tokenizer without `</think>`.
    """
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise ValueError(f"thinking_budget must be an int >= 0 or None, got {budget!r}")
    if enable_thinking is False:
        return None
    close_id = tokenizer.token_to_id("</think>")
    if close_id is None:
        raise ValueError("thinking_budget needs a tokenizer with a </think> token (Qwen3)")
    return Thinking(
        budget=budget,
        started=opens_thinking(prompt),
        open_id=tokenizer.token_to_id("<think>"),
        close_id=close_id,
        close_ids=tokenizer.encode("</think>\n\n", add_special_tokens=False).ids,
    )


@dataclass
class Row:
    """The state of one row.

    Attributes:
        prompt: the prompt ids as fed.
        detok, stops: the row's incremental detokenizer and stop-string filter.
        out: generated ids.
        pieces: text pieces emitted so far.
        done, finish_reason: whether the row stopped, and why.
        forced: ids to emit next instead of sampling (closing a thinking block).
        thinking, thinking_tokens: whether the row is inside a thinking block, and its length.
        constraint: the row's grammar matcher, None when generation is free.
    """

    prompt: list[int]
    detok: IncrementalDetokenizer
    stops: StopStringFilter
    out: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    done: bool = False
    finish_reason: str = "length"
    forced: list[int] = field(default_factory=list)
    thinking: bool = False
    thinking_tokens: int = 0
    constraint: LogitsConstraint | None = None

    def next_token(self, logits: np.ndarray, sampler: Sampler, thinking: Thinking | None) -> int:
        """The next id: a forced one, `</think>` when the budget is spent, else a sample."""
        if self.forced:
            return self.forced.pop(0)
        if thinking is not None and self.thinking and self.thinking_tokens >= thinking.budget:
            # Budget spent: close the block instead of sampling, then let the model answer.
            self.thinking = False
            self.forced = list(thinking.close_ids)
            return self.forced.pop(0)
        if self.constraint is not None:
            # A float32 copy: `mask` writes -inf in place through an int32 view, and the
            # engine's logits array is not ours to change.
            logits = np.array(logits, dtype=np.float32)
            self.constraint.mask(logits)
        token = sampler.pick(logits, lambda: self.prompt + self.out)
        if self.constraint is not None:
            self.constraint.advance(token)
        if thinking is not None:
            if token == thinking.open_id and not self.out:
                self.thinking = True
            elif token == thinking.close_id:
                self.thinking = False
            elif self.thinking:
                self.thinking_tokens += 1
        return token

    def accept(self, token: int, stop_ids, *, last: bool) -> str:
        """Append `token`; return the text it completes (empty while a character or a possible
        stop string is incomplete). `last`: no further token will come (flush everything)."""
        self.out.append(token)
        if token in stop_ids and not self.forced:
            # A stop token ends the text without adding its own (it is kept in token_ids).
            self.done, self.finish_reason = True, "stop"
            piece = self.stops.push(self.detok.flush())
            piece += self.stops.flush()
            if self.stops.stopped:
                self.finish_reason = "stop_string"
            self.pieces.append(piece)
            return piece
        piece = self.stops.push(self.detok.add(token))
        if self.stops.stopped:
            self.done, self.finish_reason = True, "stop_string"
        elif last or self.constrained_done:
            self.done = True
            if self.constrained_done:
                self.finish_reason = "stop"  # the constrained text is complete
            piece += self.stops.push(self.detok.flush()) + self.stops.flush()
        self.pieces.append(piece)
        return piece

    @property
    def constrained_done(self) -> bool:
        """Whether the row's constraint is complete (nothing may follow)."""
        return self.constraint is not None and self.constraint.is_done()
