"""Tests for edgepipe.stages.validate.runner: teacher-forced rows, greedy continuations, and both
kinds of export (last-position and all-position logits)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgepipe.errors import InvalidInput
from edgepipe.stages.validate.runner import DecoderRunner
from tests.fixtures.toy import build_toy_artifact

IDS = [785, 6722, 315, 9625, 374, 12095, 13, 576, 6722, 315, 15344, 374]
VOCAB = 50


@pytest.fixture(scope="module")
def toy(tmp_path_factory, qwen3_tokenizer_dir):
    return build_toy_artifact(tmp_path_factory.mktemp("toy") / "a", qwen3_tokenizer_dir) / (
        "model.onnx"
    )


def test_teacher_forced_rows_equal_prefill_of_each_prefix(toy):
    runner = DecoderRunner(toy)
    rows = runner.teacher_forced(IDS)
    assert rows.shape == (len(IDS), 151936)
    for t in (0, 5, len(IDS) - 1):
        prefix = IDS[: t + 1]
        logits, _ = runner.step(prefix, runner.empty_past(), len(prefix))
        np.testing.assert_allclose(rows[t], logits[0, -1], rtol=1e-4, atol=1e-4)


def test_greedy_continues_with_the_argmax_of_each_step(toy):
    runner = DecoderRunner(toy)
    tokens = runner.greedy(IDS[:4], 3)
    rows = runner.teacher_forced(IDS[:4] + tokens)
    assert tokens == [int(np.argmax(rows[3 + i])) for i in range(3)]


def test_empty_past_is_one_empty_cache_per_past_input(toy):
    runner = DecoderRunner(toy)
    past = runner.empty_past()
    assert sorted(past) == sorted(runner.past_names) and past
    assert all(a.shape[0] == 1 and a.shape[2] == 0 for a in past.values())


def test_a_missing_model_is_invalid_input(tmp_path):
    with pytest.raises(InvalidInput, match="model.onnx"):
        DecoderRunner(tmp_path / "model.onnx")


def _bigram_onnx(folder, table: np.ndarray, all_logits: bool):
    """A contract-shaped decoder: input_ids/attention_mask/past in, logits/present out; the
    logits of a token are its row of `table`."""
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
    return folder / "model.onnx"


@pytest.mark.parametrize("all_logits", [True, False])
def test_every_position_comes_back_from_both_kinds_of_export(tmp_path, all_logits):
    table = (np.random.default_rng(0).standard_normal((VOCAB, VOCAB)) * 3).astype(np.float32)
    ids = [int(t) for t in np.random.default_rng(1).integers(0, VOCAB, size=20)]
    runner = DecoderRunner(_bigram_onnx(tmp_path / "m", table, all_logits))
    np.testing.assert_allclose(runner.teacher_forced(ids), table[ids], rtol=1e-6)
    # Greedy on a bigram table: each token is the argmax of the previous token's row.
    out = runner.greedy(ids[:3], 4)
    expected = [int(np.argmax(table[ids[2]]))]
    for _ in range(3):
        expected.append(int(np.argmax(table[expected[-1]])))
    assert out == expected
