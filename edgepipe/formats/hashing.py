"""Content hashes: of files, of folders, and of JSON-able values (stage cache keys, manifests)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (model data can be gigabytes)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hash_tree(folder: Path, *, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """`relative posix path -> sha256` for every regular file under `folder`, sorted."""
    folder = Path(folder)
    out: dict[str, str] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel not in exclude:
            out[rel] = sha256_file(path)
    return out


def canonical_json(value) -> bytes:
    """Stable bytes for hashing: sorted keys, no whitespace, non-JSON values via `str`."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()


def content_hash(value) -> str:
    """sha256 of `canonical_json(value)`."""
    return hashlib.sha256(canonical_json(value)).hexdigest()
