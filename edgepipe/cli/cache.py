"""`edgepipe cache ls|prune|clear`: the stage cache, shown and trimmed."""

from __future__ import annotations

import sys

from edgepipe.cli.command import add_command


def register(subparsers) -> None:
    """Add the `cache` subcommand."""
    cache = add_command(subparsers, "cache", cache_command)
    cache.add_argument("action", choices=("ls", "prune", "clear"), help="what to do")
    cache.add_argument("--cache-dir", help="stage cache folder (default ~/.cache/edgepipe/stages)")
    cache.add_argument(
        "--max-gb",
        type=float,
        help="prune: the size to trim to (default $EDGEPIPE_CACHE_MAX_GB, else 5)",
    )


def cache_command(args) -> int:
    """Show or trim the stage cache (exports reused by later builds).

    edgepipe cache ls                 entries, least recently used first, and the total
    edgepipe cache prune --max-gb 2   evict least recently used entries down to 2 GB
    edgepipe cache clear              remove every entry

    Builds evict on their own past $EDGEPIPE_CACHE_MAX_GB (default 5 GB).
    """
    import shutil
    from pathlib import Path

    from edgepipe.build.cache import default_cache_root, evict, list_entries, max_cache_bytes
    from edgepipe.errors import InvalidInput

    root = Path(args.cache_dir) if args.cache_dir else default_cache_root()
    if root.exists() and not root.is_dir():
        raise InvalidInput(f"--cache-dir: {root} is a file, not a folder")
    if args.action == "ls":
        entries = list_entries(root)
        for e in entries:
            print(f"{e.stage:10} {e.key[:16]}  {e.size_bytes / 1e6:10.1f} MB  {_ago(e.last_used)}")
        total = sum(e.size_bytes for e in entries) / 1e9
        print(
            f"{len(entries)} entries, {total:.2f} GB in {root} (cap {max_cache_bytes() / 1e9:g} GB)"
        )
        return 0
    if args.action == "prune":
        if args.max_gb is not None and args.max_gb < 0:
            raise InvalidInput(f"--max-gb: must be >= 0, got {args.max_gb}")
        cap = max_cache_bytes() if args.max_gb is None else int(args.max_gb * 1e9)
        removed = evict(root, cap)
        freed = sum(e.size_bytes for e in removed) / 1e9
        print(f"removed {len(removed)} entries ({freed:.2f} GB); cap {cap / 1e9:g} GB")
        return 0
    removed = list_entries(root)
    for entry in removed:
        shutil.rmtree(entry.path, ignore_errors=True)
    print(f"removed {len(removed)} entries from {root}", file=sys.stdout)
    return 0


def _ago(timestamp: float) -> str:
    import time

    hours = (time.time() - timestamp) / 3600
    return f"used {hours:.1f} h ago" if hours < 48 else f"used {hours / 24:.0f} days ago"
