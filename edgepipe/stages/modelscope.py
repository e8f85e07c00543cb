"""ModelScope as a source: `modelscope.snapshot_download` at a pinned revision.

The same contract as the Hugging Face hub source (`edgepipe.stages.source`): a pinned revision
(a 40-hex commit id or a version tag, checked by the recipe schema), only the files the builder
reads, ModelScope's own cache (`MODELSCOPE_CACHE`, default `~/.cache/modelscope`), and an
offline mode. ModelScope has no offline switch of its own, so edgepipe reads
`MODELSCOPE_OFFLINE=1` (or `HF_HUB_OFFLINE=1`, so one CI setting covers both sources) and then
asks for the cached snapshot only (`local_files_only=True`), which never touches the network.
ModelScope checks each downloaded file's sha256 against the repository's listing (a mismatch
fails the download); as for the hub, the cache key and manifest name the base by id and pinned
revision, and an adapter additionally by the sha256 of its files (`edgepipe.stages.adapter`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from edgepipe.errors import BuildFailed, require

OFFLINE_VARS = ("MODELSCOPE_OFFLINE", "HF_HUB_OFFLINE")


def offline() -> bool:
    """True when `MODELSCOPE_OFFLINE` or `HF_HUB_OFFLINE` is set to something but 0."""
    return any(os.environ.get(v, "") not in ("", "0") for v in OFFLINE_VARS)


def modelscope_download(
    repo_id: str,
    revision: str,
    patterns: Sequence[str],
    *,
    field: str = "source.modelscope",
    progress: Callable[[str], None] | None = None,
) -> Path:
    """The local snapshot folder of `repo_id@revision` (only files matching `patterns`).

    Args:
        repo_id: `owner/name` on modelscope.cn, e.g. `Qwen/Qwen2.5-0.5B-Instruct`.
        revision: the pinned commit id or tag.
        patterns: glob patterns of the files to fetch.
        field: the recipe field named in errors.
        progress: called with a short status line.

    Raises:
        MissingDependency: `modelscope` is not installed (the message has the pip command).
        BuildFailed: the network, the id or the revision failed, or offline with a cache miss.
    """
    hub = require("modelscope", "modelscope")
    is_offline = offline()
    if progress:
        progress(f"{'reading cached' if is_offline else 'downloading'} {repo_id}@{revision[:12]}")
    try:
        path = hub.snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=list(patterns),
            local_files_only=is_offline,
            # Read per call: the SDK resolves the variable once per process otherwise.
            cache_dir=os.environ.get("MODELSCOPE_CACHE") or None,
        )
    except Exception as exc:  # network, auth, offline-cache-miss: all end the build the same way
        hint = (
            "MODELSCOPE_OFFLINE/HF_HUB_OFFLINE is set and the revision is not in the ModelScope "
            "cache (MODELSCOPE_CACHE); run once online or unset it"
            if is_offline
            else "check the network (modelscope.cn reachable?), the id and the pinned revision"
        )
        raise BuildFailed(f"{field}: could not fetch {repo_id}@{revision}: {exc} ({hint})") from exc
    return Path(path)
