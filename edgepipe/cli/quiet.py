"""Process-wide settings of a CLI run: third-party noise off, SIGTERM as an interrupt.

A leaf module (stdlib only), so `edgepipe.cli.main` can use it before any handler runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Iterator

# onnxruntime's quantizer logs this on the root logger for every graph; our graphs come straight
# from our exporter (shapes known), so the advice is not the user's business.
_HINTS = ("Please consider to run pre-processing", "Please consider pre-processing")


class _DropHints(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_HINTS)


def quiet_third_parties(*, verbose: bool) -> None:
    """Silence transformers' and huggingface_hub's progress bars and onnxruntime's
    pre-processing hint, unless `verbose`. Environment variables the user set win."""
    if verbose:
        return
    # Read when transformers / huggingface_hub are first imported, which the handlers do later.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    root = logging.getLogger()
    if not any(isinstance(f, _DropHints) for f in root.filters):
        root.addFilter(_DropHints())


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C inside the block: unwind (temporary folders are removed, nothing
    half-built is published) and exit 130 with "interrupted"."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # not the main thread (an embedding app): leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
