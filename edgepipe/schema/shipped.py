"""Where shipped recipes, device profiles and built-in text samples live.

In a source checkout the recipes and profiles are read in place from `<repo>/recipes` and
`<repo>/device_profiles`, so editing a YAML file takes effect without reinstalling. In an
installed wheel they live in `edgepipe/_shipped/...` (see the hatch force-include in
pyproject.toml). Built-in text samples are package data in `edgepipe/arch/data/`.

This module needs only the standard library: `edgepipe list` and the schema build on it.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from edgepipe.errors import InvalidInput

RECIPES = "recipes"
PROFILES = "device_profiles"
YAML_SUFFIXES = (".yaml", ".yml")

# Built-in text samples (edgepipe/arch/data/<name>.txt), all original text written for edgepipe.
# "mixed" is not a file: it joins the other three, so calibration and evaluation see prose,
# code and CJK text in one sample.
BUILTIN_TEXT_FILES = ("prose", "code", "cjk")
BUILTIN_TEXTS = (*BUILTIN_TEXT_FILES, "mixed")

#: The edgepipe package folder; shipped files sit beside it (checkout) or inside it (wheel).
PACKAGE_DIR = Path(__file__).resolve().parents[1]


def shipped_dir(kind: str) -> Path:
    """Return the folder holding shipped files of one kind.

    Args:
        kind: `"recipes"` or `"device_profiles"`.

    Returns:
        `<repo>/<kind>` in a source checkout (a folder next to the package that sits beside a
        pyproject.toml), else `edgepipe/_shipped/<kind>` inside the installed package.
    """
    if kind not in (RECIPES, PROFILES):
        raise ValueError(f"kind must be {RECIPES!r} or {PROFILES!r}, got {kind!r}")
    checkout = PACKAGE_DIR.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / kind).is_dir():
        return checkout / kind
    return PACKAGE_DIR / "_shipped" / kind


def _yaml_files(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    files = [p for p in folder.iterdir() if p.suffix in YAML_SUFFIXES and p.is_file()]
    return {p.stem: p for p in sorted(files)}


def recipe_files() -> dict[str, Path]:
    """Shipped recipes, name (file stem) → path, sorted by name."""
    return _yaml_files(shipped_dir(RECIPES))


def profile_files() -> dict[str, Path]:
    """Shipped device profiles, name (file stem) → path, sorted by name."""
    return _yaml_files(shipped_dir(PROFILES))


def looks_like_path(name_or_path: str | Path) -> bool:
    """True when the argument names a file rather than a shipped recipe/profile."""
    text = str(name_or_path)
    return (
        isinstance(name_or_path, Path)
        or text.endswith(YAML_SUFFIXES)
        or "/" in text
        or "\\" in text
    )


def _resolve(name_or_path: str | Path, kind: str, shipped: dict[str, Path]) -> Path:
    if looks_like_path(name_or_path):
        path = Path(name_or_path)
        if not path.is_file():
            raise InvalidInput(f"{path}: file not found")
        return path
    if name_or_path in shipped:
        return shipped[name_or_path]
    known = ", ".join(shipped) or "(none shipped)"
    what = "recipe" if kind == RECIPES else "device profile"
    raise InvalidInput(
        f"{name_or_path}: unknown {what}; shipped ones are: {known} "
        f"(or give the path of a .yaml file)"
    )


def resolve_recipe(name_or_path: str | Path) -> Path:
    """Return the YAML file of a recipe given as a shipped name or a path.

    Raises:
        InvalidInput: the file does not exist, or the name is not shipped (lists the names).
    """
    return _resolve(name_or_path, RECIPES, recipe_files())


def resolve_profile(name_or_path: str | Path) -> Path:
    """Return the YAML file of a device profile given as a shipped name or a path.

    Raises:
        InvalidInput: the file does not exist, or the name is not shipped (lists the names).
    """
    return _resolve(name_or_path, PROFILES, profile_files())


def read_builtin_text(name: str) -> str:
    """Return the text of a built-in sample.

    Args:
        name: one of `BUILTIN_TEXTS`.

    Raises:
        InvalidInput: unknown name (lists the allowed ones).
    """
    if name not in BUILTIN_TEXTS:
        raise InvalidInput(
            f"builtin: unknown text sample {name!r}; allowed: {', '.join(BUILTIN_TEXTS)}"
        )
    if name == "mixed":
        return "\n\n".join(read_builtin_text(part) for part in BUILTIN_TEXT_FILES)
    return resources.files("edgepipe.arch.data").joinpath(f"{name}.txt").read_text(encoding="utf-8")
