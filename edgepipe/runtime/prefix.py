"""A bounded cache of KV prefixes, so a prompt that starts like an earlier one skips that part.

Chat clients resend the whole conversation every turn, and many requests share a system prompt:
the keys and values of those leading tokens are the same every time (a decoder's position i
depends only on tokens 0..i). `PrefixCache` keeps copies of finished rows' KV positions, keyed
by the token ids they hold, within a byte budget (least recently used entries go first). A new
prompt takes the entry with the longest common prefix, copies those positions into its own KV
row, and prefills only the rest: onnxruntime's GroupQueryAttention continues from cached
positions exactly as from its own earlier call (the same property chunked prefill and
`ChatSession` rely on).

Entries are copies, not shared buffers: a row overwrites its positions past the common prefix,
and rows of a batch live in one buffer per layer, so sharing would need copy-on-write bookkeeping
for a saving of one memcpy per request. The exception is a buffer nobody writes again: a finished
`Generator` call's own cache, when the call filled it, is kept as it is (`save(copy=False)`),
since it would be freed otherwise. A load always copies, so an entry never changes once saved.

`PrefixLease` connects the cache to one `Generator` call (batch 1, dynamic engine): it is the
call's `CacheStore`, so the engine takes the longest cached prefix and prefills only the rest,
and the call's prompt and output are saved when it ends.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from edgepipe.runtime.engines.kv import ROUND, plan_capacity
from edgepipe.runtime.errors import GeneratorError

# `Generator`'s default budget: one 512-token system prompt or document plus a 256-token
# exchange (768 positions) for the heaviest KV of the registered shapes, float32 as the CPU
# profiles run it: Qwen3-4B 288 KiB a position (216 MiB), Qwen3-0.6B/1.7B 224 KiB (168 MiB);
# Qwen2.5-0.5B's 24 KiB make it ~10,900 positions. The server's `--prefix-cache-mb` default is
# the same. What it holds is KV the calls had already filled (a call's filled cache is kept, not
# copied); benchmarks/prefix_reuse.py measures what a hit saves and a miss costs.
PREFIX_CACHE_BYTES = 256 << 20
# `save(copy=False)` keeps a buffer whose unused capacity is at most this many positions: a
# call that ran to max_new_tokens leaves less than the rounding of its capacity unused.
KEEP_SLACK = ROUND


@dataclass
class PrefixStats:
    """Lookups, hits and reused tokens since the cache was created."""

    lookups: int = 0
    hits: int = 0
    reused_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0


class PrefixCache:
    """Token-id prefixes and their KV positions, bounded by bytes.

    Thread-safe: `load`, `save` and `clear` hold a lock (a `Generator` serves concurrent calls).

    Args:
        max_bytes: memory the entries may hold together (0 disables the cache).
        min_tokens: shortest prefix worth reusing (shorter matches count as misses: copying a
            few positions saves less than the bookkeeping costs).
        min_suffix: prompt tokens a load always leaves to prefill (>= 1: the last one's logits
            are needed).

    Attributes:
        nbytes: bytes the entries count (their positions, or a kept buffer's whole capacity);
            never more than `max_bytes`.
        stats: a `PrefixStats`.
    """

    def __init__(self, max_bytes: int, *, min_tokens: int = 4, min_suffix: int = 1):
        self.max_bytes = int(max_bytes)
        self.min_tokens = max(1, int(min_tokens))
        self.min_suffix = max(1, int(min_suffix))
        self.stats = PrefixStats()
        self.nbytes = 0
        # ids tuple -> (keys, values, bytes counted): per layer, [kv_heads, len(ids), head_dim].
        self._entries: OrderedDict[tuple[int, ...], tuple[list, list, int]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def load(self, prompt: list[int], cache, row: int) -> int:
        """Copy the longest cached prefix of `prompt` into `row` of `cache`; return its length.

        At most `len(prompt) - min_suffix` positions are reused: one prompt token at least must
        still be fed to get the logits of the next one.

        Args:
            prompt: the new prompt's ids.
            cache: the `KVCache` holding the row.
            row: the batch row to fill.
        """
        with self._lock:
            self.stats.lookups += 1
            best, best_len = None, 0
            for ids in self._entries:
                common = _common_prefix(ids, prompt)
                if common > best_len:
                    best, best_len = ids, common
            reuse = min(best_len, len(prompt) - self.min_suffix)
            if best is None or reuse < self.min_tokens:
                return 0
            self._entries.move_to_end(best)
            keys, values, _ = self._entries[best]
            for dst, src in zip(cache.keys + cache.values, keys + values, strict=True):
                dst[row, :, :reuse] = src[:, :reuse]
            self.stats.hits += 1
            self.stats.reused_tokens += reuse
            return reuse

    def save(self, ids: list[int], cache, row: int, *, copy: bool = True) -> None:
        """Keep the first `len(ids)` positions of `row` (the KV of `ids`).

        An entry that is a prefix of `ids` is replaced (the new one serves every prompt it
        served); an entry that already extends `ids` makes this one redundant. When `ids` alone
        would exceed `max_bytes`, its first positions that fit are kept.

        Args:
            ids: the ids whose keys and values the row holds, from position 0.
            cache: the `KVCache` holding the row.
            row: the batch row.
            copy: False allows keeping `cache`'s buffers instead of a copy: only for a cache
                nothing writes again (a finished call's own). They are kept when `ids` fills
                them to within `KEEP_SLACK` positions, and count whole: numpy backs arrays of
                4 MiB and more with huge pages, so untouched capacity next to used positions is
                resident too (measured: 16 positions written in a 224 MiB cache made 121 MiB
                resident). A buffer with more unused capacity is copied instead.
        """
        per_position = sum(a.shape[1] * a.shape[3] * a.itemsize for a in cache.keys + cache.values)
        capacity = cache.keys[0].shape[2]
        n = min(len(ids), self.max_bytes // max(1, per_position))
        key = tuple(ids[:n])
        if n < self.min_tokens:
            return
        keep = not copy and n == len(ids) and capacity - n <= KEEP_SLACK
        size = (capacity if keep else n) * per_position
        if size > self.max_bytes:
            keep, size = False, n * per_position
        with self._lock:
            for old in list(self._entries):
                if _common_prefix(old, key) == len(key):
                    self._entries.move_to_end(old)
                    return
                if _common_prefix(old, key) == len(old):
                    self._drop(old)
            keys = [_positions(a[row], n, keep) for a in cache.keys]
            values = [_positions(a[row], n, keep) for a in cache.values]
            while self._entries and self.nbytes + size > self.max_bytes:
                self._drop(next(iter(self._entries)))
            self._entries[key] = (keys, values, size)
            self.nbytes += size

    def clear(self) -> None:
        """Drop every entry (the stats stay)."""
        with self._lock:
            self._entries.clear()
            self.nbytes = 0

    def _drop(self, key: tuple[int, ...]) -> None:
        self.nbytes -= self._entries.pop(key)[2]


class PrefixLease:
    """The `CacheStore` of one `Generator` call (one prompt, dynamic engine) over a `PrefixCache`.

    `take_cache` hands the engine a fresh cache, sized as the engine sizes a request's, holding
    the longest cached prefix of the prompt; `keep_cache` saves the call's prompt and output
    once it ends (a call that fails or is abandoned saves nothing).

    With a chat session (`inner`), the session's own cache comes first: the prefix cache is
    read only when the session has nothing reusable (its first turn, after a reset), and only
    such a turn is saved (copied, since the session writes on into it). Later turns live in the
    session's cache; saving them too would copy a growing conversation every turn.

    Args:
        prefix: the generator's `PrefixCache`.
        engine: a `DynamicEngine` (`new_cache`, `artifact`, `max_length`).
        max_new_tokens: the call's max_new_tokens (sizes the cache).
        inner: the call's own cache store (a `ChatSession`), or None.

    Attributes:
        reused: prompt positions this call took from the prefix cache.
    """

    def __init__(self, prefix: PrefixCache, engine, max_new_tokens: int, inner=None):
        self.prefix, self.engine, self.max_new_tokens = prefix, engine, max_new_tokens
        self.inner = inner
        self.reused = 0
        self._from_inner = False

    def take_cache(self, prompt_ids: list[int]) -> tuple[object, int]:
        """(cache, reusable prefix length): the session's, else a new one (0 on a miss)."""
        if self.inner is not None:
            cache, reuse = self.inner.take_cache(prompt_ids)
            if cache is not None:
                self._from_inner = True
                return cache, reuse
        capacity = plan_capacity(
            len(prompt_ids) + self.max_new_tokens,
            context_length=self.engine.artifact.context_length,
            max_length=self.engine.max_length,
        )
        cache = self.engine.new_cache(1, capacity)
        self.reused = self.prefix.load(prompt_ids, cache, 0)
        return cache, self.reused

    def keep_cache(self, cache, ids: list[int]) -> None:
        """Give the session its cache back; save `ids`' positions unless they are the session's."""
        if self.inner is not None:
            self.inner.keep_cache(cache, ids)
            if not self._from_inner:
                self.prefix.save(ids, cache, 0, copy=True)
        else:
            self.prefix.save(ids, cache, 0, copy=False)


def open_prefix_cache(
    max_bytes: int | None, graph_variant: str, *, continues_prefill: bool
) -> PrefixCache | None:
    """The prefix cache of a `Generator` (`prefix_cache_bytes`), or None when it has none.

    Raises:
        ValueError: `max_bytes` is not an int >= 0 or None.
        GeneratorError: a size was asked for a static artifact.
    """
    if max_bytes is not None and (
        isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0
    ):
        raise ValueError(f"prefix_cache_bytes must be an int >= 0 or None, got {max_bytes!r}")
    if graph_variant != "dynamic":
        if max_bytes:
            raise GeneratorError(
                "prefix_cache_bytes: static artifacts keep no prefix cache (their KV is a "
                "fixed-capacity buffer per request); pass 0 or None"
            )
        return None
    if max_bytes == 0 or not continues_prefill:
        return None  # a one-call-prefill provider cannot continue after cached positions
    # Two prompt tokens stay to prefill: a one-token call takes onnxruntime's M = 1 kernels,
    # whose int4 logits differ from a prefill's (benchmarks/results/speculative.json: plain
    # and verify-step greedy outputs part after 7-12 tokens on the Qwen2.5-0.5B shape).
    return PrefixCache(PREFIX_CACHE_BYTES if max_bytes is None else max_bytes, min_suffix=2)


def _positions(array: np.ndarray, n: int, keep: bool) -> np.ndarray:
    """The first `n` positions of one row's [kv_heads, capacity, head_dim] buffer: a view of it
    (`keep`) or a copy."""
    view = array[:, :n]
    return view if keep else np.array(view)


def _common_prefix(a, b) -> int:
    """Length of the common prefix of two id sequences."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    x = np.asarray(a[:n], dtype=np.int64)
    y = np.asarray(b[:n], dtype=np.int64)
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if diff.size else n
