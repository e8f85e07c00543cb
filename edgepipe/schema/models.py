"""Recipes and device profiles as pydantic models (the YAML side lives in `loading.py`).

A *recipe* says what to build (model source, precision plan, text samples, thresholds,
generation defaults, target profiles); a *device profile* says where it runs (execution
provider, graph variant, dtypes, the ops the provider accepts). Both forbid unknown keys.
Closed sets are Literals, so errors list their allowed values.

Later stages never merge precision settings by hand: `Recipe.precision_for(profile)` returns
the `ResolvedPrecision` for one target.
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.util
import re
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from edgepipe.errors import InvalidInput
from edgepipe.schema import shipped as resources

Precision = Literal["int4", "int8", "fp16", "fp32"]
SidePrecision = Literal["int4", "int8", "fp16", "fp32", "same"]
Method = Literal["rtn", "hqq", "gptq"]
Family = Literal["qwen2", "qwen3"]
Provider = Literal["CPUExecutionProvider", "DmlExecutionProvider", "QNNExecutionProvider"]
TensorDtype = Literal[
    "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8",
    "uint16", "uint8", "int4", "uint4", "bool",
]  # fmt: skip
BuiltinText = Literal["prose", "code", "cjk", "mixed"]

QUANTIZED: tuple[str, ...] = ("int4", "int8")
# Preset names accepted until edgepipe.arch.presets exists; it then becomes the only source.
FALLBACK_PRESETS = (
    "tiny-qwen2", "tiny-qwen3", "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b",
    "qwen3-0.6b", "qwen3-1.7b", "qwen3-4b",
)  # fmt: skip
# The pip package that provides each execution provider (checked against `package`).
PROVIDER_PACKAGES: dict[str, tuple[str, ...]] = {
    "CPUExecutionProvider": ("onnxruntime", "onnxruntime-directml", "onnxruntime-qnn"),
    "DmlExecutionProvider": ("onnxruntime-directml",),
    "QNNExecutionProvider": ("onnxruntime-qnn",),
}
# Keys owned by the typed `qnn:` block; provider_options must not set them a second time.
QNN_TYPED_KEYS = ("backend_type", "soc_model", "htp_arch", "htp_performance_mode")

_SHA = re.compile(r"^[0-9a-f]{40}$")
_TAG = re.compile(r"^v?\d+(\.\d+)*([.\-+][\w.\-]+)?$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_OP = re.compile(r"^([a-z][\w.]*::)?[A-Z][A-Za-z0-9]*$")


def preset_names() -> tuple[str, ...]:
    """Names a `preset:` source may use: `edgepipe.arch.presets.PRESETS` keys when that module exists."""
    if importlib.util.find_spec("edgepipe.arch.presets") is None:
        return FALLBACK_PRESETS
    return tuple(importlib.import_module("edgepipe.arch.presets").PRESETS)


def _block_size(value: int) -> int:
    if value < 16 or value > 256 or value & (value - 1):
        raise ValueError(
            f"must be a power of two from 16 to 256 (16, 32, 64, 128, 256), got {value}"
        )
    return value


BlockSize = Annotated[int, AfterValidator(_block_size)]


class Strict(BaseModel):
    """Base model: unknown keys are errors, values are checked on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _base_dir(info: ValidationInfo) -> Path:
    return Path((info.context or {}).get("base_dir", "."))


def _resolve_path(value: str, info: ValidationInfo) -> Path:
    # Relative paths resolve against the YAML file's folder, so a recipe means the same thing
    # whatever directory `edgepipe build` runs from.
    path = Path(value).expanduser()
    return path if path.is_absolute() else (_base_dir(info) / path).resolve()


class FieldProblems(ValueError):
    """Several problems found by one model validator, each tied to a field below the model.

    The loaders report each at its own dotted path instead of one joined message.
    """

    def __init__(self, items: list[tuple[str, str]]):
        self.items = items
        super().__init__("; ".join(f"{field}: {message}" for field, message in items))


def _one_of(model: BaseModel, names: tuple[str, ...]) -> None:
    given = [n for n in names if getattr(model, n) is not None]
    if len(given) != 1:
        got = f"got {', '.join(given)}" if given else "got none"
        raise ValueError(f"give exactly one of {', '.join(names)} ({got})")


