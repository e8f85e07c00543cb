"""Structured request logs: one JSON line per request on the `edgepipe.serve.requests` logger.

Fields: id, time, endpoint, key (the key's *name*; keys themselves are never logged), status,
prompt/cached/completion tokens, finish reason, queue, first-token and total seconds, and the
error message of a failed request. `edgepipe serve` sends the logger to stderr.
"""

from __future__ import annotations

import json
import logging
import sys
import time

LOGGER = logging.getLogger("edgepipe.serve.requests")


def log_request(**fields) -> None:
    """Write one request's line (fields that are None are left out)."""
    line = {"time": round(time.time(), 3)}
    line.update({k: v for k, v in fields.items() if v is not None})
    LOGGER.info(json.dumps(line, separators=(",", ":")))


def to_stderr(level: int = logging.INFO) -> None:
    """Send request lines to stderr, bare (each line is the JSON object)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    LOGGER.addHandler(handler)
    LOGGER.setLevel(level)
    LOGGER.propagate = False
