"""`add_command`: how each CLI module registers a subcommand (a leaf: imports nothing of ours)."""

from __future__ import annotations

import argparse
import inspect


def add_command(subparsers, name: str, handler) -> argparse.ArgumentParser:
    """Register `handler` as subcommand `name`; its docstring becomes the help text."""
    doc = inspect.cleandoc(handler.__doc__ or "")
    summary = doc.splitlines()[0] if doc else ""
    sub = subparsers.add_parser(
        name, help=summary, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub.add_argument(
        "--verbose",
        action="store_true",
        help="show third-party progress bars and hints (silenced by default)",
    )
    sub.set_defaults(handler=handler)
    return sub
