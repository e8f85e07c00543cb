"""API keys and token buckets (fake clock: no sleeping)."""

from __future__ import annotations

import pytest

from edgepipe.serve.config import read_api_keys
from edgepipe.serve.errors import APIError
from edgepipe.serve.limits import ANONYMOUS, KeyRing, RateLimits, TokenBucket


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_keyring_names_the_key_and_refuses_anything_else():
    ring = KeyRing({"alice": "sk-a", "bob": "sk-b"})
    assert ring.identify("Bearer sk-b") == "bob"
    assert ring.identify("bearer sk-a") == "alice"
    for header in (None, "", "Bearer", "Bearer sk-c", "Basic sk-a", "Bearer sk-a2"):
        with pytest.raises(APIError) as info:
            ring.identify(header)
        assert info.value.status == 401
    assert KeyRing({}).identify(None) == ANONYMOUS


def test_bucket_refills_over_its_window_and_says_how_long_to_wait():
    clock = Clock()
    bucket = TokenBucket(10, window=60, clock=clock)
    assert bucket.take(10) == 0
    assert bucket.take(3) == pytest.approx(18.0)  # 3 units at 10 per minute
    clock.now = 18.0
    assert bucket.take(3) == 0
    assert bucket.take(100) == pytest.approx(60.0)  # capped at the bucket's size


def test_rate_limits_give_429_with_retry_after_per_key():
    clock = Clock()
    limits = RateLimits(requests_per_minute=1, tokens_per_minute=100, window=60, clock=clock)
    limits.admit_request("a")
    limits.admit_request("b")  # each key has its own bucket
    with pytest.raises(APIError) as info:
        limits.admit_request("a")
    assert info.value.status == 429 and info.value.headers["Retry-After"] == "60"
    limits.admit_tokens("a", 40)
    limits.charge_generated("a", 60)
    with pytest.raises(APIError):
        limits.admit_tokens("a", 1)
    clock.now = 60.0
    limits.admit_request("a")
    limits.admit_tokens("a", 90)


def test_key_file_takes_named_and_bare_keys(tmp_path):
    path = tmp_path / "keys.txt"
    path.write_text("# comment\nalice: sk-a\n\nsk-bare\n")
    assert read_api_keys(path) == {"alice": "sk-a", "key-2": "sk-bare"}
    path.write_text("# none\n")
    with pytest.raises(ValueError):
        read_api_keys(path)
