"""Recipes: what to build (see recipes/*.yaml), as pydantic models; YAML lives in `loading.py`.

A recipe says what to build: model source, precision plan (`edgepipe.schema.precision`), text
samples, thresholds, generation defaults and target profiles. Models forbid unknown keys and
read no recipe or profile files: the loader hands a recipe its loaded targets.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from edgepipe.arch.bundled import BUNDLED
from edgepipe.arch.presets import PRESETS
from edgepipe.errors import InvalidInput
from edgepipe.schema import shipped as resources
from edgepipe.schema.common import FieldProblems, Strict, base_dir, one_of, resolve_path
from edgepipe.schema.precision import PrecisionPlan, ResolvedPrecision, resolve_precision
from edgepipe.schema.profile import DeviceProfile

Family = Literal["qwen2", "qwen3"]
BuiltinText = Literal["prose", "code", "cjk", "mixed"]

#: A pinned Hub revision: a 40-hex lowercase commit sha.
COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
_TAG = re.compile(r"^v?\d+(\.\d+)*([.\-+][\w.\-]+)?$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def preset_names() -> tuple[str, ...]:
    """Names a `preset:` source may use: the keys of `edgepipe.arch.presets.PRESETS`."""
    return tuple(PRESETS)


# --------------------------------------------------------------------------- source


class HubSource(Strict):
    """A Hugging Face Hub repository pinned to one commit."""

    id: str = Field(description="repository id, e.g. Qwen/Qwen2.5-0.5B-Instruct")
    revision: str = Field(description="40-hex commit sha or a version tag; never a branch")

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        if not _HUB_ID.match(value):
            raise ValueError(f"must look like 'owner/name' (e.g. Qwen/Qwen3-0.6B), got {value!r}")
        return value

    @field_validator("revision")
    @classmethod
    def _check_revision(cls, value: str) -> str:
        if COMMIT_SHA.match(value) or _TAG.match(value):
            return value
        raise ValueError(
            f"must pin the weights: a 40-hex lowercase commit sha (the Hub page's 'Files' → "
            f"'History') or a version tag like v1.0; a branch such as {value!r} moves"
        )


class ModelScopeSource(HubSource):
    """A ModelScope (modelscope.cn) repository pinned to one commit or tag; needs the
    `modelscope` extra. The same id and revision rules as the hub."""


class AdapterSource(Strict):
    """A PEFT LoRA adapter merged into the base weights as they stream through the exporter:
    exactly one of `path` (a folder with adapter_config.json + adapter_model.safetensors),
    `hub` or `modelscope`."""

    path: Path | None = None
    hub: HubSource | None = None
    modelscope: ModelScopeSource | None = None

    @field_validator("path", mode="before")
    @classmethod
    def _resolve(cls, value: Any, info: ValidationInfo) -> Any:
        return resolve_path(value, info) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _exactly_one(self) -> AdapterSource:
        one_of(self, ("path", "hub", "modelscope"))
        return self


class PresetSource(Strict):
    """Random weights of a named architecture (smoke tests, honest benchmarks)."""

    name: str
    seed: int = Field(0, ge=0)

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if value not in PRESETS:
            raise ValueError(f"unknown preset {value!r}; allowed: {', '.join(preset_names())}")
        return value


class BundledSource(Strict):
    """A trained model shipped inside edgepipe (`edgepipe.arch.bundled`): no download."""

    name: str

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if value not in BUNDLED:
            raise ValueError(f"unknown bundled model {value!r}; allowed: {', '.join(BUNDLED)}")
        return value


class Source(Strict):
    """Where the weights come from: exactly one of `hub`, `modelscope`, `path`, `preset` or
    `bundled`, optionally with a LoRA `adapter` on top."""

    hub: HubSource | None = None
    modelscope: ModelScopeSource | None = None
    path: Path | None = None
    preset: PresetSource | None = None
    adapter: AdapterSource | None = None
    bundled: BundledSource | None = None

    @field_validator("path", mode="before")
    @classmethod
    def _resolve(cls, value: Any, info: ValidationInfo) -> Any:
        return resolve_path(value, info) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _exactly_one(self) -> Source:
        one_of(self, ("hub", "modelscope", "path", "preset", "bundled"))
        return self

    def family_hint(self) -> Family | None:
        """The family the source's name implies, or None (a local folder needs its config)."""
        repo = self.hub or self.modelscope
        text = self.preset.name if self.preset else repo.id if repo else ""
        text = text.lower().split("/")[-1]
        if text.startswith(("qwen3", "tiny-qwen3")):
            return "qwen3"
        if text.startswith(("qwen2", "tiny-qwen2")):
            return "qwen2"
        return None