# --------------------------------------------------------------------------- recipe: source


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
        if _SHA.match(value) or _TAG.match(value):
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
        return _resolve_path(value, info) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _exactly_one(self) -> AdapterSource:
        _one_of(self, ("path", "hub", "modelscope"))
        return self


class PresetSource(Strict):
    """Random weights of a named architecture (smoke tests, honest benchmarks)."""

    name: str
    seed: int = Field(0, ge=0)

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        names = preset_names()
        if value not in names:
            raise ValueError(f"unknown preset {value!r}; allowed: {', '.join(names)}")
        return value


class Source(Strict):
    """Where the weights come from: exactly one of `hub`, `modelscope`, `path` or `preset`,
    optionally with a LoRA `adapter` on top."""

    hub: HubSource | None = None
    modelscope: ModelScopeSource | None = None
    path: Path | None = None
    preset: PresetSource | None = None
    adapter: AdapterSource | None = None

    @field_validator("path", mode="before")
    @classmethod
    def _resolve(cls, value: Any, info: ValidationInfo) -> Any:
        return _resolve_path(value, info) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _exactly_one(self) -> Source:
        _one_of(self, ("hub", "modelscope", "path", "preset"))
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


# ----------------------------------------------------------------------- recipe: precision


class Override(Strict):
    """Weights whose name matches `pattern` (fnmatch) use another precision or block size."""

    pattern: str
    weights: Precision
    block_size: BlockSize | None = None


class PartialPrecision(Strict):
    """Precision fields a profile entry may override; absent fields keep the recipe's value."""

    weights: Precision | None = None
    method: Method | None = None
    block_size: BlockSize | None = None
    symmetric: bool | None = None
    accuracy_level: int | None = Field(None, ge=0, le=4)
    embedding: SidePrecision | None = None
    lm_head: SidePrecision | None = None
    exclude: list[str] | None = None
    overrides: list[Override] | None = None


class PrecisionPlan(PartialPrecision):
    """The recipe's precision plan. Absent fields fall back to the target profile's defaults.

    `profiles` maps a target name to fields that replace these for that target (lists are
    replaced, not extended). `block_size` here applies to dynamic (MatMulNBits) targets only;
    a static target keeps its profile's per-channel scales unless its own entry sets one, and
    a recipe-wide `method: gptq` means rtn on a static target (its calibration text tunes the
    activation scales instead).
    """

    method: Method = "rtn"
    embedding: SidePrecision = "same"
    lm_head: SidePrecision = "same"
    exclude: list[str] = Field(default_factory=list)
    overrides: list[Override] = Field(default_factory=list)
    profiles: dict[str, PartialPrecision] = Field(default_factory=dict)


class ResolvedPrecision(Strict):
    """The precision plan for one recipe × profile, with every default filled in.

    `block_size` is None only for static graphs, meaning one scale per output channel.
    `embedding` and `lm_head` never hold "same".
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    profile: str
    weights: Precision
    method: Method
    block_size: int | None
    symmetric: bool
    accuracy_level: int
    embedding: Precision
    lm_head: Precision
    exclude: tuple[str, ...] = ()
    overrides: tuple[Override, ...] = ()

    def for_weight(self, name: str) -> tuple[Precision, int | None] | None:
        """Precision and block size for one body weight, or None when it stays unquantized.

        Args:
            name: the weight's name in the source checkpoint, e.g.
                `model.layers.0.mlp.down_proj.weight`.

        `exclude` wins over `overrides`; the first matching override wins. The embedding and
        lm_head are chosen by the exporter from `embedding` / `lm_head`, not here.
        """
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.exclude):
            return None
        for rule in self.overrides:
            if fnmatch.fnmatchcase(name, rule.pattern):
                return rule.weights, rule.block_size or self.block_size
        return self.weights, self.block_size


# ------------------------------------------------------------- recipe: text, checks, sampling


class TextSample(Strict):
    """Calibration or evaluation text: a file, or one of the built-in samples."""

    file: Path | None = None
    builtin: BuiltinText | None = None
    max_tokens: int = Field(1024, ge=16, le=1_000_000)

    @field_validator("file", mode="before")
    @classmethod
    def _resolve(cls, value: Any, info: ValidationInfo) -> Any:
        return _resolve_path(value, info) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _exactly_one(self) -> TextSample:
        _one_of(self, ("file", "builtin"))
        return self

    def read(self) -> str:
        """Return the text (not yet truncated to `max_tokens`: that needs the tokenizer)."""
        if self.builtin is not None:
            return resources.read_builtin_text(self.builtin)
        assert self.file is not None
        if not self.file.is_file():
            raise InvalidInput(f"{self.file}: file not found")
        return self.file.read_text(encoding="utf-8")


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
        if not (_base_dir(info) / value).is_file():
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
    def _cross_checks(self) -> Recipe:
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
            InvalidInput: the profile does not exist or is invalid.
        """
        return self._profile(target)

    def _profile(self, target: str) -> DeviceProfile:
        if target not in self._profiles:
            base = self._path.parent if self._path else Path(".")
            ref: str | Path = base / target if resources.looks_like_path(target) else target
            from edgepipe.schema.loading import load_profile  # loading imports this module

            self._profiles[target] = load_profile(ref)
        return self._profiles[target]

    def precision_for(self, profile: DeviceProfile | str) -> ResolvedPrecision:
        """Merge the plan, its per-profile override and the profile's defaults.

        Args:
            profile: a loaded profile, or a target name of this recipe.

        Raises:
            InvalidInput: the merged plan does not fit the profile (e.g. int8 weights on a
                profile that only accepts int4).
        """
        if isinstance(profile, str):
            profile = self._profile(profile)
        resolved, problems = _resolve_precision(self, profile)
        if problems:
            where = str(self._path) if self._path else self.name
            raise InvalidInput(problems[0], [f"{where}: {f}: {m}" for f, m in problems])
        return resolved


