"""Tests for edgepipe.stages.quantize (blocks, rtn, plan): packing against ORT's kernels,
methods, plans and errors."""

from __future__ import annotations

import numpy as np
import pytest

from edgepipe import schema
from edgepipe.errors import InvalidInput
from edgepipe.stages.quantize.blocks import (
    METHOD_NAMES,
    QuantSpec,
    from_codes,
    pack_codes,
    pack_zero_points,
    unpack_codes,
    unpack_zero_points,
)
from edgepipe.stages.quantize.plan import (
    METHODS,
    QuantPlan,
    embedding_spec,
    quantize_embedding,
    quantize_weight,
)
from edgepipe.stages.quantize.rtn import quantize_rtn
from tests.fixtures.quantize import gather_session, matmul_nbits_session

BITS = (4, 8)
BLOCKS = (16, 32, 64, 128, 256)


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(1234)


def _rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("block_size", BLOCKS)
@pytest.mark.parametrize("bits", BITS)
def test_rtn_matmul_nbits_equals_numpy_dequantize(bits, block_size, symmetric):
    rng = np.random.default_rng(bits * 1000 + block_size + symmetric)
    k, n = 2 * block_size + 8, 20  # K not a multiple of the block: exercises padding
    w = rng.standard_normal((k, n)).astype(np.float32)
    qw = quantize_weight(w, QuantSpec(bits, block_size, symmetric, "rtn", 0))
    assert qw.packed.shape == (n, 3, block_size * bits // 8)
    assert (qw.zero_points is None) == symmetric
    x = rng.standard_normal((7, k)).astype(np.float32)
    y = matmul_nbits_session(qw).run(None, {"A": x})[0]
    np.testing.assert_allclose(y, x @ qw.dequantize(), rtol=1e-4, atol=1e-4)
    # And the quantization is a real approximation of w, tighter at 8 bits.
    assert _rel_err(qw.dequantize(), w) < (0.2 if bits == 4 else 0.015)


@pytest.mark.parametrize("bits", BITS)
def test_own_packing_reproduces_ort_packing_of_rtn_codes(bits, rng):
    w = rng.standard_normal((96, 10)).astype(np.float32)
    for bs in (16, 32):
        qw = quantize_rtn(w, QuantSpec(bits, bs, False, "rtn"))
        codes = qw.codes()
        np.testing.assert_array_equal(pack_codes(codes, bits, bs), qw.packed)
        zp = qw.zero_point_values()
        np.testing.assert_array_equal(pack_zero_points(zp, bits), qw.zero_points)
        rebuilt = from_codes(codes, qw.scales, zp, 96, bits, bs)
        np.testing.assert_array_equal(rebuilt.dequantize(), qw.dequantize())


def test_pack_roundtrip_with_odd_block_count(rng):
    codes = rng.integers(0, 16, size=(5, 3 * 16)).astype(np.uint8)
    np.testing.assert_array_equal(unpack_codes(pack_codes(codes, 4, 16), 4), codes)
    zp = rng.integers(0, 16, size=(5, 3)).astype(np.uint8)
    packed = pack_zero_points(zp, 4)
    assert packed.shape == (5, 2)
    np.testing.assert_array_equal(unpack_zero_points(packed, 3, 4), zp)


@pytest.mark.parametrize("accuracy_level", [0, 4])
def test_accuracy_levels_0_and_4_both_run_close_to_reference(accuracy_level, rng):
    w = rng.standard_normal((256, 48)).astype(np.float32)
    qw = quantize_weight(w, QuantSpec(4, 32, False, "rtn", accuracy_level))
    x = rng.standard_normal((3, 256)).astype(np.float32)
    y = matmul_nbits_session(qw, accuracy_level).run(None, {"A": x})[0]
    ref = x @ qw.dequantize()
    # Level 4 quantizes activations to int8 per block, so only approximately equal.
    assert _rel_err(y, ref) < (1e-5 if accuracy_level == 0 else 2e-2)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", BITS)
def test_gather_block_quantized_returns_dequantized_rows(bits, symmetric, rng):
    table = rng.standard_normal((50, 96)).astype(np.float32)  # 3 blocks: odd zero-point tail
    qw = quantize_embedding(table, QuantSpec(bits, 32, symmetric, "rtn"))
    assert (qw.K, qw.N) == (96, 50)
    ids = np.array([0, 7, 49, 7], dtype=np.int64)
    rows = gather_session(qw).run(None, {"I": ids})[0]
    np.testing.assert_allclose(rows, qw.dequantize().T[ids], rtol=1e-6, atol=1e-6)
    # The same copy serves the tied lm_head: MatMulNBits over hidden gives logits.
    h = rng.standard_normal((2, 96)).astype(np.float32)
    logits = matmul_nbits_session(qw).run(None, {"A": h})[0]
    np.testing.assert_allclose(logits, h @ qw.dequantize(), rtol=1e-4, atol=1e-4)


def test_embedding_block_shrinks_to_divide_hidden_and_rejects_odd_widths(rng):
    table = rng.standard_normal((8, 896)).astype(np.float32)  # Qwen2.5-0.5B: 896 = 7 x 128
    qw = quantize_embedding(table, QuantSpec(4, 256))
    assert qw.block_size == 128 and qw.gather_data().shape == (8, 448)
    assert embedding_spec(QuantSpec(4, 256, method="gptq"), 896) == QuantSpec(4, 128)
    assert quantize_embedding(table, QuantSpec(4, 32)).block_size == 32
    with pytest.raises(InvalidInput, match="embedding: fp16"):
        quantize_embedding(rng.standard_normal((8, 40)).astype(np.float32), QuantSpec(4, 32))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"bits": 3}, "bits"),
        ({"bits": 2}, "bits"),
        ({"block_size": 48}, "block_size"),
        ({"block_size": 8}, "block_size"),
        ({"block_size": 512}, "block_size"),
        ({"method": "awq"}, "method"),
        ({"accuracy_level": 5}, "accuracy_level"),
        ({"method": "hqq", "symmetric": True}, "symmetric"),
    ],
)
def test_bad_spec_raises_naming_field_and_allowed_values(kwargs, field):
    with pytest.raises(InvalidInput, match=field) as info:
        QuantSpec(**kwargs)
    assert "allowed values" in str(info.value) or "set symmetric" in str(info.value)


