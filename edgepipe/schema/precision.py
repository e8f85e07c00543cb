"""THE precision resolver: a recipe's precision plan × a device profile → `ResolvedPrecision`.

Every stage takes the precision of a build from here (`Recipe.precision_for(profile)`, which
calls `resolve_precision`); the quantizer consumes the result as is
(`edgepipe.stages.quantize.plan.QuantPlan.from_resolved`). Nothing else merges precision
fields. Merge order, per field: the profile's entry in the recipe (`precision.profiles.<name>`),
then the recipe's plan, then the profile's defaults. For one weight, `exclude` wins, then the
FIRST matching override (docs/contracts.md).

A model whose lm_head is its token embedding (every shipped Qwen model) has one table for two
uses; `tied_table` is the rule that settles its precision, and `ResolvedPrecision.for_model`
applies it once the model's config is known, so the manifest records what the graph holds.
"""

from __future__ import annotations

import fnmatch
from typing import Any

from pydantic import ConfigDict, Field

from edgepipe.schema.common import QUANTIZED, BlockSize, Method, Precision, SidePrecision, Strict
from edgepipe.schema.profile import DeviceProfile

# The kernels a quantized embedding / lm_head needs in a dynamic graph.
_SIDE_KERNELS = {
    "embedding": "com.microsoft::GatherBlockQuantized",
    "lm_head": "com.microsoft::MatMulNBits",
}


# Least to most precise: a tied table takes the more precise of its two uses.
_PRECISION_ORDER = ("int4", "int8", "fp16", "fp32")


def tied_table(embedding: Precision, lm_head: Precision) -> Precision | None:
    """THE rule for a tied model (lm_head = embedding): the precision of its one table.

    The table serves the gather and the head at the more precise of `embedding` and `lm_head`
    (int4 < int8 < fp16 < fp32): a recipe's `lm_head: int8` with `embedding: int4` gives one
    8-bit table, read by GatherBlockQuantized and by the lm_head's MatMulNBits. Why one 8-bit
    table rather than a 4-bit table plus a separate 8-bit head, measured on the Qwen2.5-0.5B
    shape (int4 body, block 32, asymmetric, as `edgepipe build` ships it for cpu-x64):
    388 MB vs 475 MB (4-bit head: 317 MB), decode 1.01x vs 1.00x the 4-bit head's tok/s
    (alternated runs, accuracy_level 4, a busy 2-core machine: within noise); the head is the
    same, and the embedding is 8-bit too (tiny-trained, 512 held-out stdlib tokens, KL vs fp32
    / top-1 agreement: 4-bit table 0.0047 / 0.941, 4-bit table + 8-bit head 0.0017 / 0.971,
    one 8-bit table 0.0005 / 0.988).

    Returns:
        The shared table's precision, or None when the model keeps two tables: a float
        embedding with a quantized head (a profile without GatherBlockQuantized, e.g.
        DirectML) gathers from the float table and multiplies by a quantized copy, since
        promoting the head to float would read 4-8x more bytes per decoded token.
    """
    if embedding not in QUANTIZED and lm_head in QUANTIZED:
        return None
    return max(embedding, lm_head, key=_PRECISION_ORDER.index)


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
    # A quality target, in nats per token of KL(unquantized || built) on the evaluation text:
    # the build measures how much each weight group (the token table, each layer's attention,
    # each layer's MLP) costs alone and moves the costliest per extra byte to int8 until the
    # target is met. Lower: closer to the float model, larger file, longer build (one export
    # per group plus one per step). None: quantize as planned, no search.
    target_kl: float | None = Field(None, gt=0, le=10)


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
    `embedding` and `lm_head` never hold "same". `tied` is None until `for_model` applied the
    model's tie: then True when one table serves the embedding and the lm_head (both fields
    equal, see `tied_table`), False when each has its own.
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
    target_kl: float | None = None
    tied: bool | None = None

    def for_model(self, tie_word_embeddings: bool, graph_variant: str) -> ResolvedPrecision:
        """This precision as a model with (or without) a tied lm_head gets it.

        Args:
            tie_word_embeddings: the model's config.json field of that name.
            graph_variant: the profile's graph variant. A dynamic graph shares one table by
                `tied_table`; a static (QDQ) graph always stores two (its Gather needs one
                scale for the table, its lm_head one per row), each at its own precision.
        """
        table = tied_table(self.embedding, self.lm_head) if tie_word_embeddings else None
        if table is None or graph_variant != "dynamic":
            return self.model_copy(update={"tied": False})
        return self.model_copy(update={"tied": True, "embedding": table, "lm_head": table})

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


def resolve_precision(
    plan: PrecisionPlan, profile: DeviceProfile, *, has_calibration: bool
) -> tuple[ResolvedPrecision, list[tuple[str, str]]]:
    """Merge a recipe's precision plan for one profile, and check that the result fits it.

    Args:
        plan: the recipe's `precision` block.
        profile: the target profile.
        has_calibration: whether the recipe has calibration text.

    Returns:
        The resolved precision, and every problem as `(field path, message)` (empty when the
        plan fits the profile). Field paths point at the recipe section that chose the value.
    """
    resolved = _merge(plan, profile)
    return resolved, _problems(plan, profile, resolved, has_calibration)


