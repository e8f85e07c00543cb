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

Speculative decoding (`RowRequest.speculative="ngram"`, greedy unconstrained rows; the rules
are `speculative.py`'s) runs per row, and only while the row is the ONLY decoding row: then the
step is one call on that row's own view of the buffer (batch 1) that feeds its last token and
up to K drafts (its own `NgramDrafter`, adaptive K) and returns the logits of all of them; the
row takes its greedy choices while they equal its drafts (`speculative.take`) and its length
grows by the tokens it kept, so rejected drafts stay past its length (the roll-back by length of
one row). Such a step may emit several tokens for the row, in order. While other rows decode, a
speculating row decodes one token per step like the others (its drafter waits). Why not verify
inside the batched step (every row fed S = 1 + K tokens, pads for the rows without drafts)?
onnxruntime's CPU `GroupQueryAttention` refuses it: "batch_size must be 1 when sequence_length
> 1 and past context is given" (onnxruntime 1.32). A separate verify call per speculating row
next to the batched call would work, but on a CPU, where a call's cost is reading the weights,
it adds a call per row to every step and slows the other rows' tokens; with the batch full it
gains nothing (4 rows x 1 token per call vs 1 row x ~4 tokens per call). Speculation pays when
the server is otherwise idle, which is when a lone request's latency is all that matters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

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
from edgepipe.runtime.speculative import DraftStats, NgramDrafter, check_request, draft, take


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
        speculative: "ngram" for prompt-lookup speculative decoding (greedy, unconstrained
            rows; see the module docstring), None: one token per step.
    """

    prompt: list[int]
    params: SamplingParams
    stop_ids: Iterable[int] | None = None
    thinking: Thinking | None = None
    constraint: Callable[[], LogitsConstraint] | None = None
    speculative: str | None = None


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
    logits: np.ndarray | None = None  # [positions, vocab]: the last fed token's, then drafts'
    fresh: bool = False  # `logits` holds logits not sampled yet
    reuse: int = 0
    drafter: NgramDrafter | None = None
    drafts: list[int] = field(default_factory=list)  # fed after the last token, not taken yet


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

    Attributes:
        stats: what speculation did over the batch's life (verify calls are per row).

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
        self.stats = DraftStats()
        self._rows: dict[int, _Slot] = {}
        self._bindings: dict[int, tuple] = {}  # batch height -> (kv OrtValues, IOBinding)
        self._row_bindings: dict[int, tuple] = {}  # slot -> (its row's kv, IOBinding)

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
            ValueError: an empty prompt; speculation asked of a sampled or constrained row.
            GeneratorError: speculation asked of an artifact that cannot verify drafts.
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
        p = request.params
        check_request(
            request.speculative,
            greedy=p.greedy,
            batch=1,
            engine=self.engine,
            constrained=request.constraint is not None,
        )
        slot = min(set(range(self.slots)) - set(self._rows))
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
            drafter=NgramDrafter(prompt) if request.speculative else None,
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
            s.logits, s.fresh = logits, True  # [1, vocab]: one row, its last position
        return fed

    def cancel(self, slot: int) -> None:
        """Free `slot` now (its caller went away); its positions are not kept."""
        self._rows.pop(slot, None)

    def step(self) -> list[Emission]:
        """Take the tokens of every row with fresh logits, then feed the unfinished rows in
        one call (their logits are fresh again for the next step).

        Returns:
            The `Emission`s of the rows that took tokens, in slot order: one per token (a
            speculating row may take several in a step); rows that finished have left.
        """
        emissions = [
            emission
            for slot in sorted(self._rows)
            if self._rows[slot].fresh
            for emission in self._sample(slot)
        ]
        # Every decoding row left holds a sampled token not yet fed; prefilling rows wait.
        feeding = [slot for slot in sorted(self._rows) if not self.prefilling(slot)]
        if feeding:
            self._decode(feeding)
        return emissions

    def sample(self, slot: int) -> Emission:
        """Sample a row's first token now, without waiting for `step()`.

        A scheduler calls it right after `join` so the new row's first token goes out as soon
        as its prompt is prefilled, not after the other joining rows' prefills and a step;
        the next `step()` feeds the token with the other rows.

        Raises:
            ValueError: the row's logits were already sampled, or they are a verify call's
                (only `step()` takes those: they may give several tokens).
        """
        s = self._rows[slot]
        if not s.fresh or s.drafts:
            raise ValueError(f"slot {slot} has no fresh prompt logits: call step()")
        (emission,) = self._sample(slot)
        return emission

    def _sample(self, slot: int) -> list[Emission]:
        s = self._rows[slot]
        pending, drafts = s.logits, s.drafts
        s.fresh, s.logits, s.drafts = False, None, []
        if s.drafter is None:
            token = s.row.next_token(pending[0], s.sampler, s.thinking)
            # `accept` appends the token: this is step len(out) + 1 of the row.
            text = s.row.accept(token, s.stop_ids, last=len(s.row.out) + 1 == s.max_steps)
            taken = [(token, text)]
        else:
            stats = s.drafter.stats
            before = (stats.verify_calls, stats.drafted, stats.accepted)
            taken = take(
                s.row, pending, drafts, s.drafter,
                sampler=s.sampler, stop_ids=s.stop_ids, thinking=s.thinking,
                max_steps=s.max_steps,
            )  # fmt: skip
            self.stats.verify_calls += stats.verify_calls - before[0]
            self.stats.drafted += stats.drafted - before[1]
            self.stats.accepted += stats.accepted - before[2]
            # The drafts it kept were fed after its last token: their positions now count.
            s.length += len(taken) - 1
        emissions = [Emission(slot, token, text, False, None) for token, text in taken]
        if s.row.done:  # only by its last token
            self._leave(slot)
            emissions[-1].done, emissions[-1].finish_reason = True, s.row.finish_reason
        return emissions

    def _leave(self, slot: int) -> None:
        s = self._rows.pop(slot)
        if self.prefix_cache is not None:
            # The last sampled token was never fed: the row holds prompt + out[:-1].
            self.prefix_cache.save(s.row.prompt + s.row.out[:-1], self.cache, slot)

    def _decode(self, feeding: list[int]) -> None:
        """One decoder call: the verify call of a lone speculating row (see the module
        docstring), else one token for each row 0..max(feeding).

        Rows in between that do not decode get a pad token: a free row at its position 0, a
        prefilling row at its next prompt position, which its next prefill chunk overwrites.
        """
        if len(feeding) == 1:
            drafts = self._drafts(feeding[0])
            if drafts:
                self._verify(feeding[0], drafts)
                return
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
            s.logits, s.fresh = logits[slot : slot + 1], True

    def _verify(self, slot: int, drafts: list[int]) -> None:
        """Feed `slot`'s last token and its drafts in one call on its own row of the buffer."""
        s = self._rows[slot]
        binding = self._row_bindings.get(slot)
        if binding is None:
            kv = self.cache.ortvalues(slot)
            binding = self._row_bindings[slot] = (kv, self.engine.bind(kv))
        feed = np.array([[s.row.out[-1], *drafts]], dtype=np.int64)
        s.length += 1  # the last token; the drafts it keeps are counted when it takes them
        lengths = np.array([s.length + len(drafts)], dtype=np.int64)
        s.logits, s.drafts, s.fresh = self.engine.verify(feed, lengths, binding[1])[0], drafts, True

    def _drafts(self, slot: int) -> list[int]:
        """The drafts `slot` verifies in the next call ([] for a row that does not speculate)."""
        s = self._rows[slot]
        if s.drafter is None:
            return []
        return draft(
            s.row, s.drafter, max_steps=s.max_steps, capacity=self.capacity, cached=s.length
        )

    def _rows_view(self, height: int):
        """(key OrtValues, value OrtValues) over rows 0..height-1 (contiguous: shares memory)."""
        from onnxruntime import OrtValue

        def wrap(array: np.ndarray):
            return OrtValue.ortvalue_from_numpy(array[:height])

        return [wrap(a) for a in self.cache.keys], [wrap(a) for a in self.cache.values]