def test_quantize_weight_rejects_non_matrix_and_nan():
    with pytest.raises(InvalidInput, match="2-D"):
        quantize_weight(np.zeros(16, np.float32), QuantSpec())
    w = np.ones((32, 4), np.float32)
    w[3, 1] = np.nan
    with pytest.raises(InvalidInput, match="NaN"):
        quantize_weight(w, QuantSpec(), name="model.layers.0.mlp.up_proj.weight")


def test_gptq_without_calibration_raises():
    with pytest.raises(InvalidInput, match="calibration"):
        quantize_weight(np.ones((32, 4), np.float32), QuantSpec(method="gptq"), name="w")


def test_every_registered_method_runs(rng):
    w = rng.standard_normal((64, 8)).astype(np.float32)
    x = rng.standard_normal((128, 64)).astype(np.float32)
    for method in METHODS:
        qw = quantize_weight(w, QuantSpec(4, 32, False, method), calibration=x)
        assert qw.dequantize().shape == w.shape
        assert _rel_err(qw.dequantize(), w) < 0.2


NAMES = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.q_proj.bias",
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.mlp.down_proj.weight",
    "model.layers.1.mlp.down_proj.weight",
    "lm_head.weight",
]


def test_plan_resolves_exclude_overrides_embedding_and_lm_head():
    plan = QuantPlan.from_precision(
        "int4",
        block_size=32,
        embedding="int8",
        exclude=["model.layers.1.*"],
        overrides=[("*.down_proj.weight", "int8", 64), ("model.layers.0.mlp.*", "fp16", None)],
    )
    assert plan.spec_for("model.layers.0.self_attn.q_proj.weight") == QuantSpec(4, 32, False)
    assert plan.spec_for("model.layers.0.self_attn.q_proj.bias") is None
    assert plan.spec_for("model.layers.0.input_layernorm.weight") is None
    assert plan.spec_for("model.layers.1.mlp.down_proj.weight") is None  # excluded
    assert plan.spec_for("model.layers.0.mlp.down_proj.weight") == QuantSpec(
        8, 64, False
    )  # first wins
    assert plan.spec_for("model.layers.2.mlp.down_proj.weight") == QuantSpec(8, 64, False)
    assert plan.spec_for("model.embed_tokens.weight") == QuantSpec(8, 32, False)
    assert plan.spec_for("lm_head.weight") == QuantSpec(8, 32, False)  # follows the embedding
    plan.check_patterns(NAMES)


