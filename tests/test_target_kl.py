"""`precision.target_kl`: groups, one-group plans, the promotion search, and the schema's rule."""

from __future__ import annotations

import pytest

from edgepipe import schema
from edgepipe.build.target_kl import (
    TABLE,
    alone,
    choose_precision,
    extra_bytes,
    promoted,
    weight_groups,
)
from edgepipe.errors import InvalidInput
from edgepipe.schema.precision import ResolvedPrecision
from edgepipe.stages.quantize.plan import QuantPlan
from tests.fixtures.quantize import int4_resolved

CONFIG = {
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "vocab_size": 1000,
}
INT4 = int4_resolved(target_kl=0.02)
RECIPE = """\
name: mine
description: a recipe written in a test
source:
  preset: {name: tiny-qwen2, seed: 0}
targets: [cpu-x64, directml, qnn-htp]
calibration: {builtin: mixed, max_tokens: 64}
precision:
  target_kl: 0.02
"""


def test_groups_are_the_table_and_each_layers_attention_and_mlp():
    groups = {g.name: g for g in weight_groups(CONFIG)}
    assert list(groups) == [
        TABLE, "layers.0.attention", "layers.0.mlp", "layers.1.attention", "layers.1.mlp",
    ]  # fmt: skip
    assert groups[TABLE].params == 1000 * 64
    # q and o: 64 x 64 each; k and v: 64 x 32 each (2 kv heads of 16).
    assert groups["layers.0.attention"].params == 2 * 64 * 64 + 2 * 64 * 32
    assert groups["layers.1.mlp"].params == 3 * 64 * 128
    assert extra_bytes(INT4, groups[TABLE]) == 1000 * 64 // 2


def test_promoted_plan_puts_groups_at_int8_and_the_rest_as_planned():
    groups = {g.name: g for g in weight_groups(CONFIG)}
    plan = QuantPlan.from_resolved(promoted(INT4, [groups[TABLE], groups["layers.1.mlp"]]))
    assert plan.embedding.bits == plan.lm_head.bits == 8
    assert plan.spec_for("model.layers.1.mlp.down_proj.weight").bits == 8
    assert plan.spec_for("model.layers.0.mlp.down_proj.weight").bits == 4
    assert plan.spec_for("model.layers.1.self_attn.q_proj.weight").bits == 4


def test_alone_quantizes_one_group_and_keeps_the_rest_float():
    groups = {g.name: g for g in weight_groups(CONFIG)}
    plan = QuantPlan.from_resolved(alone(INT4, groups["layers.0.attention"], "fp32"))
    assert plan.spec_for("model.layers.0.self_attn.k_proj.weight").bits == 4
    assert plan.spec_for("model.layers.0.mlp.up_proj.weight") is None
    assert plan.embedding is None and plan.lm_head is None
    table = QuantPlan.from_resolved(alone(INT4, groups[TABLE], "fp32"))
    assert table.embedding.bits == 4 and table.default is None


def _additive(costs: dict[str, float]):
    """A fake measurement: each still-4-bit group adds its cost to the KL."""
    calls = []

    def measure(resolved: ResolvedPrecision, text: str) -> dict:
        calls.append(text)
        plan = QuantPlan.from_resolved(resolved)
        kl = 0.0
        for group in weight_groups(CONFIG):
            if group.name == TABLE:
                bits = plan.embedding.bits if plan.embedding else None
            else:
                name = (
                    group.patterns[0]
                    .replace("*", "q_proj.weight")
                    .replace("mlp.q_proj", "mlp.up_proj")
                )
                spec = plan.spec_for(name)
                bits = spec.bits if spec else None
            kl += costs[group.name] if bits == 4 else 0.0
        return {"kl": kl, "top1_agreement": 1.0 - kl}

    return measure, calls


def test_search_promotes_the_most_kl_per_byte_first_until_the_target_is_met():
    costs = {
        TABLE: 0.03, "layers.0.attention": 0.004, "layers.0.mlp": 0.001,
        "layers.1.attention": 0.006, "layers.1.mlp": 0.001,
    }  # fmt: skip
    measure, calls = _additive(costs)
    chosen, record = choose_precision(INT4, CONFIG, measure)
    # KL per extra byte: layer 1's attention 9.8e-7, the table 9.4e-7, layer 0's attention
    # 6.5e-7, the MLPs 8e-8. The excess (0.042 - 0.02) needs the first two; then 0.006 is met.
    assert record["met"] and record["kl"] == pytest.approx(0.006)
    assert record["promoted"] == ["layers.1.attention", TABLE]
    assert chosen.embedding == "int8" and chosen.target_kl is None
    assert calls.count("calibration") == 5
    rows = {row["group"]: row for row in record["groups"]}
    assert rows[TABLE]["kl_alone"] == pytest.approx(0.03) and rows[TABLE]["promoted"]
    assert not rows["layers.0.mlp"]["promoted"]


def test_search_measures_once_when_the_plan_already_meets_the_target():
    measure, calls = _additive({g.name: 0.001 for g in weight_groups(CONFIG)})
    chosen, record = choose_precision(INT4, CONFIG, measure)
    assert calls == ["evaluation"] and record["met"] and record["promoted"] == []
    assert chosen.embedding == "int4"


def test_recipe_wide_target_kl_applies_to_quantized_dynamic_int8_capable_targets(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(RECIPE, encoding="utf-8")
    recipe = schema.load_recipe(path)
    assert recipe.precision_for("cpu-x64").target_kl == 0.02
    assert recipe.precision_for("qnn-htp").target_kl is None  # static: no MatMulNBits groups
    assert recipe.precision_for("directml").target_kl is None  # 4-bit-only MatMulNBits
    path.write_text(RECIPE + "  profiles:\n    qnn-htp: {target_kl: 0.05}\n", encoding="utf-8")
    with pytest.raises(InvalidInput, match="target_kl"):
        schema.load_recipe(path).precision_for("qnn-htp")