# ----------------------------------------------------------------- text, checks, sampling


class TextSample(Strict):
    """Calibration or evaluation text: a file, or one of the built-in samples."""

    file: Path | None = None
    builtin: BuiltinText | None = None
    max_tokens: int = Field(1024, ge=16, le=1_000_000)

    @field_validator("file", mode="before")
    @classmethod
    def _resolve(cls, value: Any, info: ValidationInfo) -> Any:
        return resolve_path(value, info) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _exactly_one(self) -> TextSample:
        one_of(self, ("file", "builtin"))
        return self

    def read(self) -> str:
        """Return the text (not yet truncated to `max_tokens`: that needs the tokenizer)."""
        if self.builtin is not None:
            return resources.read_builtin_text(self.builtin)
        assert self.file is not None
        if not self.file.is_file():
            raise InvalidInput(f"{self.file}: file not found")
        try:
            return self.file.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInput(
                f"{self.file}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                f"{exc.start}); save it as UTF-8"
            ) from None


class Thresholds(Strict):
    """Quality gates the validate stage enforces against the unquantized reference."""

    max_kl: float = Field(0.1, ge=0, description="mean KL(reference || built), nats/token")
    min_top1_agreement: float = Field(0.85, ge=0, le=1)
    max_perplexity_ratio: float = Field(1.15, ge=1)
    min_cosine: float = Field(0.99, ge=-1, le=1, description="static graphs: logits cosine")
    max_logit_abs_diff: float = Field(1e-3, ge=0, description="fp32 builds vs transformers")
    max_fp16_kl: float = Field(
        0.01, ge=0, description="float16 builds: the unquantized fp16 graph vs the fp32 one"
    )


class Sampling(Strict):
    """Sampling settings; temperature 0 means greedy, top_k 0 and top_p 1 mean off."""

    temperature: float = Field(0.7, ge=0, le=2)
    top_k: int = Field(20, ge=0)
    top_p: float = Field(0.8, gt=0, le=1)
    min_p: float = Field(0.0, ge=0, lt=1)
    repetition_penalty: float = Field(1.0, gt=0, le=2)


class Generation(Sampling):
    """Generation defaults (the model card's), carried into the artifact."""

    max_new_tokens: int = Field(512, ge=1)
    enable_thinking: bool | None = Field(None, description="Qwen3 only")
    thinking: Sampling | None = Field(None, description="Qwen3: sampling when thinking is on")
    thinking_budget: int | None = Field(None, ge=1, description="Qwen3: max thinking tokens")

    @model_validator(mode="after")
    def _no_greedy_thinking(self) -> Generation:
        if self.thinking is not None and self.thinking.temperature == 0:
            # Qwen3's model card: greedy decoding in thinking mode loops.
            raise ValueError("thinking.temperature 0 (greedy) makes Qwen3 thinking loop; use 0.6")
        return self

    def sampling_for(self, thinking: bool) -> Sampling:
        """The sampling settings for a request with thinking on or off."""
        if thinking and self.thinking is not None:
            return self.thinking
        return Sampling(**{k: getattr(self, k) for k in Sampling.model_fields})


# --------------------------------------------------------------------------------- recipe


def _check_target(value: str, info: ValidationInfo) -> str:
    # The loaders pass shipped + user profiles; code that builds a Recipe directly gets the
    # shipped ones.
    known: Mapping[str, Any] = (info.context or {}).get("profiles") or resources.profile_files()
    if resources.looks_like_path(value):
        if not (base_dir(info) / value).is_file():
            raise ValueError(f"profile file {value!r} not found (relative to the recipe's folder)")
    elif value not in known:
        raise ValueError(f"unknown profile {value!r}; known profiles: {', '.join(known)}")
    return value


