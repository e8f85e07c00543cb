"""What `edgepipe build` will build: recipe × profile pairs resolved into `BuildPlan`s.

All input is checked before anything is built: `plan_builds` loads every recipe and profile
and raises one `InvalidInput` listing every problem it found.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edgepipe import schema
from edgepipe.build.matrix import MatrixEntry, build_matrix, shard_slice
from edgepipe.errors import InvalidInput
from edgepipe.stages.source import ModelSource, source_from_recipe


@dataclass
class BuildPlan:
    """Everything one build needs, resolved from the recipe and the profile.

    Attributes:
        recipe: the validated recipe.
        profile: the validated device profile built for.
        resolved: the recipe's precision as it applies to `profile`.
        source: the source stage of the recipe's `source` block.
        recipe_arg: what the recipe was loaded from (a shipped name or a path).
        profile_arg: what the profile was named by (a `-p` value or a recipe target).
    """

    recipe: schema.Recipe
    profile: schema.DeviceProfile
    resolved: schema.ResolvedPrecision
    source: ModelSource
    recipe_arg: str = ""
    profile_arg: str = ""

    @property
    def name(self) -> str:
        """`recipe@profile`, how progress lines and errors name this build."""
        return f"{self.recipe.name}@{self.profile.name}"

    @property
    def precision(self) -> str:
        """The weights precision built (`fp32`, `fp16`, `int8`, `int4`)."""
        return self.resolved.weights

    @property
    def activation_dtype(self) -> str:
        """The graph's activation dtype (the profile's)."""
        return self.profile.activation_dtype

    def quant_plan(self):
        """The `edgepipe.stages.quantize.plan.QuantPlan` of this build (None: nothing quantized)."""
        from edgepipe.stages.quantize.plan import QuantPlan

        plan = QuantPlan.from_resolved(self.resolved)
        return plan if plan.is_quantized else None

    def decoder_switches(self) -> dict[str, bool]:
        """The profile's decoder layout as `build_decoder` keyword arguments."""
        d = self.profile.decoder
        return {
            "rotary_in_attention": d.rotary == "attention",
            "packed_qkv": d.qkv == "packed",
            "fused_bias": d.matmul_bias == "fused",
            "branchwise_norm": d.head_norm == "branchwise",
        }


def _with_precision(recipe: schema.Recipe, precision: str) -> schema.Recipe:
    """A copy of `recipe` whose weights precision is `precision` for every profile."""
    copy = recipe.model_copy(deep=True)
    copy.precision.weights = precision
    for part in copy.precision.profiles.values():
        part.weights = None
    return copy


def _load_recipes(recipes: Sequence[str]) -> list[tuple[str, schema.Recipe]]:
    """(argument, recipe) for each of `recipes`; raises every problem of every file at once."""
    problems: list[str] = []
    loaded = []
    for arg in recipes:
        try:
            loaded.append((arg, schema.load_recipe(arg)))
        except InvalidInput as exc:
            problems.extend(exc.problems)
    if problems:
        raise InvalidInput(problems[0], problems)
    return loaded


def _plan(recipe: schema.Recipe, entry: MatrixEntry) -> BuildPlan:
    """The plan of one matrix entry (the profile: a target of the recipe, or any name/path)."""
    if entry.profile in recipe.targets:
        profile = recipe.profile(entry.profile)
    else:
        profile = schema.load_profile(entry.profile)
    base = recipe.path.parent if recipe.path else Path.cwd()
    return BuildPlan(
        recipe,
        profile,
        recipe.precision_for(profile),
        source_from_recipe(recipe.source, base),
        recipe_arg=str(entry.recipe_path),
        profile_arg=entry.profile,
    )


def plan_builds(
    recipes: Sequence[str],
    profiles: Sequence[str] | None = None,
    precision: str | None = None,
    shard: tuple[int, int] | None = None,
) -> list[BuildPlan]:
    """Resolve the recipe × profile builds of one command line, checking all input first.

    Args:
        recipes: shipped recipe names or YAML paths.
        profiles: `-p` values (names or paths); None = each recipe's `targets`.
        precision: `--precision` override of the weights precision.
        shard: `(I, N)`: keep slice I of N of the sorted pairs (see `edgepipe.build.matrix`).

    Returns:
        One plan per pair, in the matrix's sorted order.

    Raises:
        InvalidInput: every problem found in the recipes and profiles, at once.
    """
    loaded = _load_recipes(recipes)
    entries = build_matrix(
        [(r.name, arg, list(profiles) if profiles else list(r.targets)) for arg, r in loaded]
    )
    if shard is not None:
        entries = shard_slice(entries, *shard)
    by_name = {r.name: r for _, r in loaded}
    problems: list[str] = []
    plans = []
    for entry in entries:
        recipe = by_name[entry.recipe]
        if precision is not None:
            recipe = _with_precision(recipe, precision)
        try:
            plans.append(_plan(recipe, entry))
        except InvalidInput as exc:
            problems.extend(exc.problems)
    if problems:
        raise InvalidInput(problems[0], problems)
    return plans


def matrix_entries(
    recipes: Sequence[str], profiles: Sequence[str] | None = None
) -> list[MatrixEntry]:
    """The sorted recipe × profile pairs of `recipes`, for `edgepipe matrix`.

    Args:
        recipes: shipped recipe names or YAML paths.
        profiles: `-p` values; None = each recipe's `targets`.

    Raises:
        InvalidInput: every problem found in the recipes, at once.
    """
    # As in `plan_builds`: -p replaces the targets, so matrix shards == build shards.
    loaded = _load_recipes(recipes)
    rows = [
        (recipe.name, str(arg), list(profiles) if profiles else list(recipe.targets))
        for arg, recipe in loaded
    ]
    # A -p that is not a target must load, or CI would get jobs for a profile that is not there.
    targets = {t for _, recipe in loaded for t in recipe.targets}
    problems: list[str] = []
    for name in dict.fromkeys(profiles or ()):
        if name not in targets:
            try:
                schema.load_profile(name)
            except InvalidInput as exc:
                problems.extend(exc.problems)
    if problems:
        raise InvalidInput(problems[0], problems)
    return build_matrix(rows)