def _merge(plan: PrecisionPlan, profile: DeviceProfile) -> ResolvedPrecision:
    part = plan.profiles.get(profile.name) or PartialPrecision()
    dynamic = profile.graph_variant == "dynamic"

    def pick(field: str, default: Any) -> Any:
        for value in (getattr(part, field), getattr(plan, field)):
            if value is not None:
                return value
        return default

    weights = pick("weights", profile.default_precision)
    if dynamic:
        block_size = pick("block_size", profile.default_block_size)
        method = pick("method", "rtn")
    else:
        # A static graph keeps its profile's scales (per-channel) unless its own entry says
        # otherwise: the recipe-wide block_size is a MatMulNBits setting.
        block_size = part.block_size or profile.default_block_size
        # A recipe-wide gptq tunes MatMulNBits weights; a static target rounds to nearest (its
        # calibration text tunes the activation scales) unless its own entry says otherwise.
        method = part.method or ("rtn" if plan.method == "gptq" else pick("method", "rtn"))
    return ResolvedPrecision(
        profile=profile.name,
        weights=weights,
        method=method,
        block_size=block_size,
        symmetric=pick("symmetric", profile.default_symmetric),
        accuracy_level=pick("accuracy_level", profile.accuracy_level),
        embedding=_side(pick("embedding", "same"), "embedding", weights, profile),
        lm_head=_side(pick("lm_head", "same"), "lm_head", weights, profile),
        exclude=tuple(pick("exclude", [])),
        overrides=tuple(pick("overrides", [])),
        # Groups are promoted to int8 MatMulNBits: a recipe-wide target applies only to
        # quantized dynamic targets that take int8 (not static graphs, float builds, or
        # DirectML's 4-bit-only MatMulNBits); a target's own entry is checked instead.
        target_kl=pick("target_kl", None) if _promotable(weights, profile) else part.target_kl,
    )


def _promotable(weights: str, profile: DeviceProfile) -> bool:
    return (
        profile.graph_variant == "dynamic"
        and weights in QUANTIZED
        and "int8" in profile.weight_precisions
    )


def _side(value: str, field: str, weights: str, profile: DeviceProfile) -> str:
    # "same" follows the body weights only where the profile has a kernel for a quantized
    # embedding / lm_head; elsewhere it stays at the activation dtype.
    if value != "same":
        return value
    dynamic = profile.graph_variant == "dynamic"
    if not dynamic and field == "embedding" and weights == "int4":
        # A static graph's token table has one scale (Gather keeps its input's scale), and
        # 4-bit codes with one scale for the whole table lose it (tiny-qwen2 w4a16: logits
        # cosine 0.52 with an int4 table, see benchmarks/static_htp.py): "same" is int8.
        return "int8"
    if weights in QUANTIZED and (not dynamic or profile.accepts_op(_SIDE_KERNELS[field])):
        return weights
    return "fp16" if profile.activation_dtype == "float16" else "fp32"


def _problems(
    plan: PrecisionPlan,
    profile: DeviceProfile,
    resolved: ResolvedPrecision,
    has_calibration: bool,
) -> list[tuple[str, str]]:
    key = f"precision.profiles.{profile.name}" if profile.name in plan.profiles else "precision"
    dynamic = profile.graph_variant == "dynamic"
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
    problems += _method_problems(key, profile, resolved)
    if resolved.target_kl is not None and not _promotable(resolved.weights, profile):
        message = (
            "target_kl promotes weight groups of a quantized dynamic build to int8 MatMulNBits; "
            f"{profile.name} builds {resolved.weights} {profile.graph_variant} graphs: remove it "
            "from this target's entry"
        )
        problems.append((f"{key}.target_kl", message))
    if not dynamic and resolved.exclude:
        message = (
            f"{profile.name} runs quantized weights only (the HTP has no float MatMul in a "
            "QDQ graph); use an override with int8 instead"
        )
        problems.append((f"{key}.exclude", message))
    if not has_calibration and (resolved.method == "gptq" or not dynamic):
        why = "method gptq" if dynamic else f"the static QDQ graph of {profile.name}"
        message = (
            f"{why} needs calibration text; add calibration: {{builtin: mixed}} (or {{file: ...}})"
        )
        problems.append(("calibration", message))
    return problems


def _method_problems(
    key: str, profile: DeviceProfile, resolved: ResolvedPrecision
) -> list[tuple[str, str]]:
    dynamic = profile.graph_variant == "dynamic"
    if resolved.method == "hqq" and (resolved.weights != "int4" or not dynamic):
        message = (
            "hqq makes int4 weights with float zero points, which only MatMulNBits takes; "
            f"use rtn or gptq for {profile.name}"
        )
        return [(f"{key}.method", message)]
    if resolved.method == "hqq" and resolved.symmetric:
        message = (
            "hqq optimizes a zero point per block, so it is asymmetric only; set symmetric: "
            "false or use method rtn/gptq"
        )
        return [(f"{key}.symmetric", message)]
    if not dynamic and resolved.method == "gptq":
        # Only a profile entry can ask for it: a recipe-wide gptq resolves to rtn here.
        message = (
            f"static QDQ weights of {profile.name} are rounded to nearest (rtn); the "
            "calibration text tunes the activation scales"
        )
        return [(f"{key}.method", message)]
    return []
