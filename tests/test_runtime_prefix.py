"""PrefixCache: longest-prefix lookup, replacement of shorter entries, and its byte budget."""

from __future__ import annotations

import numpy as np

from edgepipe.runtime.engines.kv import KVCache
from edgepipe.runtime.prefix import PrefixCache


def cache_with(values: float, batch: int = 2, capacity: int = 16) -> KVCache:
    kv = KVCache(2, 1, 4, batch=batch, capacity=capacity)
    for array in kv.keys + kv.values:
        array[:] = values
    return kv


def test_load_copies_the_longest_common_prefix_and_keeps_one_token_to_feed():
    prefix = PrefixCache(1 << 20, min_tokens=2)
    source = cache_with(1.0)
    source.keys[0][0, :, :, :] = np.arange(16)[None, :, None]
    prefix.save([1, 2, 3, 4, 5], source, row=0)
    target = cache_with(0.0)
    assert prefix.load([1, 2, 3, 9], target, row=1) == 3
    assert np.array_equal(target.keys[0][1, 0, :3, 0], [0, 1, 2])
    assert target.keys[0][1, 0, 3, 0] == 0
    assert prefix.load([1, 2, 3, 4, 5], target, row=1) == 4  # one token left to feed
    assert prefix.load([7, 8, 9], target, row=1) == 0
    assert prefix.stats.lookups == 3 and prefix.stats.hits == 2
    assert prefix.stats.hit_rate == 2 / 3


def test_a_longer_entry_replaces_its_prefix_and_the_budget_evicts_the_oldest():
    kv = cache_with(1.0)
    one_entry = 2 * 2 * 1 * 8 * 4 * 4  # layers x (k, v) x heads x 8 positions x dim x fp32
    prefix = PrefixCache(2 * one_entry, min_tokens=2)
    prefix.save([1, 2, 3, 4], kv, row=0)
    prefix.save([1, 2, 3, 4, 5, 6, 7, 8], kv, row=0)
    assert len(prefix) == 1 and prefix.nbytes == one_entry
    prefix.save([1, 2, 3], kv, row=0)  # already covered: nothing new
    assert len(prefix) == 1
    prefix.save([20, 21, 22, 23, 24, 25, 26, 27], kv, row=0)
    prefix.save([30, 31, 32, 33, 34, 35, 36, 37], kv, row=0)
    assert len(prefix) == 2 and prefix.nbytes <= 2 * one_entry
    assert prefix.load([1, 2, 3, 4, 5], kv, row=1) == 0  # the oldest went first
