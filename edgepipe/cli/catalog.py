"""`edgepipe list` and `edgepipe validate`: what is shipped, and whether YAML files are valid."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgepipe.cli.command import add_command
from edgepipe.errors import InvalidInput, require


def register(subparsers) -> None:
    """Add the `list` and `validate` subcommands."""
    add_command(subparsers, "list", list_command)
    validate = add_command(subparsers, "validate", validate_command)
    validate.add_argument(
        "files",
        nargs="*",
        metavar="FILE",
        help="recipe or profile YAML files, or folders of them (default: all shipped)",
    )


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def list_command(args: argparse.Namespace) -> int:
    """List the shipped recipes and device profiles, one line each.

    A file that does not load is listed as invalid; `edgepipe validate FILE` says why.
    """
    require("pydantic", "build")
    require("yaml", "build")
    from edgepipe import schema
    from edgepipe.schema import shipped as resources

    profiles: dict[str, schema.DeviceProfile] = {}
    print("device profiles:")
    for name, path in resources.profile_files().items():
        try:
            profile = schema.load_profile(path)
        except InvalidInput:
            print(f"  {name:<28} INVALID (run: edgepipe validate {path})")
            continue
        profiles[name] = profile
        what = f"{profile.provider.removesuffix('ExecutionProvider')}, {profile.graph_variant}"
        print(f"  {name:<28} {what:<16} {_first_line(profile.description)}")
    print("recipes:")
    for name, path in resources.recipe_files().items():
        try:
            recipe = schema.load_recipe(path, profiles)
        except InvalidInput:
            print(f"  {name:<28} INVALID (run: edgepipe validate {path})")
            continue
        targets = ",".join(recipe.targets)
        print(f"  {name:<28} {_first_line(recipe.description)}  [{targets}]")
    return 0


def validate_command(args: argparse.Namespace) -> int:
    """Check recipes and device profiles; print every problem as `file: field: message`.

    With no FILE, checks every shipped recipe and profile. Exit code 2 when anything is wrong.
    """
    require("pydantic", "build")
    require("yaml", "build")
    from edgepipe import schema
    from edgepipe.schema import shipped as resources

    files = [
        *resources.profile_files().values(),
        *resources.recipe_files().values(),
    ]
    if args.files:
        # A folder stands for the YAML files in it (`edgepipe validate my_recipes/`).
        files = []
        for arg in map(Path, args.files):
            found = sorted(p for p in arg.glob("*") if p.suffix in resources.YAML_SUFFIXES)
            files += found if arg.is_dir() else [arg]
    problems = schema.validate_files(files)
    if problems:
        raise InvalidInput(problems[0], problems)
    print(f"ok: {len(files)} file(s) valid", file=sys.stdout)
    return 0
