"""Atomic publishing of artifacts: temp folders, the two-rename replace, and the sweep.

Each build (one recipe for one profile) runs in a temporary folder inside OUT,
`OUT/.tmp-<recipe>-<profile>-<pid>-<random>/`, and its artifact is renamed to
`OUT/<recipe>/<profile>/` only when every stage passed. An existing artifact is replaced in
two renames (old aside, new in) and then deleted, so a reader sees the old or the new folder,
never a mix. A killed build leaves only its temp folder, which the next build in the same OUT
sweeps (it checks that the owning process is gone first, so parallel builds are safe).
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path

TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"
_OWNED = re.compile(r"-(\d+)-[0-9a-f]{8}$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        import psutil

        return psutil.pid_exists(pid)
    except ImportError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def _owner_gone(path: Path) -> bool:
    match = _OWNED.search(path.name)
    return bool(match) and not _pid_alive(int(match.group(1)))


def sweep(out_dir: Path) -> list[Path]:
    """Remove temp folders of dead builds in `out_dir`; put back an artifact a killed build had
    set aside but not yet replaced.

    Returns:
        The folders removed.
    """
    removed: list[Path] = []
    if not out_dir.is_dir():
        return removed
    for path in sorted(out_dir.glob(f"{TMP_PREFIX}*")):
        if path.is_dir() and _owner_gone(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    for path in sorted(out_dir.glob(f"*/{OLD_PREFIX}*")):
        if not (path.is_dir() and _owner_gone(path)):
            continue
        profile = _OWNED.sub("", path.name[len(OLD_PREFIX) :])
        final = path.parent / profile
        if not final.exists():
            # Killed between its two renames: the aside folder is the last good artifact.
            os.replace(path, final)
        else:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def tag() -> str:
    """`<pid>-<random>`: names a temp folder after the process that owns it."""
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


def publish(built: Path, final: Path) -> None:
    """Move the finished artifact `built` to `final`, replacing an existing one atomically
    (old renamed aside, new renamed in, old deleted)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    aside = None
    if final.exists():
        aside = final.parent / f"{OLD_PREFIX}{final.name}-{tag()}"
        os.replace(final, aside)
    try:
        os.replace(built, final)
    except OSError:
        if aside is not None:
            os.replace(aside, final)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