class Recipe(Strict):
    """What to build: see recipes/*.yaml for commented examples."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9.\-]*$")
    description: str
    source: Source
    family: Family | None = None
    targets: list[Annotated[str, AfterValidator(_check_target)]] = Field(min_length=1)
    precision: PrecisionPlan = Field(default_factory=PrecisionPlan)
    calibration: TextSample | None = None
    evaluation: TextSample = Field(default_factory=lambda: TextSample(builtin="mixed"))
    validation: Thresholds = Field(default_factory=Thresholds)
    generation: Generation = Field(default_factory=Generation)

    _profiles: dict[str, DeviceProfile] = PrivateAttr(default_factory=dict)
    _path: Path | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _cross_checks(self, info: ValidationInfo) -> Recipe:
        if "path" in (info.context or {}):  # the loader says which file this is
            self._path = info.context["path"]
        problems = [
            (f"precision.profiles.{key}", f"{key!r} is not in targets ({', '.join(self.targets)});"
             " add it there or remove this entry")
            for key in self.precision.profiles
            if key not in self.targets
        ]  # fmt: skip
        if problems:
            raise FieldProblems(problems)
        return self

    @property
    def path(self) -> Path | None:
        """The YAML file this recipe was loaded from (None when built in code)."""
        return self._path

    def resolve_family(self, config: Mapping[str, Any] | None = None) -> Family:
        """The chat-template family: `family`, else the source config's model_type, else the name.

        Args:
            config: the source model's config.json, when available.

        Raises:
            InvalidInput: none of them tells.
        """
        if self.family:
            return self.family
        model_type = (config or {}).get("model_type")
        if model_type in typing.get_args(Family):
            return model_type
        hint = self.source.family_hint()
        if hint:
            return hint
        raise InvalidInput(
            f"{self.name}: family: cannot infer it from the source; set family: qwen2 or qwen3"
        )

    def target_profiles(self) -> list[DeviceProfile]:
        """The `targets` as loaded profiles (shipped names or paths relative to the recipe)."""
        return [self.profile(target) for target in self.targets]

    def profile(self, target: str) -> DeviceProfile:
        """One target as a loaded profile: a profile name, or a path relative to the recipe.

        Raises:
            InvalidInput: the target's profile was not loaded with the recipe (it does not
                load, or the recipe was built in code instead of by `load_recipe`).
        """
        if target not in self._profiles:
            raise InvalidInput(
                f"{self.name}: profile {target!r} is not loaded; load the recipe with "
                "edgepipe.schema.load_recipe, which loads its targets"
            )
        return self._profiles[target]

    def use_profiles(self, profiles: Mapping[str, DeviceProfile]) -> None:
        """Record loaded profiles of targets (by target string); `load_recipe` calls this.

        Models do not read files: the loader (`edgepipe.schema.loading`) loads the targets
        and hands them over here.
        """
        self._profiles.update(profiles)

    def precision_for(self, profile: DeviceProfile | str) -> ResolvedPrecision:
        """The precision of this recipe for one profile (see `edgepipe.schema.precision`).

        Args:
            profile: a loaded profile, or a target of this recipe.

        Raises:
            InvalidInput: the merged plan does not fit the profile (e.g. int8 weights on a
                profile that only accepts int4).
        """
        if isinstance(profile, str):
            profile = self.profile(profile)
        resolved, problems = self.precision_problems(profile)
        if problems:
            where = str(self._path) if self._path else self.name
            raise InvalidInput(problems[0], [f"{where}: {f}: {m}" for f, m in problems])
        return resolved

    def precision_problems(
        self, profile: DeviceProfile
    ) -> tuple[ResolvedPrecision, list[tuple[str, str]]]:
        """The resolved precision for `profile` and every problem as `(field, message)`."""
        return resolve_precision(
            self.precision, profile, has_calibration=self.calibration is not None
        )
