"""KV cache sizing and growth."""

from __future__ import annotations

import os
from pathlib import Path

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


def resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").is_file(), reason="needs Linux /proc")
def test_a_few_written_positions_of_a_large_cache_stay_a_few_pages():
    """A server's 8 slots x 4096 positions (the Qwen2.5-0.5B geometry, 768 MiB mapped): writing
    the first position of every row and head makes ~48 x 16 pages resident, not 2 MiB huge
    pages each (674 MiB measured before); the buffers still share memory with their OrtValues."""
    cache = KVCache(24, 2, 64, batch=8, capacity=4096)
    assert cache.nbytes == 768 * 2**20
    before = resident_bytes()
    for array in cache.keys + cache.values:
        array[:, :, 0, :] = 1.0
    grown = resident_bytes() - before
    assert grown < 32 * 2**20, f"{grown / 2**20:.0f} MiB resident after 768 writes"
    keys, _ = cache.ortvalues(row=3)
    cache.keys[5][3, 1, 7, 0] = 9.0
    assert keys[5].numpy()[0, 1, 7, 0] == 9.0
    grown_to = cache.ensure(4200, used=1, limit=8192)
    assert grown_to and (cache.keys[0][:, :, 0] == 1.0).all()
