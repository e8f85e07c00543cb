"""Content-addressed stage cache: re-running an unchanged recipe reuses the export result.

An entry is a folder `<root>/<stage>/<key>/` holding the stage's output files and
`entry.json`, which lists the sha256 of every file. The key is the sha256 of everything that
can change the output: the recipe content relevant to the stage, the source identity (hub
revision, folder file hashes, or preset name and seed), the profile fields that matter, and the
versions of edgepipe, onnx, onnx-ir and onnxruntime. Nothing else goes in (not paths, not times),
so two machines with the same inputs share keys.

Entries are verified on every reuse (reading every byte: cheap next to an export); a corrupt or
half-deleted entry is removed, said so on stderr, and reported as a miss, so the stage simply
runs again. Entries are written into a temporary folder beside their final place and renamed in,
so a killed build never leaves an entry that looks complete.

The cache holds at most `max_bytes` (default `DEFAULT_MAX_BYTES`, or `$EDGEPIPE_CACHE_MAX_GB`):
after each store the least recently used entries (by the mtime of their `entry.json`, touched on
every hit) are evicted until it fits. `edgepipe cache ls|prune|clear` shows and trims it.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib.util
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from edgepipe.formats.hashing import content_hash, hash_tree, sha256_file
from edgepipe.process import tool_versions

ENTRY_FILE = "entry.json"
# Bump when the entry layout or key recipe changes, so old entries stop matching.
# 2: every export entry carries the source's config.json (`edgepipe.build.shared.export_step`).
CACHE_FORMAT = 2
# A Qwen3-4B int4 export is ~2.5 GB: the cap keeps one such model and a few small ones.
DEFAULT_MAX_BYTES = 5 * 10**9
TMP_PREFIX = ".tmp-"


def max_cache_bytes() -> int:
    """The size cap: `$EDGEPIPE_CACHE_MAX_GB` (decimal GB, may be fractional), else 5 GB."""
    value = os.environ.get("EDGEPIPE_CACHE_MAX_GB")
    try:
        return int(float(value) * 10**9) if value else DEFAULT_MAX_BYTES
    except ValueError:
        return DEFAULT_MAX_BYTES


@dataclass(frozen=True)
class CacheEntry:
    """One stored stage output: its folder, size and when a build last used it."""

    path: Path
    stage: str
    key: str
    size_bytes: int
    last_used: float


def list_entries(root: Path) -> list[CacheEntry]:
    """Every complete entry under `root`, least recently used first."""
    out = []
    for marker in Path(root).glob(f"*/*/{ENTRY_FILE}"):
        entry = marker.parent
        if entry.name.startswith(TMP_PREFIX):
            continue
        try:
            size = sum(p.stat().st_size for p in entry.rglob("*") if p.is_file())
            used = marker.stat().st_mtime
        except OSError:  # removed meanwhile by another build
            continue
        out.append(CacheEntry(entry, entry.parent.name, entry.name, size, used))
    return sorted(out, key=lambda e: e.last_used)


def evict(root: Path, max_bytes: int, *, keep: tuple[Path, ...] = ()) -> list[CacheEntry]:
    """Remove least recently used entries until the cache holds at most `max_bytes`.

    Also removes temporary folders of stores that died more than an hour ago.

    Returns:
        The entries removed.
    """
    stale = time.time() - 3600
    for tmp in Path(root).glob(f"*/{TMP_PREFIX}*"):
        with contextlib.suppress(OSError):
            if tmp.stat().st_mtime < stale:
                shutil.rmtree(tmp)
    entries = list_entries(root)
    total = sum(e.size_bytes for e in entries)
    removed = []
    for entry in entries:
        if total <= max_bytes:
            break
        if entry.path in keep:
            continue
        with contextlib.suppress(OSError):
            shutil.rmtree(entry.path)
            total -= entry.size_bytes
            removed.append(entry)
    return removed


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def default_cache_root() -> Path:
    """The stage cache folder: `$EDGEPIPE_CACHE/stages`, else `$XDG_CACHE_HOME/edgepipe/stages`,
    else `~/.cache/edgepipe/stages` (the same base the tokenizer cache uses)."""
    if os.environ.get("EDGEPIPE_CACHE"):
        return Path(os.environ["EDGEPIPE_CACHE"]) / "stages"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "edgepipe" / "stages"


def export_modules(roots: tuple[str, ...]) -> list[Path]:
    """Source files of `roots` and of every edgepipe module they import, transitively.

    Read from the import statements (nothing is imported), so adding a module needs no list
    to be kept.

    Args:
        roots: dotted module names, e.g. `("edgepipe.stages.export.dynamic",)`.
    """
    seen: dict[str, Path] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, AttributeError, ValueError):  # `from module import function`
            continue
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            continue
        path = Path(spec.origin)
        seen[name] = path
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                base = node.module if node.level == 0 else None
                if base and base.startswith("edgepipe"):
                    todo.append(base)
                    todo.extend(f"{base}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                todo.extend(a.name for a in node.names if a.name.startswith("edgepipe"))
    return sorted(set(seen.values()))


@functools.cache
def build_code_hash(roots: tuple[str, ...]) -> str:
    """sha256 of the source code of `export_modules(roots)`, once per process: the code a
    process runs is what it imported, even if the files are edited while it runs.

    Part of the export cache keys: the version number does not change while the code does (a
    checkout between releases, a local edit), and a stale export served from the cache would
    be wrong silently, e.g. a preset whose random draw changed.
    """
    package = Path(__file__).resolve().parents[1]  # edgepipe/
    return content_hash(
        {path.relative_to(package).as_posix(): sha256_file(path) for path in export_modules(roots)}
    )


class StageCache:
    """A content-addressed store of stage outputs (folders of files).

    Args:
        root: the cache folder; `default_cache_root()` when None.
        enabled: when False every lookup misses and nothing is stored (`--no-cache`).
        max_bytes: size cap (None: `max_cache_bytes()`); least recently used entries go first.
        report: where one-line notes go (a corrupt entry rebuilt, evictions); default stderr.
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        *,
        enabled: bool = True,
        max_bytes: int | None = None,
        report: Callable[[str], None] = _stderr,
    ):
        self.root = Path(root) if root is not None else default_cache_root()
        self.enabled = enabled
        self.max_bytes = max_cache_bytes() if max_bytes is None else max_bytes
        self.report = report

    def key(self, stage: str, inputs: Mapping) -> str:
        """The cache key of `stage` for `inputs` (plus the tool versions and cache format)."""
        return content_hash(
            {"format": CACHE_FORMAT, "stage": stage, "versions": tool_versions(), "inputs": inputs}
        )

    def entry_dir(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def lookup(self, stage: str, key: str) -> Path | None:
        """The verified entry folder for (`stage`, `key`), or None on a miss.

        A corrupt entry (a file missing, added or changed since it was stored) is deleted and
        counts as a miss.
        """
        if not self.enabled:
            return None
        entry = self.entry_dir(stage, key)
        if not entry.is_dir():
            return None
        if self.verify(entry):
            with contextlib.suppress(OSError):
                os.utime(entry / ENTRY_FILE)  # last used: what eviction goes by
            return entry
        self._remove(entry)
        self.report(f"cache: {stage} entry {key[:12]} was corrupt; removed, rebuilding it")
        return None

    @staticmethod
    def verify(entry: Path) -> bool:
        """True when every file of `entry` matches the sha256 its `entry.json` records."""
        try:
            recorded = json.loads((entry / ENTRY_FILE).read_text(encoding="utf-8"))["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return False
        try:
            actual = hash_tree(entry, exclude=(ENTRY_FILE,))
        except OSError:
            return False
        return actual == recorded

    def store(self, stage: str, key: str, source: Path, *, move: bool = False) -> Path | None:
        """Put a copy of the folder `source` into the cache under (`stage`, `key`).

        Args:
            stage: stage name (a subfolder of the cache).
            key: from `key()`.
            source: the stage's output folder.
            move: move the files instead of copying (the caller no longer needs `source`).

        Returns:
            The entry folder, or None when the cache is disabled or cannot be written (a
            read-only or full cache only costs a rebuild next time, never a failed build).
        """
        if not self.enabled:
            return None
        final = self.entry_dir(stage, key)
        tmp = final.parent / f"{TMP_PREFIX}{key[:16]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            if move:
                shutil.move(str(source), str(tmp))
            else:
                shutil.copytree(source, tmp)
            files = hash_tree(tmp, exclude=(ENTRY_FILE,))
            (tmp / ENTRY_FILE).write_text(
                json.dumps({"stage": stage, "key": key, "files": files}, indent=1) + "\n",
                encoding="utf-8",
            )
            if final.exists():
                # Another build stored the same key first; identical content by construction.
                self._remove(tmp)
                return final if self.verify(final) else None
            os.replace(tmp, final)
        except OSError:
            self._remove(tmp)
            return None
        self._evict(keep=final)
        return final

    def _evict(self, keep: Path) -> None:
        removed = evict(self.root, self.max_bytes, keep=(keep,))
        if removed:
            freed = sum(e.size_bytes for e in removed) / 1e9
            self.report(
                f"cache: evicted {len(removed)} least recently used entries ({freed:.1f} GB) to "
                f"stay under {self.max_bytes / 1e9:g} GB ($EDGEPIPE_CACHE_MAX_GB)"
            )

    def materialize(self, entry: Path, dest: Path) -> None:
        """Copy an entry's files (not `entry.json`) into `dest` (created)."""
        shutil.copytree(entry, dest, ignore=shutil.ignore_patterns(ENTRY_FILE))

    @staticmethod
    def _remove(path: Path) -> None:
        with contextlib.suppress(OSError):
            shutil.rmtree(path)
