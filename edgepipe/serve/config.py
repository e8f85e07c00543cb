"""The server's settings, one dataclass shared by the CLI, the app and the tests."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ServeConfig:
    """How `edgepipe serve` runs.

    Attributes:
        artifact: the artifact folder to serve.
        model_name: the id clients pass as `model` (default: the artifact folder's name).
        host, port: where to listen (loopback by default: a device server is not a public one).
        api_keys: key name -> key; empty means no authentication.
        parallel: KV slots decoded together (continuous batching width).
        max_queue: requests waiting for a slot at most; beyond it, 503.
        max_length: KV positions per slot (prompt + generated); None: min(context, 4096).
        max_body_bytes: larger request bodies get 413.
        max_prompt_tokens: longer prompts get 400 (None: what a slot holds).
        max_tokens: the largest `max_tokens` a request may ask (and the default).
        request_timeout_s: a request running longer is cancelled (504).
        requests_per_minute, tokens_per_minute: per-key allowances per `rate_window_s`
            (None: unlimited); named per minute, as OpenAI's limits are.
        rate_window_s: the buckets' window (60; tests shorten it).
        prefix_cache_bytes: memory for reusable prompt prefixes (0: off).
        prefill_budget: prompt tokens fed between two decode steps (at least one chunk): lower
            keeps streams flowing while long prompts arrive, higher gets first tokens sooner.
        threads: onnxruntime intra-op threads (None: its default).
        provider: execution provider (None: the artifact's).
        shutdown_grace_s: on SIGTERM/SIGINT, time in-flight requests get to finish.
        speculative: "ngram": speculate on every greedy, unconstrained request that does not
            say `speculative` itself (the others decode plainly); None: only on request.
    """

    artifact: Path
    model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: dict[str, str] = field(default_factory=dict)
    parallel: int = 4
    max_queue: int = 16
    max_length: int | None = None
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int | None = None
    max_tokens: int = 1024
    request_timeout_s: float = 600.0
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    rate_window_s: float = 60.0
    prefix_cache_bytes: int = 256 << 20
    prefill_budget: int = 256
    threads: int | None = None
    provider: str | None = None
    shutdown_grace_s: float = 30.0
    speculative: str | None = None

    @property
    def served_name(self) -> str:
        return self.model_name or Path(self.artifact).resolve().name


def read_api_keys(path: Path) -> dict[str, str]:
    """Keys from a file: one per line, `name:key` or a bare key (named key-1, key-2, ...).

    Blank lines and lines starting with `#` are skipped. The keys are never logged; the names
    are, so give each client its own.

    Raises:
        ValueError: the file holds no key, or a name twice.
    """
    keys: dict[str, str] = {}
    for number, raw in enumerate(Path(path).read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, key = line.partition(":")
        if not sep:
            name, key = f"key-{len(keys) + 1}", line
        name, key = name.strip(), key.strip()
        if not key or name in keys:
            raise ValueError(f"{path}:{number}: empty key or duplicate name {name!r}")
        keys[name] = key
    if not keys:
        raise ValueError(f"{path}: no API key in the file")
    return keys