def _resolve_precision(
    recipe: Recipe, profile: DeviceProfile
) -> tuple[ResolvedPrecision, list[tuple[str, str]]]:
    plan = recipe.precision
    part = plan.profiles.get(profile.name) or PartialPrecision()
    key = f"precision.profiles.{profile.name}" if profile.name in plan.profiles else "precision"

    def pick(field: str, default: Any) -> Any:
        for value in (getattr(part, field), getattr(plan, field)):
            if value is not None:
                return value
        return default

    weights = pick("weights", profile.default_precision)
    dynamic = profile.graph_variant == "dynamic"

    def side(field: str, kernel: str) -> str:
        # "same" follows the body weights only where the profile has a kernel for a quantized
        # embedding / lm_head; elsewhere it stays at the activation dtype.
        value = pick(field, "same")
        if value != "same":
            return value
        if not dynamic and field == "embedding" and weights == "int4":
            # A static graph's token table has one scale (Gather keeps its input's scale), and
            # 4-bit codes with one scale for the whole table lose it (tiny-qwen2 w4a16: logits
            # cosine 0.52 with an int4 table, see benchmarks/static_htp.py): "same" is int8.
            return "int8"
        if weights in QUANTIZED and (not dynamic or profile.accepts_op(kernel)):
            return weights
        return "fp16" if profile.activation_dtype == "float16" else "fp32"

    resolved = ResolvedPrecision(
        profile=profile.name,
        weights=weights,
        # A recipe-wide gptq tunes MatMulNBits weights; a static target rounds to nearest (its
        # calibration text tunes the activation scales) unless its own entry says otherwise.
        method=part.method
        or ("rtn" if not dynamic and plan.method == "gptq" else pick("method", "rtn")),
        # A static graph keeps its profile's scales (per-channel) unless its own entry says
        # otherwise: the recipe-wide block_size is a MatMulNBits setting.
        block_size=part.block_size
        if not dynamic and part.block_size
        else pick("block_size", profile.default_block_size)
        if dynamic
        else profile.default_block_size,
        symmetric=pick("symmetric", profile.default_symmetric),
        accuracy_level=pick("accuracy_level", profile.accuracy_level),
        embedding=side("embedding", "com.microsoft::GatherBlockQuantized"),
        lm_head=side("lm_head", "com.microsoft::MatMulNBits"),
        exclude=tuple(pick("exclude", [])),
        overrides=tuple(pick("overrides", [])),
    )
    accepted = profile.weight_precisions
    refused = f"is not accepted by profile {profile.name} ({', '.join(accepted)})"
    problems = [
        (f"{key}.{f}", f"{getattr(resolved, f)} {refused}")
        for f in ("weights", "embedding", "lm_head")
        if getattr(resolved, f) not in accepted
    ]
    problems += [
        (f"{key}.overrides[{i}].weights", f"{rule.weights} {refused}")
        for i, rule in enumerate(resolved.overrides)
        if rule.weights not in accepted
    ]
    if dynamic and resolved.weights in QUANTIZED and resolved.block_size is None:
        problems.append((f"{key}.block_size", "MatMulNBits needs a block size (16..256)"))
    if resolved.method == "hqq" and (resolved.weights != "int4" or not dynamic):
        problems.append(
            (
                f"{key}.method",
                "hqq makes int4 weights with float zero points, which "
                f"only MatMulNBits takes; use rtn or gptq for {profile.name}",
            )
        )
    if not dynamic and resolved.method == "gptq":
        problems.append(
            (
                f"{key}.method",
                f"static QDQ weights of {profile.name} are rounded to nearest (rtn); the "
                "calibration text tunes the activation scales",
            )
        )  # only a profile entry can ask for it: a recipe-wide gptq resolves to rtn here
    if not dynamic and resolved.exclude:
        problems.append(
            (
                f"{key}.exclude",
                f"{profile.name} runs quantized weights only (the HTP has no float MatMul in a "
                "QDQ graph); use an override with int8 instead",
            )
        )
    if recipe.calibration is None and (resolved.method == "gptq" or not dynamic):
        why = "method gptq" if dynamic else f"the static QDQ graph of {profile.name}"
        problems.append(
            (
                "calibration",
                f"{why} needs calibration text; add "
                "calibration: {builtin: mixed} (or {file: ...})",
            )
        )
    return resolved, problems


