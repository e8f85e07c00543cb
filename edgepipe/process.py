"""Facts about the running process that the build report, the manifest and `edgepipe bench`
record: peak memory, and the versions of the packages whose behaviour is baked into outputs."""

from __future__ import annotations

import sys


def peak_rss_bytes() -> int | None:
    """This process's peak resident memory in bytes, or None where the platform cannot tell.

    Returns:
        `getrusage`'s `ru_maxrss` in bytes (it counts KiB on Linux, bytes on macOS), or None on
        Windows, which has no `resource` module: an unknown peak is not reported as 0.
    """
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def tool_versions() -> dict[str, str]:
    """Versions of the packages whose behaviour is baked into stage outputs."""
    from importlib import metadata

    from edgepipe import __version__

    versions = {"edgepipe": __version__}
    for dist in ("onnx", "onnx-ir", "onnxruntime"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "absent"
    return versions
