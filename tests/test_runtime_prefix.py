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


def test_min_suffix_leaves_that_many_prompt_tokens_to_prefill():
    prefix = PrefixCache(1 << 20, min_tokens=2, min_suffix=2)
    prefix.save([1, 2, 3, 4, 5, 6], cache_with(1.0), row=0)
    assert prefix.load([1, 2, 3, 4, 5, 6], cache_with(0.0), row=1) == 4
    assert prefix.load([1, 2, 3, 4, 5, 6, 7, 8], cache_with(0.0), row=1) == 6


def test_save_without_copy_keeps_views_and_with_copy_owns_its_arrays():
    kv = cache_with(1.0, batch=1)
    views, copies = PrefixCache(1 << 20, min_tokens=2), PrefixCache(1 << 20, min_tokens=2)
    views.save([1, 2, 3, 4], kv, row=0, copy=False)
    copies.save([1, 2, 3, 4], kv, row=0)
    kv.keys[0][0, 0, :4, 0] = 7.0  # a write the views see and the copies do not
    for prefix, seen in ((views, 7.0), (copies, 1.0)):
        target = cache_with(0.0)
        assert prefix.load([1, 2, 3, 4, 9], target, row=0) == 4
        assert target.keys[0][0, 0, 0, 0] == seen
    assert views.nbytes == copies.nbytes == 2 * 2 * 1 * 4 * 4 * 4  # 4 positions either way


def test_an_entry_over_the_budget_keeps_its_first_positions_that_fit():
    kv = cache_with(1.0, capacity=64)
    per_position = 2 * 2 * 1 * 4 * 4  # layers x (k, v) x heads x dim x fp32
    prefix = PrefixCache(10 * per_position + 3, min_tokens=2)
    prefix.save(list(range(40)), kv, row=0, copy=False)
    assert len(prefix) == 1 and prefix.nbytes == 10 * per_position
    assert prefix.load(list(range(40)), cache_with(0.0, capacity=64), row=0) == 10


def test_the_byte_budget_is_never_exceeded_and_old_entries_go_first():
    rng = np.random.default_rng(0)
    kv = cache_with(1.0, capacity=64)
    per_position = 2 * 2 * 1 * 4 * 4
    prefix = PrefixCache(50 * per_position, min_tokens=2)
    saved = []
    for i in range(40):
        ids = [1000 + i, *rng.integers(0, 50, int(rng.integers(4, 40))).tolist()]
        prefix.save(ids, kv, row=0, copy=bool(i % 2))
        saved.append(ids)
        assert 0 < prefix.nbytes <= prefix.max_bytes
    assert len(prefix) < 40  # evicted
    assert prefix.load(saved[-1] + [1], cache_with(0.0, capacity=64), row=0) == len(saved[-1])
    assert prefix.load(saved[0] + [1], cache_with(0.0, capacity=64), row=0) == 0
