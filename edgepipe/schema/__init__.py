"""Recipes and device profiles: pydantic models, YAML loading, and problem reports.

Modules: `recipe` (what to build), `profile` (where it runs), `precision` (THE precision
resolver), `loading` (YAML files → models, every problem at once), `common` (shared pieces),
`shipped` (the recipes and profiles that ship with edgepipe).

A *recipe* (recipes/*.yaml) says what to build; a *device profile* (device_profiles/*.yaml)
says where it runs. Both forbid unknown keys. The loaders report every problem at once as
`file: field.path: message` and raise `edgepipe.errors.InvalidInput`; closed sets list their
allowed values. Later stages never merge precision settings by hand:
`Recipe.precision_for(profile)` returns the `ResolvedPrecision` for one target.

    from edgepipe.schema import load_recipe
    recipe = load_recipe("qwen3-0.6b")
    for profile in recipe.target_profiles():
        plan = recipe.precision_for(profile)
"""

from edgepipe.schema.common import QUANTIZED, FieldProblems
from edgepipe.schema.loading import (
    file_kind,
    load_profile,
    load_recipe,
    shipped_profiles,
    shipped_recipes,
    validate_files,
)
from edgepipe.schema.precision import (
    Override,
    PartialPrecision,
    PrecisionPlan,
    ResolvedPrecision,
    resolve_precision,
)
from edgepipe.schema.profile import (
    PROVIDER_PACKAGES,
    ContextSize,
    DecoderLayout,
    DeviceProfile,
    QnnOptions,
)
from edgepipe.schema.recipe import (
    COMMIT_SHA,
    AdapterSource,
    Generation,
    HubSource,
    ModelScopeSource,
    PresetSource,
    Recipe,
    Sampling,
    Source,
    TextSample,
    Thresholds,
    preset_names,
)

__all__ = [
    "COMMIT_SHA",
    "PROVIDER_PACKAGES",
    "QUANTIZED",
    "AdapterSource",
    "ContextSize",
    "DecoderLayout",
    "DeviceProfile",
    "FieldProblems",
    "Generation",
    "HubSource",
    "ModelScopeSource",
    "Override",
    "PartialPrecision",
    "PrecisionPlan",
    "PresetSource",
    "QnnOptions",
    "Recipe",
    "ResolvedPrecision",
    "Sampling",
    "Source",
    "TextSample",
    "Thresholds",
    "file_kind",
    "load_profile",
    "load_recipe",
    "preset_names",
    "resolve_precision",
    "shipped_profiles",
    "shipped_recipes",
    "validate_files",
]
