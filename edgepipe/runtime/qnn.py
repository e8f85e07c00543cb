"""Sessions on the QNN execution provider (Qualcomm HTP), from onnxruntime-qnn's plug-in library.

onnxruntime-qnn 2.x is a plug-in execution provider: its library is registered with
`onnxruntime.register_execution_provider_library` and the provider is chosen for a session with
`SessionOptions.add_provider_for_devices`; the classic `providers=["QNNExecutionProvider"]`
list does not reach it. On x86-64 Linux the same wheel's HTP backend runs in simulation, so a
session with `session.disable_cpu_ep_fallback=1` proves that the HTP accepts every node.

Imports onnxruntime (and onnxruntime_qnn when asked for) only.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator, Mapping

from edgepipe.runtime.errors import ProviderUnavailable
from edgepipe.runtime.providers import QNN_PROVIDER, install_package

_lock = threading.Lock()
_registered = False


def qnn_available() -> bool:
    """True when the QNN provider can be used here (onnxruntime-qnn importable and registered)."""
    try:
        _register()
    except ProviderUnavailable:
        return False
    return True


def _register() -> None:
    global _registered
    with _lock:
        if _registered:
            return
        try:
            import onnxruntime_qnn
        except ImportError as exc:
            raise ProviderUnavailable(
                f"execution provider {QNN_PROVIDER} is not installed; install it with: "
                f"pip install {install_package(QNN_PROVIDER)}"
            ) from exc
        import onnxruntime as ort

        if not any(d.ep_name == QNN_PROVIDER for d in ort.get_ep_devices()):
            ort.register_execution_provider_library(
                QNN_PROVIDER, onnxruntime_qnn.get_library_path()
            )
        _registered = True


def qnn_session_options(
    provider_options: Mapping[str, str] | None = None,
    *,
    session_options=None,
    config: Mapping[str, str] | None = None,
    cpu_fallback: bool = False,
):
    """`SessionOptions` that place the model on the QNN provider.

    Args:
        provider_options: QNN provider options (backend_type, soc_model, htp_arch, ...).
        session_options: options to extend (default: new ones).
        config: extra session config entries (`ep.context_enable`, `ep.share_ep_contexts`, ...).
        cpu_fallback: allow nodes the HTP rejects to run on CPU (False: refusing is an error,
            which is how a build proves full placement).

    Raises:
        ProviderUnavailable: onnxruntime-qnn is not installed (the message has the pip command).
    """
    import onnxruntime as ort

    _register()
    options = session_options
    if options is None:
        options = ort.SessionOptions()
        # ERROR and above: the plug-in warns on every session about features that only exist
        # on Windows on Arm (file-mapped weights, EPContext encryption), which is noise here.
        options.log_severity_level = 3
    if not cpu_fallback:
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, str(value))
    devices = [d for d in ort.get_ep_devices() if d.ep_name == QNN_PROVIDER]
    qnn = {k: str(v) for k, v in (provider_options or {}).items()}
    if "backend_type" not in qnn and "backend_path" not in qnn:
        qnn["backend_type"] = "htp"  # the plug-in finds no backend on its own
    options.add_provider_for_devices(devices, qnn)
    return options


def qnn_session(path, provider_options=None, **kwargs):
    """An `InferenceSession` of `path` on the QNN provider (see `qnn_session_options`)."""
    import onnxruntime as ort

    options = qnn_session_options(provider_options, **kwargs)
    with _native_stdout_to_stderr():
        return ort.InferenceSession(str(path), sess_options=options)


@contextlib.contextmanager
def _native_stdout_to_stderr() -> Iterator[None]:
    """Send what native code writes to stdout to stderr instead.

    The HTP library prints a `# LIBNATIVE: ...` banner to the process's stdout (file
    descriptor 1) when the first session loads it, which would corrupt machine-readable output
    such as `edgepipe build --json` or an app's own stdout protocol.
    """
    try:
        stdout_fd = sys.stdout.fileno()
        stderr_fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # no real file descriptors (captured streams)
        yield
        return
    sys.stdout.flush()
    saved = os.dup(stdout_fd)
    try:
        os.dup2(stderr_fd, stdout_fd)
        yield
    finally:
        os.dup2(saved, stdout_fd)
        os.close(saved)