# ------------------------------------------------------------------------ device profile


def _check_op(value: str) -> str:
    if not _OP.match(value):
        example = "e.g. Add or com.microsoft::MatMulNBits"
        raise ValueError(f"must be 'OpType' or 'domain::OpType' ({example}), got {value!r}")
    return value


def _check_option(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)):
        return value
    raise ValueError(f"must be a string, number or boolean, got {type(value).__name__}")


class ContextSize(Strict):
    """Context window in tokens: what a session allocates by default, and the hard maximum."""

    default: int = Field(ge=16)
    maximum: int = Field(ge=16)

    @model_validator(mode="after")
    def _ordered(self) -> ContextSize:
        if self.default > self.maximum:
            raise ValueError(f"default ({self.default}) exceeds maximum ({self.maximum})")
        return self


class QnnOptions(Strict):
    """QNN / Hexagon knobs the static build and the session need, typed."""

    backend_type: Literal["htp", "cpu"] = "htp"
    soc_model: int = Field(ge=0, description="QNN SoC id: 60 = Snapdragon X Elite (SC8380XP)")
    htp_arch: Literal[68, 69, 73, 75, 79, 81] = Field(description="Hexagon version, e.g. 73")
    htp_performance_mode: Literal[
        "burst", "balanced", "default", "high_performance", "high_power_saver",
        "low_balanced", "low_power_saver", "power_saver", "sustained_high_performance",
    ] = "burst"  # fmt: skip
    activation_quantization: Literal["uint16", "uint8"] = Field(
        "uint16", description="QDQ activation type: w8a16 keeps attention/softmax usable"
    )


class DecoderLayout(Strict):
    """How the dynamic decoder graph is laid out for one execution provider.

    The defaults are the CPU provider's fastest layout; an EP whose kernels need another form
    (DirectML) says so here instead of `if provider == ...` in the exporter.
    """

    rotary: Literal["attention", "node"] = Field(
        "attention",
        description="attention: inside GroupQueryAttention (cos/sin inputs); node: "
        "com.microsoft.RotaryEmbedding on q and k before it",
    )
    qkv: Literal["packed", "separate"] = Field(
        "packed", description="packed: one q/k/v MatMul; separate: three, no Split"
    )
    matmul_bias: Literal["fused", "add"] = Field(
        "fused", description="fused: MatMulNBits' bias input; add: an Add after it"
    )
    fp16_guard: Literal["off", "auto", "always"] = Field(
        "off",
        description="float16 graphs: keep the residual stream, its norms and the sublayers "
        "that would overflow in float32; auto: where fp32 activations measured on "
        "calibration text come near the fp16 range, always: the residual stream always",
    )


