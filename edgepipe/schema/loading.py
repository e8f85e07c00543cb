"""Loading recipes and device profiles from YAML, and reporting every problem at once.

Every problem is phrased `file: field.path: message`: pydantic errors are mapped to dotted
field paths, unknown keys list the allowed ones (with a "did you mean"), malformed YAML gives
the line and column, a key given twice is an error, and a missing file says so.
"""

from __future__ import annotations

import difflib
import json
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ValidationError

from edgepipe.arch.families import family_mismatch
from edgepipe.errors import InvalidInput
from edgepipe.schema import shipped as resources
from edgepipe.schema.common import FieldProblems
from edgepipe.schema.profile import DeviceProfile
from edgepipe.schema.recipe import Recipe


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _read_yaml(path: Path) -> tuple[dict | None, list[str]]:
    where = _display(path)
    if path.is_dir():
        return None, [f"{where}: is a folder, not a YAML file"]
    if not path.is_file():
        return None, [f"{where}: file not found"]
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(somewhere)"
        return None, [f"{where}: {at}: malformed YAML: {exc.problem or exc.context}"]
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        return None, [f"{where}: malformed YAML: {exc}"]
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        return None, [f"{where}: (top level): expected a mapping of keys (name: ...), got {got}"]
    return data, []


def _dotted(loc: Iterable[Any]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text or "(top level)"


def _unwrap(tp: Any) -> Any:
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def _model_at(root: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model class at `loc` below `root` (for listing allowed keys), if it is one."""
    current: Any = root
    for part in loc:
        current = _unwrap(current)
        origin = typing.get_origin(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return None
            current = field.annotation
        elif origin is list and isinstance(part, int):
            current = typing.get_args(current)[0]
        elif origin is dict:
            current = typing.get_args(current)[1]
        else:
            return None
    current = _unwrap(current)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _message(root: type[BaseModel], error: Mapping[str, Any]) -> str:
    kind, loc, value = error["type"], tuple(error["loc"]), error.get("input")
    if kind == "extra_forbidden":
        parent = _model_at(root, loc[:-1])
        allowed = list(parent.model_fields) if parent else []
        key = str(loc[-1])
        close = [a for a in allowed if a.startswith(key) or key.startswith(a)]
        close = close or difflib.get_close_matches(key, allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown key {loc[-1]!r}{hint}; allowed keys: {', '.join(allowed)}"
    if kind == "missing":
        return "required field is missing"
    if kind == "literal_error":
        return f"must be one of {error['ctx']['expected']}; got {value!r}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"must be a mapping of keys (one `key: value` per line); got {value!r}"
    if kind == "list_type":
        return f"must be a list, e.g. [{value}] or one `- item` per line; got {value!r}"
    message = error["msg"].removeprefix("Value error, ")
    if isinstance(value, (str, int, float, bool)) and kind != "value_error":
        message += f"; got {value!r}"
    return message


def _format_errors(where: str, root: type[BaseModel], exc: ValidationError) -> list[str]:
    problems = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, FieldProblems):
            problems += [f"{where}: {_dotted((*loc, f))}: {m}" for f, m in cause.items]
        else:
            problems.append(f"{where}: {_dotted(loc)}: {_message(root, error)}")
    return problems


def _check_file_name(where: str, name: str, path: Path) -> list[str]:
    if name == path.stem:
        return []
    return [f"{where}: name: {name!r} differs from the file name {path.name!r}; make them match "
            "(edgepipe finds recipes and profiles by file name)"]  # fmt: skip


def _profile_problems(path: Path) -> tuple[DeviceProfile | None, list[str]]:
    where = _display(path)
    data, problems = _read_yaml(path)
    if data is None:
        return None, problems
    try:
        profile = DeviceProfile.model_validate(data, context={"base_dir": path.parent})
    except ValidationError as exc:
        return None, _format_errors(where, DeviceProfile, exc)
    return profile, _check_file_name(where, profile.name, path)


def _recipe_problems(
    path: Path, profiles: Mapping[str, DeviceProfile] | None = None
) -> tuple[Recipe | None, list[str]]:
    where = _display(path)
    data, problems = _read_yaml(path)
    if data is None:
        return None, problems
    profiles = dict(profiles or {})
    known = {**dict.fromkeys(resources.profile_files()), **profiles}
    context = {"base_dir": path.parent, "profiles": known, "path": path}
    try:
        recipe = Recipe.model_validate(data, context=context)
    except ValidationError as exc:
        return None, _format_errors(where, Recipe, exc)
    problems = _check_file_name(where, recipe.name, path)
    fields: list[tuple[str, str]] = []
    loaded: dict[str, DeviceProfile] = {}
    for i, target in enumerate(recipe.targets):
        try:
            profile = profiles.get(target) or load_profile(_target_ref(path, target))
        except InvalidInput as exc:
            fields.append((f"targets[{i}]", f"profile {target!r} does not load: "
                           f"{exc.problems[0]} (run: edgepipe validate {target})"))  # fmt: skip
            continue
        loaded[target] = profile
        fields += recipe.precision_problems(profile)[1]
    recipe.use_profiles(loaded)
    source = recipe.source
    if source.path is not None and not (source.path / "config.json").is_file():
        fields.append(("source.path", f"{source.path} holds no config.json (a Hugging Face "
                       "model folder has config.json and *.safetensors)"))  # fmt: skip
    config = _read_config(source.path) if source.path is not None else None
    family = recipe.family or (config or {}).get("model_type") or source.family_hint()
    mismatch = family_mismatch(recipe.family, config) if recipe.family and config else None
    if mismatch:
        fields.append(("family", mismatch))
    gen = recipe.generation
    if family == "qwen2" and (gen.enable_thinking or gen.thinking or gen.thinking_budget):
        fields.append(("generation.enable_thinking", "thinking is a Qwen3 feature; this recipe "
                       "builds a qwen2-family model: remove enable_thinking/thinking/"
                       "thinking_budget"))  # fmt: skip
    problems += [f"{where}: {f}: {m}" for f, m in fields]
    return recipe, list(dict.fromkeys(problems))


def _target_ref(recipe_path: Path, target: str) -> str | Path:
    # A target is a profile name, or a profile file relative to the recipe's folder.
    return recipe_path.parent / target if resources.looks_like_path(target) else target


def _read_config(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """Load a device profile given as a shipped name (`cpu-x64`) or a YAML path.

    Raises:
        InvalidInput: with every problem as `file: field: message`.
    """
    path = resources.resolve_profile(name_or_path)
    profile, problems = _profile_problems(path)
    if problems or profile is None:
        raise InvalidInput(problems[0], problems)
    return profile


def load_recipe(
    name_or_path: str | Path, profiles: Mapping[str, DeviceProfile] | None = None
) -> Recipe:
    """Load a recipe given as a shipped name (`qwen3-0.6b`) or a YAML path.

    Args:
        name_or_path: shipped recipe name or path of a YAML file.
        profiles: extra profiles its `targets` may name, besides the shipped ones.

    Raises:
        InvalidInput: with every problem as `file: field: message`, including precision
            plans that do not fit a target profile.
    """
    path = resources.resolve_recipe(name_or_path)
    recipe, problems = _recipe_problems(path, profiles)
    if problems or recipe is None:
        raise InvalidInput(problems[0], problems)
    return recipe


def shipped_profiles() -> dict[str, DeviceProfile]:
    """Every shipped device profile, loaded, by name."""
    return {name: load_profile(path) for name, path in resources.profile_files().items()}


def shipped_recipes() -> dict[str, Recipe]:
    """Every shipped recipe, loaded, by name."""
    profiles = shipped_profiles()
    return {name: load_recipe(path, profiles) for name, path in resources.recipe_files().items()}


def file_kind(path: Path, data: Mapping[str, Any]) -> Literal["recipe", "profile"] | None:
    """Whether parsed YAML is a recipe (has `source`) or a device profile (has `provider`)."""
    if "source" in data or "targets" in data:
        return "recipe"
    if "provider" in data or "graph_variant" in data:
        return "profile"
    parent = path.resolve().parent.name
    return "recipe" if parent == "recipes" else "profile" if parent == "device_profiles" else None


def validate_files(paths: Iterable[str | Path]) -> list[str]:
    """Check recipe and profile files; return every problem as `file: field.path: message`.

    Profiles are checked first, so recipes in the same call may target them by name.
    """
    problems: list[str] = []
    profiles: dict[str, DeviceProfile] = {}
    recipes: list[Path] = []
    for path in map(Path, paths):
        data, found = _read_yaml(path)
        if data is None:
            problems += found
            continue
        kind = file_kind(path, data)
        if kind == "recipe":
            recipes.append(path)
        elif kind == "profile":
            profile, found = _profile_problems(path)
            problems += found
            if profile is not None and not found:
                profiles[profile.name] = profile
        else:
            problems.append(f"{_display(path)}: (top level): neither a recipe (it would have "
                            "source:) nor a device profile (it would have provider:)")  # fmt: skip
    for path in recipes:
        problems += _recipe_problems(path, profiles)[1]
    return problems
