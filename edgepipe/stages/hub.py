"""The Hugging Face hub as a source: `huggingface_hub.snapshot_download` at a pinned revision.

Used by the model source (`edgepipe.stages.source`) and the adapter (`edgepipe.stages.adapter`),
so both fetch, and fail, the same way. Only the files matching the caller's patterns are
fetched; `HF_HUB_OFFLINE=1` and the Hugging Face cache (`HF_HOME`) let CI pre-fill the cache
and build offline (`edgepipe.stages.modelscope` is the same contract on ModelScope).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from edgepipe.errors import BuildFailed, require


def hub_download(
    repo_id: str,
    revision: str | None,
    patterns: Sequence[str],
    *,
    field: str = "source.hub",
    progress: Callable[[str], None] | None = None,
) -> Path:
    """The local snapshot folder of `repo_id@revision` (only files matching `patterns`).

    Args:
        repo_id: `owner/name` on huggingface.co, e.g. `Qwen/Qwen2.5-0.5B-Instruct`.
        revision: the pinned commit sha or tag (None: the default branch).
        patterns: glob patterns of the files to fetch.
        field: the recipe field named in errors.
        progress: called with a short status line (the hub shows its own bars).

    Raises:
        MissingDependency: `huggingface_hub` is not installed (the message has the pip command).
        BuildFailed: the network, the id or the revision failed, or offline with a cache miss.
    """
    hub = require("huggingface_hub", "build")
    if progress:
        progress(f"downloading {repo_id}@{(revision or 'main')[:12]}")
    try:
        path = hub.snapshot_download(
            repo_id=repo_id, revision=revision, allow_patterns=list(patterns)
        )
    except Exception as exc:  # network, auth, offline-cache-miss: all end the build the same way
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = (
            "HF_HUB_OFFLINE is set and the revision is not in the Hugging Face cache; "
            "run once online or unset HF_HUB_OFFLINE"
            if offline
            else "check the network, the repository id and the pinned revision"
        )
        raise BuildFailed(f"{field}: could not fetch {repo_id}@{revision}: {exc} ({hint})") from exc
    return Path(path)
