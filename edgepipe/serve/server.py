"""Running the app with uvicorn, with a shutdown that lets in-flight requests finish.

On SIGTERM or SIGINT uvicorn stops accepting connections, waits up to `shutdown_grace_s` for
the open ones (streams included) to finish, cancels the rest, runs the app's shutdown (the
scheduler stops) and returns. uvicorn then re-raises the signal so the process dies *by* it
(exit status 128+n); a service manager reading that as a crash would restart a server that
stopped as asked, so `GracefulServer` keeps uvicorn's handlers and drops the re-raise: a
requested stop exits 0.
"""

from __future__ import annotations

import contextlib
import signal
import threading

import uvicorn

from edgepipe.serve.app import create_app
from edgepipe.serve.config import ServeConfig


class GracefulServer(uvicorn.Server):
    """uvicorn's server, minus the signal re-raised after a graceful stop."""

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        signals = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def uvicorn_config(config: ServeConfig, app=None, **overrides) -> uvicorn.Config:
    """uvicorn settings for `config` (the app built from it unless given)."""
    settings = {
        "host": config.host,
        "port": config.port,
        "log_level": "warning",
        "access_log": False,  # edgepipe.serve.logs writes one JSON line per request instead
        "timeout_graceful_shutdown": config.shutdown_grace_s,
        "lifespan": "on",
    }
    settings.update(overrides)
    return uvicorn.Config(app or create_app(config), **settings)


def serve(config: ServeConfig) -> int:
    """Serve until SIGTERM/SIGINT; return the exit code (0 after a graceful stop)."""
    server = GracefulServer(uvicorn_config(config))
    server.run()
    return 0 if server.started else 1
