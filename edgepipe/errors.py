"""Exception types shared by the build side and the CLI.

The CLI maps them to exit codes: `InvalidInput` → 2, `BuildFailed` → 1. The runtime has its own
small error module (`edgepipe.runtime.errors`) so that it imports nothing from here.
"""

from __future__ import annotations


class EdgepipeError(Exception):
    """Base class for every error edgepipe raises on purpose."""


class InvalidInput(EdgepipeError):
    """Bad user input: a recipe, profile, model folder or argument. CLI exit code 2.

    `problems` holds every problem found, each already phrased as `file: field: message`.
    """

    def __init__(self, message: str, problems: list[str] | None = None):
        self.problems = problems or [message]
        super().__init__(message if problems is None else "\n".join(self.problems))


class BuildFailed(EdgepipeError):
    """A build stage or a validation threshold failed. CLI exit code 1."""


class MissingDependency(InvalidInput):
    """An optional dependency is missing; the message carries the exact `pip install`."""

    def __init__(self, module: str, extra: str):
        super().__init__(
            f"{module} is not installed; it comes with: pip install 'edgepipe[{extra}]'"
        )


def require(module: str, extra: str):
    """Import `module` or raise `MissingDependency` naming the extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependency(module, extra) from exc
