"""The KV cache: one buffer per layer and per key/value, shared by past and present.

onnxruntime's `GroupQueryAttention` can update the cache in place when the same tensor is bound
as `past_key_values.i.*` and `present.i.*` (`past_present_share_buffer`): the buffer has a fixed
capacity `[batch, kv_heads, capacity, head_dim]` and row b's new keys are written at positions
`seqlens_k[b] - new + 1 ...`. The runtime allocates the capacity the request needs (prompt +
max_new_tokens, rounded up to `ROUND`), not the whole context window, and grows it by copying
into a larger buffer when a chat continues past it.

The buffers are numpy arrays wrapped by `OrtValue.ortvalue_from_numpy`, which on CPU shares the
array's memory (checked by a test): onnxruntime writes straight into them, and a row of a batch
buffer (`array[i:i+1]`, contiguous) can be bound on its own to prefill one prompt.
"""

from __future__ import annotations

import math
import mmap

import numpy as np

# Buffers at least this large are mapped without transparent huge pages (`lazy_zeros`).
HUGE_PAGE_BYTES = 2 * 2**20
# Capacity granularity in tokens: a little slack so a chat turn or two of a few tokens does not
# force a copy, small enough that a 64-token request stays near 64 tokens of memory.
ROUND = 32


def position_limit(context_length: int, max_length: int | None = None) -> int:
    """KV positions a row may use: the context window, or `max_length` when smaller.

    Args:
        context_length: the model's context window.
        max_length: the caller's memory cap in tokens, or None.
    """
    return context_length if max_length is None else min(max_length, context_length)


def plan_capacity(needed: int, *, context_length: int, max_length: int | None = None) -> int:
    """Capacity for a request needing `needed` positions: rounded up, capped by limits.

    Args:
        needed: prompt length + max_new_tokens (the longest row, for batches).
        context_length: the model's context window.
        max_length: the caller's memory cap in tokens, or None.
    """
    limit = position_limit(context_length, max_length)
    rounded = -(-needed // ROUND) * ROUND
    return max(1, min(rounded, limit))


def lazy_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A zeroed array whose pages become resident only when written, 4 KiB at a time.

    `np.zeros` maps fresh pages lazily too, but numpy asks the kernel for transparent huge pages
    on arrays of 4 MiB and more (madvise(MADV_HUGEPAGE)), so the first write near a position
    makes 2 MiB resident: writing 16 positions of a 224 MiB cache measured 121 MiB of RSS. A
    KV buffer is written a few positions per row and head at a time, so large ones are anonymous
    mappings advised MADV_NOHUGEPAGE instead (Linux; elsewhere `np.zeros`).
    """
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    advice = getattr(mmap, "MADV_NOHUGEPAGE", None)
    if nbytes < HUGE_PAGE_BYTES or advice is None:
        return np.zeros(shape, dtype)
    buffer = mmap.mmap(-1, nbytes)  # anonymous: zero-filled by the kernel, mapped on first write
    buffer.madvise(advice)
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


class KVCache:
    """Per-layer key and value buffers of shape [batch, kv_heads, capacity, head_dim].

    Args:
        num_layers, num_kv_heads, head_dim: cache geometry.
        batch: rows.
        capacity: positions per row.
        dtype: numpy dtype of the decoder's KV inputs (float32 or float16).
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        batch: int,
        capacity: int,
        dtype=np.float32,
    ):
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.batch = batch
        self.dtype = np.dtype(dtype)
        self.capacity = 0
        self.keys: list[np.ndarray] = []
        self.values: list[np.ndarray] = []
        self._allocate(capacity, keep=0)

    @property
    def nbytes(self) -> int:
        """Bytes held by all buffers."""
        return sum(a.nbytes for a in self.keys) + sum(a.nbytes for a in self.values)

    def _allocate(self, capacity: int, keep: int) -> None:
        shape = (self.batch, self.num_kv_heads, capacity, self.head_dim)
        # Untouched capacity costs no resident memory (`lazy_zeros`).
        new_keys = [lazy_zeros(shape, self.dtype) for _ in range(self.num_layers)]
        new_values = [lazy_zeros(shape, self.dtype) for _ in range(self.num_layers)]
        if keep:
            for old, new in zip(self.keys + self.values, new_keys + new_values, strict=True):
                new[:, :, :keep] = old[:, :, :keep]
        self.keys, self.values, self.capacity = new_keys, new_values, capacity

    def ensure(self, needed: int, *, used: int, limit: int) -> bool:
        """Grow to hold `needed` positions, copying the first `used` ones; True if it grew.

        Raises:
            ValueError: `needed` exceeds `limit` (the context or `max_length` cap).
        """
        if needed <= self.capacity:
            return False
        if needed > limit:
            raise ValueError(f"KV cache needs {needed} positions, above the limit of {limit}")
        rounded = -(-needed // ROUND) * ROUND
        self._allocate(min(rounded, limit), keep=used)
        return True

    def ortvalues(self, row: int | None = None):
        """(key OrtValues, value OrtValues) for the whole batch, or for one row."""
        from onnxruntime import OrtValue

        def wrap(array: np.ndarray):
            view = array if row is None else array[row : row + 1]
            return OrtValue.ortvalue_from_numpy(view)

        return [wrap(a) for a in self.keys], [wrap(a) for a in self.values]
