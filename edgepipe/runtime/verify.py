"""Checking an artifact's files against `manifest.json`, hashing each file once.

A full sha256 of `model.onnx.data` costs about a second per GB: too much for every load, yet
skipping it lets a flipped byte print garbage with exit code 0. So each file is hashed once and
the fact is remembered in the user cache (`verified/` under `user_cache_dir()`) as its
(path, size, mtime_ns, inode, sha256). A later load re-hashes a file only when its size, mtime
or inode changed, which any ordinary write, copy or download does. A record whose stat matches
but whose sha256 is not the manifest's (the manifest was edited) is hashed again too.

What this does not catch: a write that restores the old mtime on purpose (`touch -d`); pass
`verify` a fresh cache, or delete the cache folder, to force every hash.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from edgepipe.runtime.errors import ArtifactError

# What `Artifact.verification` says.
VERIFIED = "verified"
SKIPPED = "not verified (verification turned off)"
UNVERIFIABLE = (
    "unverifiable: no manifest.json, so no checksums to compare with (a bare export folder, or "
    "a copy that lost its manifest)"
)


def user_cache_dir() -> Path:
    """edgepipe's user cache: `$EDGEPIPE_CACHE`, else `$XDG_CACHE_HOME/edgepipe`, else
    `~/.cache/edgepipe` (the base the tokenizer and stage caches use too)."""
    if os.environ.get("EDGEPIPE_CACHE"):
        return Path(os.environ["EDGEPIPE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "edgepipe"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (model data can be gigabytes)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _stat_key(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "inode": st.st_ino}  # fmt: skip


def _record_path(cache: Path, path: Path) -> Path:
    name = hashlib.sha256(str(path.resolve()).encode("utf-8", "surrogatepass")).hexdigest()
    return cache / "verified" / f"{name[:40]}.json"


def _remembered(cache: Path, path: Path, key: dict, expected: str) -> bool:
    try:
        record = json.loads(_record_path(cache, path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return record == {**key, "sha256": expected}


def _remember(cache: Path, path: Path, key: dict, digest: str) -> None:
    # Written beside its place and renamed in, so concurrent loads never read half a record. A
    # cache we cannot write (read-only home, full disk) only costs the next load a hash.
    record = _record_path(cache, path)
    tmp = record.with_name(f"{record.name}.{os.getpid()}.tmp")
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({**key, "sha256": digest}), encoding="utf-8")
        os.replace(tmp, record)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def verify_files(folder: Path, files: dict[str, str], *, cache: Path | None = None) -> int:
    """Check every `relative path -> sha256` entry of a manifest, hashing only changed files.

    Args:
        folder: the artifact folder.
        files: the manifest's `files` map.
        cache: the user cache folder (default `user_cache_dir()`).

    Returns:
        How many files were hashed (the others matched a remembered verification).

    Raises:
        ArtifactError: naming the first file that is missing or whose sha256 differs.
    """
    cache = user_cache_dir() if cache is None else cache
    hashed = 0
    for rel, expected in sorted(files.items()):
        path = folder / rel
        if not path.is_file():
            raise ArtifactError(path, "listed in manifest.json but missing; re-copy the artifact")
        key = _stat_key(path)
        if _remembered(cache, path, key, expected):
            continue
        actual = sha256_file(path)
        hashed += 1
        if actual != expected:
            raise ArtifactError(
                path,
                f"sha256 {actual} != {expected} in manifest.json; the file is corrupt: re-copy "
                "or rebuild the artifact (--no-verify / verify=False runs it anyway)",
            )
        _remember(cache, path, key, actual)
    return hashed
