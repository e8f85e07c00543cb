"""Tests for edgepipe.stages.validate.dynamic: the report of validate_model, its references,
its quality block and its thresholds."""

from __future__ import annotations

import numpy as np
import pytest

from edgepipe.errors import InvalidInput
from edgepipe.stages.validate.dynamic import validate_model
from edgepipe.stages.validate.metrics import QUALITY_KEYS, compare_logits
from edgepipe.stages.validate.runner import CPU, DecoderRunner
from tests.fixtures.toy import build_toy_artifact

IDS = [785, 6722, 315, 9625, 374, 12095, 13, 576, 6722, 315, 15344, 374]


@pytest.fixture(scope="module")
def toys(tmp_path_factory, qwen3_tokenizer_dir):
    root = tmp_path_factory.mktemp("toys")
    a = build_toy_artifact(root / "a", qwen3_tokenizer_dir, seed=0)
    b = build_toy_artifact(root / "b", qwen3_tokenizer_dir, seed=1)
    return a / "model.onnx", b / "model.onnx"


def test_different_models_disagree(toys):
    a = DecoderRunner(toys[0]).teacher_forced(IDS)
    b = DecoderRunner(toys[1]).teacher_forced(IDS)
    metrics = compare_logits(a, b, IDS)
    assert metrics["kl"] > 0.1
    assert metrics["top1_agreement"] < 0.5


def test_validate_against_the_same_model_passes_and_reports(toys):
    report = validate_model(
        toys[0],
        IDS,
        provider=CPU,
        reference_model=toys[0],
        thresholds={"max_kl": 1e-6, "min_top1_agreement": 1.0},
        quality=True,
    )
    assert report["passed"], report["failures"]
    assert report["reference"] == "unquantized-export"
    assert report["provider"] == CPU
    quality = report["quality"]
    assert tuple(quality) == QUALITY_KEYS
    assert quality["reference"] == "unquantized-export" and quality["provider"] == CPU
    assert quality["kl"] == pytest.approx(0.0, abs=1e-9) and quality["top1_agreement"] == 1.0
    assert quality["greedy_agreement"] == 1.0 and quality["greedy_exact"] == 1.0
    assert quality["greedy_steps"] == 16 and quality["tokens"] == len(IDS)


def test_quality_of_a_changed_model_is_measured_against_the_unquantized_export(toys):
    # toys[1] stands for the quantized graph: the block measures it against toys[0].
    report = validate_model(toys[1], IDS, provider=CPU, reference_model=toys[0], quality=True)
    expected = compare_logits(
        DecoderRunner(toys[1]).teacher_forced(IDS), DecoderRunner(toys[0]).teacher_forced(IDS), IDS
    )
    quality = report["quality"]
    assert quality["kl"] == pytest.approx(expected["kl"]) and quality["kl"] > 0.1
    assert quality["top1_agreement"] == pytest.approx(expected["top1_agreement"])
    assert quality["kl"] == pytest.approx(report["kl"]), "same reference, same numbers"
    ours = DecoderRunner(toys[1]).greedy(IDS[:12], 16)
    theirs = DecoderRunner(toys[0]).greedy(IDS[:12], 16)
    assert quality["greedy_agreement"] == pytest.approx(np.mean(np.equal(ours, theirs)))


def test_unquantized_build_quality_is_the_validation_comparison_in_the_same_shape(toys):
    report = validate_model(toys[1], IDS, provider=CPU, reference_model=toys[0])
    quality = report["quality"]
    assert tuple(quality) == QUALITY_KEYS
    assert quality["reference"] == report["reference"] == "unquantized-export"
    for key in ("kl", "top1_agreement", "perplexity_ratio", "cosine"):
        assert quality[key] == report[key], key


def test_validate_falls_back_to_cpu_when_provider_is_missing(toys):
    report = validate_model(toys[0], IDS, provider="DmlExecutionProvider", reference_model=toys[0])
    assert report["requested_provider"] == "DmlExecutionProvider"
    assert report["provider"] == CPU and report["quality"]["provider"] == CPU


def test_validate_without_any_reference_is_invalid_input(toys):
    with pytest.raises(InvalidInput, match="no reference"):
        validate_model(toys[0], IDS, provider=CPU)


def test_validate_with_impossible_threshold_fails(toys):
    report = validate_model(
        toys[0],
        IDS,
        provider=CPU,
        reference_model=toys[1],
        thresholds={"max_kl": 0.0},
    )
    assert not report["passed"]
    assert report["failures"][0].startswith("kl = ")


@pytest.fixture(scope="module")
def fp16_pair(tmp_path_factory):
    """The tiny-qwen2 preset exported in float32 and in float16."""
    from edgepipe.arch.presets import write_preset
    from edgepipe.stages.export.dynamic import build_decoder

    root = tmp_path_factory.mktemp("fp16-pair")
    src = write_preset("tiny-qwen2", 0, root / "src", "float32", tokenizer=False)
    for dtype in ("float32", "float16"):
        build_decoder(src, root / dtype, activation_dtype=dtype, context_length=64)
    return root / "float32" / "model.onnx", root / "float16" / "model.onnx"


@pytest.mark.parametrize("bound", [1e-3, 1e-9])
def test_fp16_drift_is_measured_against_the_fp32_export_and_gated(fp16_pair, bound):
    fp32, fp16 = fp16_pair
    report = validate_model(
        fp16, IDS, provider=CPU, reference_model=fp16, fp32_model=fp32,
        thresholds={"max_fp16_kl": bound},
    )  # fmt: skip
    assert report["reference"] == "unquantized-fp32-export"
    assert 0 < report["fp16_kl"] < 1e-4 and report["fp16_top1_agreement"] >= 0.9
    assert report["fp16_kl"] == pytest.approx(report["kl"])  # the artifact is that fp16 graph
    if bound == 1e-3:
        assert report["failures"] == [] and report["passed"]
    else:
        (failure,) = report["failures"]
        assert failure.startswith("fp16_kl = ") and "<= 1e-09" in failure
        assert not report["passed"]
    # No transformers reference here: the quality block measures the fp16 artifact against
    # the float32 export, greedy continuations included.
    assert report["quality"]["reference"] == "unquantized-fp32-export"
    assert report["quality"]["kl"] == report["kl"] and report["quality"]["greedy_steps"] == 16
