"""API keys and per-key token buckets (requests per minute, tokens per minute).

A bucket holds up to one minute's allowance and refills continuously, so a client may burst
its whole minute at once and then gets `429` with a `Retry-After` telling when enough has
refilled. Token limits charge the prompt when a request is admitted and the generated tokens
when it ends, so a long answer is paid for by the key's next requests.
"""

from __future__ import annotations

import hmac
import threading
import time

from edgepipe.serve.errors import rate_limited, unauthorized

ANONYMOUS = "anonymous"


class KeyRing:
    """Checks `Authorization: Bearer <key>` against the configured keys.

    Args:
        keys: name -> key; empty means every request is allowed (as `ANONYMOUS`).
    """

    def __init__(self, keys: dict[str, str]):
        self._keys = [(name, key.encode()) for name, key in keys.items()]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def identify(self, authorization: str | None) -> str:
        """The key's name for an Authorization header.

        Every configured key is compared, with `hmac.compare_digest`, whatever matched before:
        the time taken says nothing about which key or how much of it was right.

        Raises:
            APIError: 401 when keys are configured and the header carries none of them.
        """
        if not self._keys:
            return ANONYMOUS
        scheme, _, given = (authorization or "").partition(" ")
        offered = given.strip().encode() if scheme.lower() == "bearer" else b""
        found = None
        for name, key in self._keys:
            if hmac.compare_digest(offered, key) and found is None:
                found = name
        if found is None:
            raise unauthorized()
        return found


class TokenBucket:
    """A bucket of `size` units refilling continuously over `window` seconds (thread-safe).

    Args:
        size: allowance per window; also the bucket's size.
        window: seconds for an empty bucket to fill.
        clock: time source (tests pass a fake one).
    """

    def __init__(self, size: float, window: float = 60.0, clock=time.monotonic):
        self.rate = size / window
        self.size = float(size)
        self.level = float(size)
        self._clock = clock
        self._at = clock()
        self._lock = threading.Lock()

    def _refill(self) -> None:
        now = self._clock()
        self.level = min(self.size, self.level + (now - self._at) * self.rate)
        self._at = now

    def take(self, amount: float) -> float:
        """Take `amount` if the bucket holds it; else return seconds until it will (0 = taken).

        An amount above the bucket's size is capped at the size, so one large request is
        possible when the bucket is full instead of never.
        """
        with self._lock:
            self._refill()
            need = min(amount, self.size)
            if self.level >= need:
                self.level -= amount
                return 0.0
            return (need - self.level) / self.rate

    def charge(self, amount: float) -> None:
        """Take `amount` unconditionally (the level may go below zero)."""
        with self._lock:
            self._refill()
            self.level -= amount


class RateLimits:
    """Per-key buckets on requests and on tokens.

    Args:
        requests_per_minute, tokens_per_minute: the allowances per window (None: unlimited).
        window: the window in seconds.
        clock: time source.
    """

    def __init__(
        self, requests_per_minute=None, tokens_per_minute=None, window=60.0, clock=time.monotonic
    ):
        self.rpm, self.tpm, self.window = requests_per_minute, tokens_per_minute, window
        self._clock = clock
        self._requests: dict[str, TokenBucket] = {}
        self._tokens: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()

    def _bucket(self, table: dict, key: str, per_minute: float) -> TokenBucket:
        with self._lock:
            bucket = table.get(key)
            if bucket is None:
                bucket = table[key] = TokenBucket(per_minute, self.window, self._clock)
            return bucket

    def admit_request(self, key: str) -> None:
        """Count one request for `key`.

        Raises:
            APIError: 429 with Retry-After when the key's request bucket is empty.
        """
        if self.rpm is None:
            return
        wait = self._bucket(self._requests, key, self.rpm).take(1)
        if wait:
            raise rate_limited(f"requests per minute ({self.rpm:g}) on key '{key}'", wait)

    def admit_tokens(self, key: str, prompt_tokens: int) -> None:
        """Charge `prompt_tokens` for `key`.

        Raises:
            APIError: 429 with Retry-After when the key's token bucket cannot pay for them.
        """
        if self.tpm is None:
            return
        wait = self._bucket(self._tokens, key, self.tpm).take(prompt_tokens)
        if wait:
            raise rate_limited(f"tokens per minute ({self.tpm:g}) on key '{key}'", wait)

    def charge_generated(self, key: str, tokens: int) -> None:
        """Charge the tokens a finished request generated."""
        if self.tpm is not None and tokens:
            self._bucket(self._tokens, key, self.tpm).charge(tokens)
