"""`precision.target_kl`: find the smallest promotion of weight groups that meets a KL target.

A quantized model's error comes from a few places more than others (on a small tied model, the
4-bit token table shared with the head). The search measures that instead of guessing:

1. **groups**: the token table (embedding + tied lm_head), and for each layer its attention
   projections (q, k, v, o) and its MLP projections (gate, up, down) (`weight_groups`);
2. **sensitivity**: the KL of the output, on the calibration text, when that group *alone* is
   quantized at the build's precision and everything else stays float (`alone`);
3. **promotion**: groups go to int8 (same block size) in order of sensitivity per extra byte,
   cheapest first, until the evaluation KL of the whole build meets the target (`promoted`).
   Each step promotes as many groups as their summed sensitivities suggest are needed, then
   measures the real KL: sensitivities do not add up exactly.

The result is an ordinary `ResolvedPrecision` (int8 overrides, an int8 table), so the export
stage builds it like any recipe's plan, and the manifest's `target_kl` block records the plan,
each group's sensitivity and every measured step. Measuring is the caller's (`Measure`): the
dynamic build exports a plan with its cached export step and compares its logits with the
unquantized export's through the one runner and the one metrics module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from edgepipe.schema.precision import Override, ResolvedPrecision, tied_table

#: `Measure(resolved, text)` -> the `compare_logits` metrics of the plan's export against the
#: unquantized export on `text` ("calibration" or "evaluation").
Measure = Callable[[ResolvedPrecision, str], Mapping]

TABLE = "table"
_BITS = {"int4": 4, "int8": 8}


@dataclass(frozen=True)
class WeightGroup:
    """Weights promoted together.

    Attributes:
        name: `table`, `layers.{i}.attention` or `layers.{i}.mlp`.
        patterns: fnmatch patterns of its HF weight names (empty for the table, which the
            `embedding` / `lm_head` fields govern).
        params: its weight count (the table counted once: a tied head shares it).
    """

    name: str
    patterns: tuple[str, ...]
    params: int


def weight_groups(config: Mapping) -> list[WeightGroup]:
    """The promotable groups of a Qwen model from its `config.json`."""
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads", heads))
    head_dim = int(config.get("head_dim") or hidden // heads)
    inter = int(config["intermediate_size"])
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    groups = [WeightGroup(TABLE, (), int(config["vocab_size"]) * hidden)]
    for i in range(int(config["num_hidden_layers"])):
        prefix = f"model.layers.{i}"
        groups.append(WeightGroup(f"layers.{i}.attention", (f"{prefix}.self_attn.*",), attention))
        groups.append(WeightGroup(f"layers.{i}.mlp", (f"{prefix}.mlp.*",), 3 * hidden * inter))
    return groups


def _precision_of(resolved: ResolvedPrecision, group: WeightGroup) -> str:
    if group.name == TABLE:
        # A tied model stores one table at the schema's rule; a model with two tables (a float
        # gather, a quantized head) counts its head, the one the promotion can change.
        return tied_table(resolved.embedding, resolved.lm_head) or resolved.lm_head
    return resolved.weights


def extra_bytes(resolved: ResolvedPrecision, group: WeightGroup) -> int:
    """Bytes promoting `group` to int8 adds (0 when it is not 4-bit: nothing to promote)."""
    bits = _BITS.get(_precision_of(resolved, group))
    return group.params * (8 - bits) // 8 if bits == 4 else 0


def promoted(resolved: ResolvedPrecision, groups: list[WeightGroup]) -> ResolvedPrecision:
    """`resolved` with `groups` at int8: the table through `embedding`/`lm_head`, layer groups
    through overrides placed before the recipe's own (the first matching override wins)."""
    update: dict = {"target_kl": None}
    rules = [
        Override(pattern=p, weights="int8", block_size=resolved.block_size)
        for g in groups
        for p in g.patterns
    ]
    if rules:
        update["overrides"] = (*rules, *resolved.overrides)
    if any(g.name == TABLE for g in groups):
        update["embedding"] = update["lm_head"] = "int8"
    return resolved.model_copy(update=update)


