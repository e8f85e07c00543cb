"""Prometheus metrics of one server (`GET /metrics`).

Each server gets its own `CollectorRegistry` rather than prometheus_client's global one, so
several servers in one process (the tests) do not share counters. Process RSS comes from
prometheus_client's `ProcessCollector` (`process_resident_memory_bytes`, read from /proc).
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Seconds: from a few ms (a toy model's step) to a minute (a long prompt on a loaded CPU).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    """The server's counters, gauges and histograms (all thread-safe)."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        self.requests = Counter(
            "edgepipe_requests",
            "Requests by endpoint and HTTP status",
            ["endpoint", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "edgepipe_prompt_tokens", "Prompt tokens of admitted requests", registry=r
        )
        self.generated_tokens = Counter("edgepipe_generated_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram(
            "edgepipe_time_to_first_token_seconds",
            "From admission to the first generated token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "edgepipe_inter_token_latency_seconds",
            "Between consecutive generated tokens of a request",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("edgepipe_queue_depth", "Requests waiting for a slot", registry=r)
        self.active = Gauge("edgepipe_active_requests", "Requests holding a slot", registry=r)
        self.slots = Gauge("edgepipe_slots", "Slots (--parallel)", registry=r)
        self.kv_bytes = Gauge(
            "edgepipe_kv_bytes_in_use", "KV-cache bytes the active requests occupy", registry=r
        )
        self.prefix_bytes = Gauge(
            "edgepipe_prefix_cache_bytes", "Bytes held by the prefix cache", registry=r
        )
        self.prefix_lookups = Gauge(
            "edgepipe_prefix_cache_lookups", "Prompts looked up in the prefix cache", registry=r
        )
        self.prefix_hits = Gauge(
            "edgepipe_prefix_cache_hits", "Prompts that reused a cached prefix", registry=r
        )
        self.prefix_hit_rate = Gauge(
            "edgepipe_prefix_cache_hit_rate", "Hits / lookups of the prefix cache", registry=r
        )
        self.prefix_tokens = Gauge(
            "edgepipe_prefix_cache_reused_tokens", "Prompt tokens not prefilled", registry=r
        )
        # Speculative decoding (serve --speculative, or a request's `speculative`).
        self.drafted_tokens = Counter(
            "edgepipe_speculative_drafted_tokens", "Draft tokens verified", registry=r
        )
        self.accepted_tokens = Counter(
            "edgepipe_speculative_accepted_tokens", "Draft tokens kept", registry=r
        )
        self.verify_calls = Counter(
            "edgepipe_speculative_verify_calls", "Decoder calls that verified drafts", registry=r
        )
        self._draft_seen = (0, 0, 0)
        self.cancelled = Counter(
            "edgepipe_cancelled_requests",
            "Generations cancelled (disconnect, timeout)",
            registry=r,
        )

    def observe_speculation(self, stats) -> None:
        """Count what a `DraftStats` (the batch's running totals) added since the last call."""
        seen = self._draft_seen
        self.drafted_tokens.inc(stats.drafted - seen[0])
        self.accepted_tokens.inc(stats.accepted - seen[1])
        self.verify_calls.inc(stats.verify_calls - seen[2])
        self._draft_seen = (stats.drafted, stats.accepted, stats.verify_calls)

    def observe_prefix(self, stats, nbytes: int) -> None:
        """Copy a `PrefixStats` into the gauges."""
        self.prefix_lookups.set(stats.lookups)
        self.prefix_hits.set(stats.hits)
        self.prefix_hit_rate.set(stats.hit_rate)
        self.prefix_tokens.set(stats.reused_tokens)
        self.prefix_bytes.set(nbytes)

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of the Prometheus text exposition."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