class DeviceProfile(Strict):
    """Where an artifact runs: see device_profiles/*.yaml for commented examples."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9.\-]*$")
    description: str
    provider: Provider
    provider_options: dict[str, Annotated[Any, AfterValidator(_check_option)]] = Field(
        default_factory=dict
    )
    package: Literal["onnxruntime", "onnxruntime-directml", "onnxruntime-qnn"]
    graph_variant: Literal["dynamic", "static"]
    activation_dtype: Literal["float32", "float16"]
    default_precision: Precision
    default_block_size: BlockSize | None = None
    default_symmetric: bool = False
    weight_precisions: list[Precision] = Field(min_length=1)
    accuracy_level: int = Field(0, ge=0, le=4)
    context: ContextSize
    prefill_chunk: int | None = Field(None, ge=1)
    kv_capacity: int | None = Field(None, ge=16)
    optimization_level: Literal["disable", "basic", "extended", "layout", "all"] = "all"
    ops: list[Annotated[str, AfterValidator(_check_op)]] = Field(min_length=1)
    tensor_dtypes: list[TensorDtype] = Field(min_length=1)
    qnn: QnnOptions | None = None
    decoder: DecoderLayout = Field(default_factory=DecoderLayout)
    session_config: dict[str, str] = Field(
        default_factory=dict,
        description="SessionOptions config entries (add_session_config_entry), e.g. "
        "ep.dml.enable_graph_capture",
    )
    architecture: Literal["any", "x86_64", "arm64"] = Field(
        "any", description="the CPU architecture the profile targets (any: not tied to one)"
    )

    @model_validator(mode="after")
    def _consistent(self) -> DeviceProfile:
        problems: list[tuple[str, str]] = []
        static = self.graph_variant == "static"
        if static and "decoder" in self.model_fields_set:
            problems.append(("decoder", "only for graph_variant dynamic; remove it"))
        if self.decoder.fp16_guard != "off" and self.activation_dtype != "float16":
            problems.append(
                ("decoder.fp16_guard", "only for activation_dtype float16; set it to off")
            )
        for field in ("prefill_chunk", "kv_capacity"):
            if static and getattr(self, field) is None:
                problems.append((field, "required for graph_variant static"))
            if not static and getattr(self, field) is not None:
                problems.append((field, "only for graph_variant static; remove it"))
        if static and self.prefill_chunk and self.kv_capacity:
            if self.prefill_chunk > self.kv_capacity:
                problems.append(("prefill_chunk", f"exceeds kv_capacity ({self.kv_capacity})"))
            if self.kv_capacity > self.context.maximum:
                problems.append(
                    ("kv_capacity", f"exceeds context.maximum ({self.context.maximum})")
                )
        if not static and self.default_block_size is None:
            problems.append(("default_block_size", "required for graph_variant dynamic"))
        if self.default_precision not in self.weight_precisions:
            accepted = ", ".join(self.weight_precisions)
            problems.append(("default_precision", f"not in weight_precisions ({accepted})"))
        if self.package not in PROVIDER_PACKAGES[self.provider]:
            allowed = " or ".join(PROVIDER_PACKAGES[self.provider])
            problems.append(("package", f"{self.provider} comes with {allowed}"))
        if self.provider == "QNNExecutionProvider" and self.qnn is None:
            problems.append(("qnn", "required for QNNExecutionProvider (soc_model, htp_arch)"))
        if self.provider != "QNNExecutionProvider" and self.qnn is not None:
            problems.append(("qnn", "only for QNNExecutionProvider; remove it"))
        duplicated = sorted(set(QNN_TYPED_KEYS) & set(self.provider_options))
        if self.qnn is not None and duplicated:
            problems.append(("provider_options", f"set {', '.join(duplicated)} under qnn:"))
        if problems:
            raise FieldProblems(problems)
        return self

    def accepts_op(self, op: str, domain: str = "") -> bool:
        """True when the provider accepts `op` (`"Type"`, `"domain::Type"`, or op + domain)."""
        if "::" in op:
            domain, op = op.split("::", 1)
        name = f"{domain}::{op}" if domain not in ("", "ai.onnx") else op
        return name in self.ops

    def session_provider_options(self) -> dict[str, str]:
        """Provider options as ONNX Runtime takes them (all strings), typed knobs included."""
        options = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in
                   self.provider_options.items()}  # fmt: skip
        if self.qnn is not None:
            options.update(
                backend_type=self.qnn.backend_type,
                soc_model=str(self.qnn.soc_model),
                htp_arch=str(self.qnn.htp_arch),
                htp_performance_mode=self.qnn.htp_performance_mode,
            )
        return options


Recipe.model_rebuild()