def alone(resolved: ResolvedPrecision, group: WeightGroup, float_weights: str) -> ResolvedPrecision:
    """Only `group` quantized (at `resolved`'s precision), every other weight in float."""
    side = _precision_of(resolved, group) if group.name == TABLE else float_weights
    rules = tuple(
        Override(pattern=p, weights=resolved.weights, block_size=resolved.block_size)
        for p in group.patterns
    )
    return resolved.model_copy(
        update={
            "weights": float_weights,
            "embedding": side,
            "lm_head": side,
            "exclude": (),
            "overrides": rules,
            "target_kl": None,
        }
    )


def choose_precision(
    resolved: ResolvedPrecision,
    config: Mapping,
    measure: Measure,
    *,
    float_weights: str = "fp32",
    report: Callable[[str], None] = lambda message: None,
) -> tuple[ResolvedPrecision, dict]:
    """The cheapest promotion of `resolved` whose evaluation KL meets `resolved.target_kl`.

    Args:
        resolved: the build's precision, with `target_kl` set.
        config: the source model's `config.json`.
        measure: measures one plan (see `Measure`).
        float_weights: the float precision of the groups left unquantized while one group's
            sensitivity is measured (the activation dtype's).
        report: progress lines.

    Returns:
        (the chosen precision, the manifest's `target_kl` record: `target`, `met`, `kl`,
        `top1_agreement`, `promoted`, `extra_bytes`, `steps` (each measured plan) and `groups`
        (each group's params, sensitivity and cost)). When every group is promoted and the
        target is still missed, the record says `met: false` and the build goes on: the
        recipe's gates decide.
    """
    target = float(resolved.target_kl)
    base = dict(measure(resolved, "evaluation"))
    steps = [{"promoted": [], "kl": base["kl"], "top1_agreement": base["top1_agreement"]}]
    record = {"target": target, "groups": None}
    chosen: list[WeightGroup] = []
    last = base
    if base["kl"] > target:
        candidates = [g for g in weight_groups(config) if extra_bytes(resolved, g) > 0]
        sensitivity = {}
        for i, group in enumerate(candidates):
            report(f"target_kl: sensitivity {i + 1}/{len(candidates)} ({group.name})")
            sensitivity[group.name] = dict(
                measure(alone(resolved, group, float_weights), "calibration")
            )
        record["groups"] = _group_rows(resolved, candidates, sensitivity)
        order = sorted(candidates, key=lambda g: -_per_byte(resolved, g, sensitivity))
        while last["kl"] > target and order:
            batch = _next_batch(order, sensitivity, last["kl"] - target)
            chosen += batch
            report(f"target_kl: promoting {', '.join(g.name for g in batch)} to int8")
            last = dict(measure(promoted(resolved, chosen), "evaluation"))
            steps.append(
                {
                    "promoted": [g.name for g in batch],
                    "kl": last["kl"],
                    "top1_agreement": last["top1_agreement"],
                }
            )
        for row in record["groups"]:
            row["promoted"] = row["group"] in {g.name for g in chosen}
    record.update(
        met=last["kl"] <= target,
        kl=last["kl"],
        top1_agreement=last["top1_agreement"],
        promoted=[g.name for g in chosen],
        extra_bytes=sum(extra_bytes(resolved, g) for g in chosen),
        steps=steps,
    )
    return promoted(resolved, chosen), record


def _per_byte(resolved: ResolvedPrecision, group: WeightGroup, sensitivity: Mapping) -> float:
    return sensitivity[group.name]["kl"] / extra_bytes(resolved, group)


def _next_batch(order: list[WeightGroup], sensitivity: Mapping, excess: float) -> list:
    """Pop groups off `order` until their summed sensitivities cover `excess` (at least one)."""
    batch = [order.pop(0)]
    while order and sum(sensitivity[g.name]["kl"] for g in batch) < excess:
        batch.append(order.pop(0))
    return batch


def _group_rows(resolved: ResolvedPrecision, groups: list, sensitivity: Mapping) -> list[dict]:
    """One row per group for the manifest and the quality report, most sensitive first."""
    rows = [
        {
            "group": g.name,
            "params": g.params,
            "precision": _precision_of(resolved, g),
            "kl_alone": sensitivity[g.name]["kl"],
            "top1_alone": sensitivity[g.name]["top1_agreement"],
            "extra_bytes_int8": extra_bytes(resolved, g),
            "kl_per_mib": sensitivity[g.name]["kl"] / extra_bytes(resolved, g) * 2**20,
        }
        for g in groups
    ]
    return sorted(rows, key=lambda row: -row["kl_alone"])
