"""KV cache sizing and growth."""

from __future__ import annotations

import numpy as np
import pytest

from edgepipe.runtime.engines.kv import ROUND, KVCache, plan_capacity


def test_capacity_is_the_request_rounded_up_not_the_context():
    assert plan_capacity(128, context_length=40960) == 128
    assert plan_capacity(129, context_length=40960) == 128 + ROUND
    assert plan_capacity(5, context_length=40960) == ROUND


def test_capacity_is_capped_by_context_and_max_length():
    assert plan_capacity(1000, context_length=512) == 512
    assert plan_capacity(1000, context_length=40960, max_length=300) == 300
    assert plan_capacity(100, context_length=40960, max_length=300) == 128


def test_buffers_have_the_gqa_layout_and_report_their_bytes():
    cache = KVCache(3, 2, 16, batch=2, capacity=64, dtype=np.float16)
    assert cache.keys[0].shape == (2, 2, 64, 16)
    assert cache.keys[0].dtype == np.float16
    assert cache.nbytes == 3 * 2 * (2 * 2 * 64 * 16 * 2)


def test_growth_keeps_the_used_positions():
    cache = KVCache(2, 1, 16, batch=1, capacity=32)
    for i, array in enumerate(cache.keys + cache.values):
        array[:] = np.arange(array.size, dtype=np.float32).reshape(array.shape) + i
    before = [a[:, :, :20].copy() for a in cache.keys + cache.values]
    assert cache.ensure(40, used=20, limit=1000)
    assert cache.capacity == 64
    for old, new in zip(before, cache.keys + cache.values, strict=True):
        np.testing.assert_array_equal(new[:, :, :20], old)
        assert not new[:, :, 20:].any()
    assert not cache.ensure(50, used=40, limit=1000)


def test_growth_beyond_the_limit_is_refused():
    cache = KVCache(1, 1, 16, batch=1, capacity=32)
    with pytest.raises(ValueError, match="above the limit of 48"):
        cache.ensure(49, used=10, limit=48)


def test_ortvalues_share_memory_with_the_buffers_including_row_views():
    cache = KVCache(1, 1, 16, batch=3, capacity=32)
    keys, _ = cache.ortvalues()
    row_keys, _ = cache.ortvalues(row=1)
    cache.keys[0][1, 0, 0, 0] = 42.0
    assert keys[0].numpy()[1, 0, 0, 0] == 42.0
    assert row_keys[0].shape() == [1, 1, 32, 16]
    assert row_keys[0].numpy()[0, 0, 0, 0] == 42.0
