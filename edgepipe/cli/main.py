"""The `edgepipe` command line: `main()` and the parser.

Each group of subcommands is a module of `edgepipe.cli` with a `register(subparsers)` function
(catalog: list, validate; run: run, chat, bench; serve: serve; build: build, matrix; cache:
cache) that registers its handlers through `edgepipe.cli.command.add_command`. Those modules
import heavy dependencies, the build side and the server only inside their handlers, so
`edgepipe run` never pays for them. A handler returns the process exit code; the errors every
command shares are turned into exit codes here (2 invalid input, 1 a failed build, 130
interrupted, 141 a closed pipe).
"""

from __future__ import annotations

import argparse
import sys

from edgepipe import __version__
from edgepipe.cli import build, cache, catalog, run, serve
from edgepipe.cli.quiet import quiet_third_parties, terminate_as_interrupt
from edgepipe.errors import BuildFailed, InvalidInput

# Modules that contribute subcommands, in the order `edgepipe --help` lists them.
COMMAND_MODULES = (catalog, run, serve, build, cache)


def build_parser() -> argparse.ArgumentParser:
    """The `edgepipe` argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="edgepipe",
        description="Build Qwen models into device-tuned ONNX Runtime artifacts, and run them.",
    )
    parser.add_argument("--version", action="version", version=f"edgepipe {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the `edgepipe` command line.

    Args:
        argv: the arguments after the program name (None: `sys.argv[1:]`).

    Returns:
        The process exit code.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    quiet_third_parties(verbose=getattr(args, "verbose", False))
    try:
        with terminate_as_interrupt():
            return int(args.handler(args) or 0)
    except InvalidInput as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    except BuildFailed as exc:
        print(f"build failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Ctrl-C or SIGTERM: whatever was being built stays unpublished (build.publish).
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`edgepipe list | head`): not an error of ours. Point stdout at
        # /dev/null so the interpreter's final flush does not raise a second time.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell tool killed by the pipe reports


if __name__ == "__main__":
    sys.exit(main())