def test_plan_fp16_and_int8_plans():
    assert not QuantPlan.from_precision("fp16").is_quantized
    assert QuantPlan.from_precision("fp32").spec_for("lm_head.weight") is None
    plan = QuantPlan.from_precision("int8", symmetric=True, accuracy_level=4)
    assert plan.spec_for("model.layers.0.mlp.down_proj.weight") == QuantSpec(8, 32, True, "rtn", 4)


def test_plan_pattern_matching_nothing_is_reported_with_its_field():
    plan = QuantPlan.from_precision(
        "int4",
        exclude=["model.layers.*.mlp.gate.weight"],
        overrides=[("*.o_proj.weight", "int8", 32)],
    )
    with pytest.raises(InvalidInput) as info:
        plan.check_patterns(NAMES)
    assert len(info.value.problems) == 2
    assert "precision.exclude[0]" in info.value.problems[0]
    assert "precision.overrides[0].pattern" in info.value.problems[1]


def test_plan_takes_the_resolved_precision_of_a_recipe_as_is():
    recipe = schema.load_recipe("qwen3-0.6b")
    resolved = recipe.precision_for("cpu-x64")
    plan = QuantPlan.from_resolved(resolved)
    bits = {"int4": 4, "int8": 8}
    body = plan.spec_for("model.layers.0.mlp.up_proj.weight")
    assert (body.bits, body.block_size) == (bits[resolved.weights], resolved.block_size)
    assert (body.symmetric, body.method) == (resolved.symmetric, resolved.method)
    assert body.accuracy_level == resolved.accuracy_level
    assert plan.spec_for("lm_head.weight").bits == bits[resolved.lm_head]


def test_plan_overrides_follow_the_schema_order_first_match_wins():
    resolved = schema.ResolvedPrecision(
        profile="p", weights="int4", method="rtn", block_size=32, symmetric=False,
        accuracy_level=0, embedding="int4", lm_head="int4",
        overrides=(
            schema.Override(pattern="*down_proj*", weights="int8"),
            schema.Override(pattern="*proj*", weights="fp16"),
        ),
    )  # fmt: skip
    plan = QuantPlan.from_resolved(resolved)
    for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.up_proj.weight"):
        want = resolved.for_weight(name)
        got = plan.spec_for(name)
        assert (None if got is None else (f"int{got.bits}", got.block_size)) == (
            None if want[0] == "fp16" else want
        )


def test_static_precision_is_not_a_matmul_nbits_plan():
    resolved = schema.load_recipe("qwen3-0.6b").precision_for("qnn-htp")
    with pytest.raises(ValueError, match="block size"):
        QuantPlan.from_resolved(resolved)


def test_gptq_plan_needs_calibration():
    plan = QuantPlan.from_precision("int4", method="gptq")
    assert plan.needs_calibration
    assert plan.spec_for("model.embed_tokens.weight").method == "rtn"
    assert not QuantPlan.from_precision("int4", method="hqq").needs_calibration
    assert not QuantPlan.from_precision("int4").needs_calibration


def test_registered_methods_are_the_schema_methods_and_documented():
    import typing
    from pathlib import Path

    from edgepipe.schema.common import Method

    assert set(typing.get_args(Method)) == set(METHODS) == set(METHOD_NAMES)
    contracts = (Path(__file__).parents[1] / "docs" / "contracts.md").read_text()
    for name in METHODS:
        assert name in contracts


def test_plan_float_zero_points_apply_to_hqq_body_weights_only():
    plan = QuantPlan.from_precision("int4", method="hqq", float_zero_points=True)
    assert plan.spec_for("model.layers.0.mlp.up_proj.weight").float_zero_points
    assert not plan.spec_for("model.embed_tokens.weight").float_zero_points
    with pytest.raises(InvalidInput, match=r"precision\.float_zero_points"):
        QuantPlan.from_precision("int4", method="rtn", float_zero_points=True)


def test_a_tied_model_plan_gives_both_sides_the_more_precise_table_spec():
    plan = QuantPlan.from_precision("int4", embedding="int4", lm_head="int8")
    tied = plan.for_model(True)
    assert tied.embedding == tied.lm_head == plan.lm_head
    assert plan.for_model(False) == plan
    float_head = QuantPlan.from_precision("int4", embedding="int4", lm_head="fp32").for_model(True)
    assert float_head.embedding is None and float_head.lm_head is None
    # No quantized gather (a float embedding): the head keeps its own quantized copy.
    copy = QuantPlan.from_precision("int4", embedding="fp16", lm_head="int4")
    assert copy.for_model(True) == copy
