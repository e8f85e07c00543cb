"""Tests for edgepipe.stages.validate.dynamic: teacher-forced runs, metrics, thresholds, the report."""

from __future__ import annotations

import numpy as np
import pytest

from edgepipe.errors import InvalidInput
from edgepipe.stages.validate.dynamic import (
    DecoderRunner,
    check_thresholds,
    compare_logits,
    greedy_agreement,
    validate_model,
)
from tests.fixtures.toy import build_toy_artifact

IDS = [785, 6722, 315, 9625, 374, 12095, 13, 576, 6722, 315, 15344, 374]


@pytest.fixture(scope="module")
def toys(tmp_path_factory, qwen3_tokenizer_dir):
    root = tmp_path_factory.mktemp("toys")
    a = build_toy_artifact(root / "a", qwen3_tokenizer_dir, seed=0)
    b = build_toy_artifact(root / "b", qwen3_tokenizer_dir, seed=1)
    return a / "model.onnx", b / "model.onnx"


def test_teacher_forced_rows_equal_prefill_of_each_prefix(toys):
    runner = DecoderRunner(toys[0])
    rows = runner.teacher_forced(IDS)
    assert rows.shape == (len(IDS), 151936)
    for t in (0, 5, len(IDS) - 1):
        prefix = IDS[: t + 1]
        logits, _ = runner.step(prefix, runner._empty_past(), len(prefix))
        np.testing.assert_allclose(rows[t], logits[0, -1], rtol=1e-4, atol=1e-4)


def test_greedy_continues_with_the_argmax_of_each_step(toys):
    runner = DecoderRunner(toys[0])
    tokens = runner.greedy(IDS[:4], 3)
    rows = runner.teacher_forced(IDS[:4] + tokens)
    assert tokens == [int(np.argmax(rows[3 + i])) for i in range(3)]


def test_identical_logits_give_perfect_metrics():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 50)).astype(np.float32)
    metrics = compare_logits(logits, logits.copy(), [1, 2, 3, 4, 5, 6])
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["top1_agreement"] == 1.0
    assert metrics["perplexity_ratio"] == pytest.approx(1.0)
    assert metrics["cosine"] == pytest.approx(1.0)
    assert metrics["logit_abs_diff"] == 0.0


def test_kl_matches_a_hand_computed_value():
    ref = np.log(np.array([[0.5, 0.5]]))
    art = np.log(np.array([[0.25, 0.75]]))
    expected = 0.5 * np.log(0.5 / 0.25) + 0.5 * np.log(0.5 / 0.75)
    assert compare_logits(art, ref, [0])["kl"] == pytest.approx(expected)


def test_different_models_disagree(toys):
    a = DecoderRunner(toys[0]).teacher_forced(IDS)
    b = DecoderRunner(toys[1]).teacher_forced(IDS)
    metrics = compare_logits(a, b, IDS)
    assert metrics["kl"] > 0.1
    assert metrics["top1_agreement"] < 0.5


def test_thresholds_pass_and_fail_by_name():
    metrics = {"kl": 0.05, "top1_agreement": 0.9, "perplexity_ratio": 1.2}
    assert check_thresholds(metrics, {"max_kl": 0.1, "min_top1_agreement": 0.85}) == []
    failures = check_thresholds(metrics, {"max_perplexity_ratio": 1.15, "min_top1_agreement": 0.95})
    assert len(failures) == 2
    assert any("perplexity_ratio" in f and "<= 1.15" in f for f in failures)


def test_nan_metric_fails_its_threshold():
    assert check_thresholds({"kl": float("nan")}, {"max_kl": 1.0})


def test_unknown_threshold_names_the_known_metrics():
    with pytest.raises(InvalidInput, match=r"validation\.max_speed.*kl"):
        check_thresholds({"kl": 0.0}, {"max_speed": 1})


def test_greedy_agreement_counts_until_first_difference():
    assert greedy_agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 0.5
    assert greedy_agreement([1, 2], [1, 2]) == 1.0


def test_validate_against_the_same_model_passes_and_reports(toys):
    report = validate_model(
        toys[0],
        IDS,
        provider="CPUExecutionProvider",
        reference_model=toys[0],
        thresholds={"max_kl": 1e-6, "min_top1_agreement": 1.0},
        quality=True,
    )
    assert report["passed"], report["failures"]
    assert report["reference"] == "unquantized-export"
    assert report["provider"] == "CPUExecutionProvider"
    assert report["quality"]["greedy_agreement"] == 1.0


def test_validate_falls_back_to_cpu_when_provider_is_missing(toys):
    report = validate_model(toys[0], IDS, provider="DmlExecutionProvider", reference_model=toys[0])
    assert report["requested_provider"] == "DmlExecutionProvider"
    assert report["provider"] == "CPUExecutionProvider"


def test_validate_with_impossible_threshold_fails(toys):
    report = validate_model(
        toys[0],
        IDS,
        provider="CPUExecutionProvider",
        reference_model=toys[1],
        thresholds={"max_kl": 0.0},
    )
    assert not report["passed"]
    assert report["failures"][0].startswith("kl = ")


def test_chunked_metrics_equal_a_direct_computation():
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((40, 300)).astype(np.float32)  # more rows than one chunk
    reference = logits + 0.3 * rng.standard_normal((40, 300)).astype(np.float32)
    ids = list(rng.integers(0, 300, size=40))
    got = compare_logits(logits, reference, ids)

    def log_softmax(x):
        x = x.astype(np.float64)
        return (
            x
            - x.max(-1, keepdims=True)
            - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))
        )

    art, ref = log_softmax(logits), log_softmax(reference)
    nll = -np.mean(art[np.arange(39), ids[1:]])
    ref_nll = -np.mean(ref[np.arange(39), ids[1:]])
    assert got["kl"] == pytest.approx(np.mean(np.sum(np.exp(ref) * (ref - art), -1)))
    assert got["top1_agreement"] == pytest.approx(np.mean(art.argmax(-1) == ref.argmax(-1)))
    assert got["perplexity_ratio"] == pytest.approx(np.exp(nll - ref_nll))
    assert got["logit_abs_diff"] == pytest.approx(np.max(np.abs(logits - reference)))
    cosine = np.sum(logits * reference) / np.linalg.norm(logits) / np.linalg.norm(reference)
    assert got["cosine"] == pytest.approx(cosine, rel=1e-5)


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
        fp16, IDS, provider="CPUExecutionProvider", reference_model=fp16, fp32_model=fp32,
        thresholds={"max_fp16_kl": bound},
    )  # fmt: skip
    assert report["reference"] == "unquantized-fp32-export"
    assert 0 < report["fp16_kl"] < 1e-4 and report["fp16_top1_agreement"] >= 0.9
    assert report["fp16_kl"] == pytest.approx(report["kl"])  # the artifact is that fp16 graph
    failures = [] if bound == 1e-3 else [f"fp16_kl = {report['fp16_kl']:.6g}, required <= 1e-09"]
    assert report["failures"] == failures
    assert report["passed"] == (not failures)


def test_nan_logits_never_pass_as_a_small_difference():
    reference = np.zeros((4, 10), np.float32)
    broken = reference.copy()
    broken[1, 3] = np.nan
    metrics = compare_logits(broken, reference, [1, 2, 3, 4])
    assert np.isnan(metrics["logit_abs_diff"]) and np.isnan(metrics["kl"])
    assert check_thresholds(metrics, {"max_logit_abs_diff": 1e-3}) == [
        "logit_abs_diff = nan, required <= 0.001"
    ]
