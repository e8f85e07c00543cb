"""Tests for edgepipe.stages.validate.metrics: the report's numbers, its ORT plumbing and bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgepipe.errors import InvalidInput
from edgepipe.stages.quantize.plan import QuantSpec, quantize_weight
from edgepipe.stages.validate.metrics import (
    compare_artifacts,
    compare_logits,
    log_softmax,
    ort_logits_fn,
    quality_report,
    token_windows,
)

VOCAB = 50


@pytest.fixture(scope="module")
def table():
    """A bigram 'model': logits of the next token depend on the current token only."""
    return (np.random.default_rng(0).standard_normal((VOCAB, VOCAB)) * 3).astype(np.float32)


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(1).integers(0, VOCAB, size=300)


def bigram(t: np.ndarray):
    return lambda ids: t[np.asarray(ids)]


def test_identical_models_give_zero_kl_and_full_agreement(table, tokens):
    report = quality_report(
        bigram(table), bigram(table), tokens, window=64, prompts=[[1, 2], [3]], greedy_steps=8
    )
    assert report.mean_kl == pytest.approx(0.0, abs=1e-12)
    assert report.top1_agreement == 1.0
    assert report.greedy_agreement == 1.0 and report.greedy_exact == 1.0
    assert report.reference_perplexity == pytest.approx(report.candidate_perplexity)
    assert report.windows == 5 and report.positions == 4 * 63 + 43
    assert json.loads(json.dumps(report.to_dict()))["top1_agreement"] == 1.0


def test_perturbed_model_has_positive_kl_and_plausible_numbers(table, tokens):
    noisy = table + np.random.default_rng(2).standard_normal(table.shape).astype(np.float32)
    report = quality_report(bigram(table), bigram(noisy), tokens, prompts=[[5]], greedy_steps=6)
    assert report.mean_kl > 0.01
    assert report.max_kl >= report.mean_kl
    assert 0.0 <= report.top1_agreement < 1.0
    assert 0.0 <= report.greedy_agreement <= 1.0
    assert math.isfinite(report.reference_perplexity) and report.reference_perplexity > 1
    assert math.isfinite(report.candidate_perplexity) and report.candidate_perplexity > 1
    assert "KL" in report.summary()


def test_kl_matches_the_definition_and_is_stable_for_huge_logits():
    p = np.array([[0.5, 0.25, 0.25]])
    q = np.array([[0.25, 0.5, 0.25]])
    stats = compare_logits(np.log(p), np.log(q), np.array([0]))
    expected = float(np.sum(p * np.log(p / q)))
    assert stats["kl"][0] == pytest.approx(expected)
    assert stats["ref_nll"][0] == pytest.approx(-math.log(0.5))
    huge = np.array([[1e4, 0.0, -1e4]], np.float16).astype(np.float32)
    assert np.isfinite(log_softmax(huge)).all()
    assert compare_logits(huge, huge, np.array([2]))["kl"][0] == 0.0


def test_int4_weights_lose_more_than_int8(table, tokens):
    """End to end on a quantized 'lm_head': int8 is closer to the reference than int4."""
    hidden = np.random.default_rng(3).standard_normal((VOCAB, 64)).astype(np.float32)
    head = np.random.default_rng(4).standard_normal((64, VOCAB)).astype(np.float32)
    kls = {}
    for bits in (4, 8):
        deq = quantize_weight(head, QuantSpec(bits, 32, False, "rtn")).dequantize()
        kls[bits] = quality_report(
            lambda ids: hidden[ids] @ head,
            lambda ids, deq=deq: hidden[ids] @ deq,
            tokens,
        ).mean_kl
    assert 0 < kls[8] < kls[4]


def test_bad_inputs_are_reported():
    with pytest.raises(InvalidInput, match="at least 2 tokens"):
        quality_report(bigram(np.eye(3)), bigram(np.eye(3)), [1])
    with pytest.raises(InvalidInput, match="every position"):
        quality_report(lambda ids: np.zeros((1, 3)), bigram(np.eye(3)), [1, 2, 0])
    with pytest.raises(InvalidInput, match="vocabulary"):
        compare_logits(np.zeros((2, 3)), np.zeros((2, 4)), np.array([0, 1]))
    with pytest.raises(InvalidInput, match="model.onnx"):
        ort_logits_fn("/nonexistent/folder")


def test_token_windows_drop_single_token_tail():
    windows = token_windows(np.arange(9), 4)
    assert [w.tolist() for w in windows] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert len(token_windows(np.arange(100), 10, max_windows=3)) == 3


def _bigram_onnx(folder, table: np.ndarray, all_logits: bool) -> None:
    """A contract-shaped decoder: input_ids/attention_mask/past in, logits/present out."""
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["all"], axis=0)]
    if all_logits:
        nodes.append(helper.make_node("Identity", ["all"], ["logits"]))
    else:
        nodes.append(helper.make_node("Slice", ["all", "minus1", "big", "one"], ["logits"]))
    kv = []
    for kind in ("key", "value"):
        kv.append(
            helper.make_tensor_value_info(
                f"past_key_values.0.{kind}", TensorProto.FLOAT, [1, 2, "past", 4]
            )
        )
        nodes.append(
            helper.make_node("Identity", [f"past_key_values.0.{kind}"], [f"present.0.{kind}"])
        )
    graph = helper.make_graph(
        nodes,
        "bigram",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [1, "total"]),
            *kv,
        ],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, None, VOCAB]),
            helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, [1, 2, None, 4]),
            helper.make_tensor_value_info("present.0.value", TensorProto.FLOAT, [1, 2, None, 4]),
        ],
        [
            numpy_helper.from_array(table, "table"),
            numpy_helper.from_array(np.array([-1], np.int64), "minus1"),
            numpy_helper.from_array(np.array([1 << 30], np.int64), "big"),
            numpy_helper.from_array(np.array([1], np.int64), "one"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    folder.mkdir()
    onnx.save(model, str(folder / "model.onnx"))


def test_ort_logits_fn_gives_every_position_for_all_logits_and_last_only_exports(
    tmp_path, table, tokens
):
    _bigram_onnx(tmp_path / "all", table, all_logits=True)
    _bigram_onnx(tmp_path / "last", table, all_logits=False)
    ids = tokens[:20]
    for name in ("all", "last"):
        logits = ort_logits_fn(tmp_path / name)(ids)
        np.testing.assert_allclose(logits, table[ids], rtol=1e-6)
    report = compare_artifacts(tmp_path / "all", tmp_path / "last", tokens[:40], window=20)
    assert report.mean_kl == pytest.approx(0.0, abs=1e-12) and report.top1_agreement == 1.0


@pytest.fixture(scope="module")
def tiny_exports(make_tiny_model, tmp_path_factory):
    """A tiny Qwen3 exported in float32 and quantized several ways, all-position logits."""
    from edgepipe.stages.export.dynamic import build_decoder
    from edgepipe.stages.quantize.plan import QuantPlan

    model = make_tiny_model("qwen3")
    root = tmp_path_factory.mktemp("quality-exports")
    plans = {
        "fp32": None,
        "int4-acc0": QuantPlan.from_precision("int4", block_size=32, accuracy_level=0),
        "int4-acc4": QuantPlan.from_precision("int4", block_size=32, accuracy_level=4),
        "int4-hqq": QuantPlan.from_precision("int4", block_size=32, method="hqq"),
        "int8": QuantPlan.from_precision("int8", block_size=32),
    }
    for name, plan in plans.items():
        build_decoder(model, root / name, quant=plan, all_logits=True, context_length=256)
    return root


def test_report_on_tiny_quantized_exports_is_plausible(tiny_exports):
    tokens = np.random.default_rng(5).integers(0, 1000, size=96)
    reports = {
        name: compare_artifacts(
            tiny_exports / "fp32",
            tiny_exports / name,
            tokens,
            window=48,
            prompts=[[1, 2, 3], [400, 5]],
            greedy_steps=6,
        )
        for name in ("int4-acc0", "int4-acc4", "int4-hqq", "int8")
    }
    for name, report in reports.items():
        assert report.mean_kl > 0, name
        assert 0.0 <= report.top1_agreement <= 1.0, name
        assert 0.0 <= report.greedy_agreement <= 1.0, name
        assert math.isfinite(report.candidate_perplexity), name
        assert report.positions == 2 * 47
    assert reports["int8"].mean_kl < reports["int4-acc0"].mean_kl
    # accuracy_level 4 quantizes activations too: selectable, and reported separately.
    assert reports["int4-acc4"].mean_kl != reports["int4-acc0"].mean_kl


def test_custom_greedy_functions_are_used_and_perplexity_saturates(table, tokens):
    calls = []

    def fixed(prompt, steps):
        calls.append(len(prompt))
        return np.arange(steps)

    report = quality_report(
        bigram(table),
        bigram(table),
        tokens[:10],
        prompts=[[1, 2]],
        greedy_steps=4,
        reference_greedy_fn=fixed,
        candidate_greedy_fn=lambda prompt, steps: np.zeros(steps, np.int64),
    )
    assert calls == [2]
    assert report.greedy_agreement == 0.25 and report.greedy_exact == 0.0
    wild = np.zeros((VOCAB, VOCAB), np.float32)
    wild[:, 0] = 1e6  # every target but 0 has NLL ~1e6 nats
    report = quality_report(bigram(wild), bigram(wild), np.arange(1, 20))
    assert report.reference_perplexity == math.inf and report.mean_kl == 0.0
