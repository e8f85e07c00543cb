"""The fp16 overflow guard: activation maxima, the guard plan, and guarded float16 graphs that
match float32 where unguarded ones turn to inf/NaN (models engineered to overflow fp16)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgepipe.errors import InvalidInput
from edgepipe.formats.safetensors import SafetensorsModel
from edgepipe.stages.export.dynamic import build_decoder
from edgepipe.stages.export.fp16guard import (
    FP16_MAX,
    Fp16Guard,
    activation_maxima,
    guard_casts,
    guard_report,
    plan_guard,
)
from edgepipe.stages.quantize.gptq_inputs import LayerCalibrator
from edgepipe.stages.quantize.plan import QuantPlan
from edgepipe.stages.validate.metrics import compare_logits
from edgepipe.stages.validate.runner import DecoderRunner

IDS = [9707, 11, 1246, 525, 498, 30, 151645, 198, 40, 1079, 264, 1661, 13, 785, 3974, 17] * 3
# The DirectML layout (device_profiles/directml.yaml), int4 like the profile's default.
DML = {"rotary_in_attention": False, "packed_qkv": False, "fused_bias": False}
INT4 = QuantPlan.from_precision(
    "int4", block_size=32, symmetric=False, accuracy_level=0, embedding="fp16", lm_head="int4"
)


def export(model_dir: Path, out: Path, dtype: str, guard=None, quant=None) -> Path:
    build_decoder(
        model_dir, out, activation_dtype=dtype, quant=quant, context_length=256,
        fp16_guard=guard, **DML,
    )  # fmt: skip
    return out / "model.onnx"


def logits(model: Path) -> np.ndarray:
    return DecoderRunner(model).teacher_forced(IDS)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    from edgepipe.arch.presets import write_preset

    work = tmp_path_factory.mktemp("guard-tiny")
    src = write_preset("tiny-qwen2", 0, work / "src", "float32", tokenizer=False)
    return {
        "src": src,
        "fp32": export(src, work / "fp32", "float32"),
        "fp16": export(src, work / "fp16", "float16"),
    }


def test_maxima_match_the_numpy_reference_forward(tiny):
    measured = activation_maxima(tiny["fp32"], IDS)
    weights = SafetensorsModel(tiny["src"])
    config = json.loads((tiny["src"] / "config.json").read_text())
    table = weights.read("model.embed_tokens.weight")
    unique, remapped = np.unique(IDS, return_inverse=True)  # only the rows the ids use
    calib = LayerCalibrator(config, table[unique], remapped)
    for site in measured:
        names = [n for n in weights.names() if n.startswith(f"model.layers.{site.layer}.")]
        acts = calib.advance({n: weights.read(n) for n in names})
        assert site.mlp_act == pytest.approx(np.abs(acts.down_proj_in).max(), rel=1e-4)
        # `residual` is the larger of the stream inside and after the layer.
        assert site.residual >= np.abs(acts.hidden_out).max() * (1 - 1e-4)


def test_guard_stays_off_on_a_model_far_from_the_fp16_range(tiny):
    fp32, fp16 = activation_maxima(tiny["fp32"], IDS), activation_maxima(tiny["fp16"], IDS)
    assert max(m.residual for m in fp32) < 100  # tiny-qwen2: ~30
    assert not plan_guard(fp32, "auto").active
    assert guard_casts(tiny["fp16"]) == 0
    for a, b in zip(fp32, fp16, strict=True):
        assert b.residual == pytest.approx(a.residual, rel=1e-2)
        assert b.mlp == pytest.approx(a.mlp, rel=1e-2)
    report = guard_report(fp32, fp16, Fp16Guard(), "auto", 0)
    assert report["fp16_finite"] and len(report["layers"]) == 2


def test_always_policy_keeps_the_residual_in_fp32_and_matches(tiny, tmp_path):
    guard = plan_guard(activation_maxima(tiny["fp32"], IDS), "always")
    assert guard == Fp16Guard(residual=True)
    guarded = export(tiny["src"], tmp_path, "float16", guard)
    # Embedding up, each layer's 2 norms' outputs down and 2 sublayer outputs up, final down.
    assert guard_casts(guarded) == 2 + 4 * 2
    drift = compare_logits(logits(guarded), logits(tiny["fp32"]), IDS)
    assert drift["kl"] < 1e-4


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("mlp", Fp16Guard(residual=True, fp32_mlp=(0,))),
        ("residual", Fp16Guard(residual=True, fp32_attention=(0,), fp32_mlp=(0,))),
    ],
)
def test_guard_fixes_a_model_engineered_to_overflow_fp16(
    kind, expected, overflow_model_dir, tmp_path
):
    src = overflow_model_dir(kind)
    fp32 = export(src, tmp_path / "fp32", "float32")
    maxima = activation_maxima(fp32, IDS)
    assert max(m.residual for m in maxima) > FP16_MAX  # the residual stream leaves fp16 range
    if kind == "residual":  # ...while no single sublayer output does
        assert max(max(m.attention, m.mlp) for m in maxima) < FP16_MAX
    guard = plan_guard(maxima, "auto")
    assert guard == expected
    reference = logits(fp32)

    unguarded = logits(export(src, tmp_path / "plain", "float16"))
    assert not np.isfinite(unguarded).all()
    guarded_model = export(src, tmp_path / "guarded", "float16", guard)
    guarded = logits(guarded_model)
    assert np.isfinite(guarded).all()
    drift = compare_logits(guarded, reference, IDS)
    assert drift["kl"] < 1e-3 and drift["top1_agreement"] >= 0.95
    assert all(np.isfinite(m.residual) for m in activation_maxima(guarded_model, IDS))


def test_residual_alone_is_what_the_residual_overflow_needs(overflow_model_dir, tmp_path):
    src = overflow_model_dir("residual")
    reference = logits(export(src, tmp_path / "fp32", "float32"))
    guarded = logits(export(src, tmp_path / "guarded", "float16", Fp16Guard(residual=True)))
    assert compare_logits(guarded, reference, IDS)["kl"] < 1e-3


def test_guard_composes_with_int4_weights(overflow_model_dir, tmp_path):
    src = overflow_model_dir("mlp")
    fp32 = export(src, tmp_path / "fp32", "float32", quant=INT4)
    guard = plan_guard(activation_maxima(fp32, IDS), "auto")
    assert guard.fp32_mlp == (0,)
    # The fp32 MLP's MatMulNBits keep fp32 scales in the fp16 graph.
    unguarded = logits(export(src, tmp_path / "plain", "float16", quant=INT4))
    guarded = logits(export(src, tmp_path / "guarded", "float16", guard, quant=INT4))
    assert not np.isfinite(unguarded).all()
    assert compare_logits(guarded, logits(fp32), IDS)["kl"] < 1e-3


def test_fp32_sublayers_need_a_fp32_residual():
    with pytest.raises(InvalidInput, match="residual=True"):
        Fp16Guard(fp32_mlp=(0,))


def test_unknown_policy_is_refused():
    with pytest.raises(InvalidInput, match="off, auto, always"):
        plan_guard([], "sometimes")


def test_nan_maxima_count_as_overflow():
    from edgepipe.stages.export.fp16guard import LayerMaxima

    guard = plan_guard([LayerMaxima(0, attention=1.0, mlp_act=1.0, mlp=float("nan"))], "auto")
    assert guard == Fp16Guard(residual=True, fp32_mlp=(0,))
