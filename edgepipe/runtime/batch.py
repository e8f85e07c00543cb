"""Continuous batching: a fixed set of KV slots that rows join and leave between decode steps.

`Generator.generate` runs a batch in lock step from start to end: a row that finishes early
keeps its place until the longest row is done, and no row can join. A server needs the
opposite: requests arrive and finish at any time. `SlotBatch` keeps one KV buffer of `slots`
rows (`kv.KVCache`) for its whole life. A request *joins* by taking a free row; `prefill()`
feeds its prompt into that row alone (a row view of the buffer, as `DynamicRequest` prefills
rows of different lengths), all at once or a budget of tokens at a time so that the other rows
keep decoding meanwhile; `sample()` takes its first token as soon as the prompt is in. Every
`step()` samples one token for each decoding row and feeds all of them in one decoder call. A
row *leaves* (finished, or cancelled by its caller) by giving its slot back, between two steps.

Batching does not change tokens: rows are right-padded and onnxruntime's CPU
`GroupQueryAttention` reads each row's length from `seqlens_k`, so a row's logits equal those
of the same prompt alone (see `engines/dynamic.py`). A free slot inside the batch is fed a pad
token at position 0 of its own row, which no other row attends to. Only the dynamic engine runs
here: a static artifact's graphs have batch 1 and a fixed cache.

Each row keeps its own `Sampler` (its own seed), stop strings, detokenizer, thinking budget and
constraint (`rows.Row`; a constrained row masks only its own logits), so a request's output does
not depend on what else is in the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from edgepipe.runtime.constrain import LogitsConstraint
from edgepipe.runtime.detokenize import (
    IncrementalDetokenizer,
    StopStringFilter,
    TokenBytes,
    token_bytes_for,
)
from edgepipe.runtime.engines.dynamic import DynamicEngine
from edgepipe.runtime.errors import GeneratorError, PromptTooLong
from edgepipe.runtime.prefix import PrefixCache
from edgepipe.runtime.rows import Row, Thinking
from edgepipe.runtime.sampling import Sampler, SamplingParams


@dataclass
class RowRequest:
    """What a caller asks of one row.

    Attributes:
        prompt: prompt token ids.
        params: validated sampling parameters (`max_new_tokens`, stop strings, seed, ...).
        stop_ids: ids that end the row (None: the artifact's eos ids).
        thinking: Qwen3 thinking-budget bookkeeping, or None.
        constraint: a factory of the row's `LogitsConstraint` (what `constrain.constraint_for`
            returns, already checked), called when the row joins; None: free generation.
    """

    prompt: list[int]
    params: SamplingParams
    stop_ids: Iterable[int] | None = None
    thinking: Thinking | None = None
    constraint: Callable[[], LogitsConstraint] | None = None


@dataclass
class Emission:
    """One row's result of one step.

    Attributes:
        slot: the row's slot.
        token: the id sampled (or forced).
        text: the text it completes (may be empty).
        done: the row finished with this token (its slot is already free).
        finish_reason: "stop", "stop_string" or "length" when done, else None.
    """

    slot: int
    token: int
    text: str
    done: bool
    finish_reason: str | None


@dataclass
class _Slot:
    row: Row
    sampler: Sampler
    stop_ids: frozenset[int]
    thinking: Thinking | None
    max_steps: int
    length: int  # KV positions the row holds (the prompt's, while it is being prefilled)
    logits: np.ndarray | None = None
    fresh: bool = False  # `logits` holds logits not sampled yet
    reuse: int = 0


class SlotBatch:
    """`slots` KV rows of `capacity` positions each, shared by the requests that join them.

    Not thread-safe: one thread (a server's scheduler) calls `join`, `step` and `cancel`.

    Args:
        engine: a `DynamicEngine` (its session, `bind` and `run`).
        tokenizer: the `tokenizers.Tokenizer` for streaming text.
        slots: rows decoded together at most.
        capacity: KV positions per row (prompt + generated tokens).
        eos_token_ids: the default stop ids.
        pad_token_id: the id fed to free slots.
        prefix_cache: a `PrefixCache` to reuse prompt prefixes from (None: off).
        token_bytes: the vocabulary's byte table (`Generator.token_bytes`, so a server builds
            it once); None: built here.

    Raises:
        GeneratorError: the engine is not a dynamic one.
    """

    def __init__(
        self,
        engine,
        tokenizer,
        *,
        slots: int,
        capacity: int,
        eos_token_ids: Iterable[int],
        pad_token_id: int,
        prefix_cache: PrefixCache | None = None,
        token_bytes: TokenBytes | None = None,
    ):
        if not isinstance(engine, DynamicEngine):
            raise GeneratorError(
                "continuous batching runs dynamic artifacts only (a static artifact's graphs "
                "have batch 1 and a fixed cache)"
            )
        if slots < 1 or capacity < 2:
            raise ValueError(f"slots must be >= 1 and capacity >= 2, got {slots}, {capacity}")
        self.engine, self.tokenizer = engine, tokenizer
        self.slots, self.capacity = slots, min(capacity, engine.limit)
        self.eos_token_ids = frozenset(eos_token_ids)
        self.pad_token_id = pad_token_id
        # A provider that prefills in one call cannot continue after cached positions.
        self.prefix_cache = prefix_cache if engine.continues_prefill else None
        self.cache = engine.new_cache(slots, self.capacity)
        art = engine.artifact
        itemsize = np.dtype(engine.kv_dtype).itemsize
        self.bytes_per_position = 2 * art.num_layers * art.num_kv_heads * art.head_dim * itemsize
        self.token_bytes = token_bytes_for(tokenizer) if token_bytes is None else token_bytes
        self._rows: dict[int, _Slot] = {}
        self._bindings: dict[int, tuple] = {}  # batch height -> (kv OrtValues, IOBinding)

    @property
    def active(self) -> int:
        """Rows holding a slot."""
        return len(self._rows)

    @property
    def free(self) -> int:
        """Slots free to join."""
        return self.slots - len(self._rows)

    @property
    def kv_bytes_in_use(self) -> int:
        """Bytes of KV the active rows' positions occupy (untouched capacity is not resident)."""
        return sum(s.length for s in self._rows.values()) * self.bytes_per_position

    def reused(self, slot: int) -> int:
        """Prompt positions `slot` took from the prefix cache."""
        return self._rows[slot].reuse

    def join(self, request: RowRequest) -> int:
        """Take a free slot for `request` (and its cached prefix, if any); return the slot.

        The prompt is fed by `prefill(slot)`, all at once or a budget at a time, so a long
        prompt need not stall the other rows' decoding; until it is complete, `step()` leaves
        the row alone.

        Raises:
            RuntimeError: no slot is free.
            PromptTooLong: the prompt leaves no room for a generated token.
            ValueError: an empty prompt.
        """
        if not self.free:
            raise RuntimeError("no free slot: join only when SlotBatch.free > 0")
        prompt = list(request.prompt)
        if not prompt:
            raise ValueError("prompt is empty: give at least one token")
        if len(prompt) >= self.capacity:
            raise PromptTooLong(
                f"prompt has {len(prompt)} tokens but a slot holds {self.capacity - 1} plus at "
                "least one generated token"
            )
        slot = min(set(range(self.slots)) - set(self._rows))
        p = request.params
        row = Row(
            prompt=prompt,
            detok=IncrementalDetokenizer(self.tokenizer, self.token_bytes),
            stops=StopStringFilter(p.stop_strings),
            thinking=bool(request.thinking and request.thinking.started),
            constraint=request.constraint() if request.constraint is not None else None,
        )
        stop_ids = self.eos_token_ids if request.stop_ids is None else request.stop_ids
        state = _Slot(
            row=row,
            sampler=Sampler(p),
            stop_ids=frozenset(stop_ids),
            thinking=request.thinking,
            # Same bound as Generator: a generated token needs a position for the next feed.
            max_steps=min(p.max_new_tokens, self.capacity - len(prompt) + 1),
            length=0,
        )
        if self.prefix_cache is not None:
            state.reuse = state.length = self.prefix_cache.load(prompt, self.cache, slot)
        self._rows[slot] = state
        return slot

    def prefilling(self, slot: int) -> bool:
        """Whether `slot`'s prompt is not fully fed yet."""
        s = self._rows[slot]
        return s.length < len(s.row.prompt)

    def prefill(self, slot: int, budget: int | None = None) -> int:
        """Feed `slot`'s prompt, in the engine's prefill chunks, until done or `budget` tokens.

        Chunks start at the same positions as `Generator`'s (multiples of the chunk after the
        reused prefix), and at least one chunk is fed per call. When the prompt is complete the
        row has fresh logits: `sample(slot)` or the next `step()` takes its first token.

        Returns:
            Prompt tokens fed by this call.
        """
        s = self._rows[slot]
        prompt = s.row.prompt
        if s.length >= len(prompt):
            return 0
        chunk = self.engine.prefill_chunk or len(prompt)
        kv = self.cache.ortvalues(slot)
        io = self.engine.bind(kv)
        ids = np.array([prompt], dtype=np.int64)
        fed = 0
        while s.length < len(prompt) and (budget is None or fed < budget or fed == 0):
            begin = s.length
            end = min(begin + chunk - (begin - s.reuse) % chunk, len(prompt))
            logits = self.engine.run(ids[:, begin:end], np.array([end]), kv, io)
            s.length, fed = end, fed + end - begin
        if s.length == len(prompt):
            s.logits, s.fresh = logits[0], True
        return fed

    def cancel(self, slot: int) -> None:
        """Free `slot` now (its caller went away); its positions are not kept."""
        self._rows.pop(slot, None)

    def step(self) -> list[Emission]:
        """Sample one token for every row with fresh logits, then feed the unfinished rows in
        one call (their logits are fresh again for the next step).

        Returns:
            One `Emission` per row sampled; rows that finished have left.
        """
        emissions = [self._sample(slot) for slot in sorted(self._rows) if self._rows[slot].fresh]
        # Every decoding row left holds a sampled token not yet fed; prefilling rows wait.
        feeding = [slot for slot in sorted(self._rows) if not self.prefilling(slot)]
        if feeding:
            self._decode(feeding)
        return emissions

    def sample(self, slot: int) -> Emission:
        """Sample a row's next token now, without waiting for `step()`.

        A scheduler calls it right after `join` so the new row's first token goes out as soon
        as its prompt is prefilled, not after the other joining rows' prefills and a step;
        the next `step()` feeds the token with the other rows.

        Raises:
            ValueError: the row's logits were already sampled.
        """
        if not self._rows[slot].fresh:
            raise ValueError(f"slot {slot} has no fresh logits: call step()")
        return self._sample(slot)

    def _sample(self, slot: int) -> Emission:
        s = self._rows[slot]
        token = s.row.next_token(s.logits, s.sampler, s.thinking)
        s.fresh, s.logits = False, None
        # `accept` appends the token: this is step len(out) + 1 of the row.
        text = s.row.accept(token, s.stop_ids, last=len(s.row.out) + 1 == s.max_steps)
        if s.row.done:
            self._leave(slot)
        return Emission(slot, token, text, s.row.done, s.row.finish_reason if s.row.done else None)

    def _leave(self, slot: int) -> None:
        s = self._rows.pop(slot)
        if self.prefix_cache is not None:
            # The last sampled token was never fed: the row holds prompt + out[:-1].
            self.prefix_cache.save(s.row.prompt + s.row.out[:-1], self.cache, slot)

    def _decode(self, feeding: list[int]) -> None:
        """One decoder call over rows 0..max(feeding).

        Rows in between that do not decode get a pad token: a free row at its position 0, a
        prefilling row at its next prompt position, which its next prefill chunk overwrites.
        """
        height = max(feeding) + 1
        feed = np.full((height, 1), self.pad_token_id, dtype=np.int64)
        lengths = np.ones(height, dtype=np.int64)
        for slot, s in self._rows.items():
            if slot < height and self.prefilling(slot):
                lengths[slot] = s.length + 1
        for slot in feeding:
            s = self._rows[slot]
            feed[slot, 0] = s.row.out[-1]
            s.length += 1
            lengths[slot] = s.length
        binding = self._bindings.get(height)
        if binding is None:
            kv = self._rows_view(height)
            binding = self._bindings[height] = (kv, self.engine.bind(kv))
        logits = self.engine.run(feed, lengths, *binding)
        for slot in feeding:
            s = self._rows[slot]
            s.logits, s.fresh = logits[slot], True

    def _rows_view(self, height: int):
        """(key OrtValues, value OrtValues) over rows 0..height-1 (contiguous: shares memory)."""
        from onnxruntime import OrtValue

        def wrap(array: np.ndarray):
            return OrtValue.ortvalue_from_numpy(array[:height])

        return [wrap(a) for a in self.cache.keys], [wrap(a) for a in self.cache.values]
