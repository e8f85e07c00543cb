"""Tests for edgepipe.stages.optimize on a contract-following toy decoder (no export needed)."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest

from edgepipe.errors import InvalidInput
from edgepipe.stages.optimize import DATA, MODEL, level_name, optimize_model
from edgepipe.stages.validate.runner import DecoderRunner
from tests.fixtures.toy import build_toy_artifact

IDS = [11, 220, 3555, 42, 9, 100, 7, 151643]


@pytest.fixture(scope="module")
def toy_export(tmp_path_factory, qwen3_tokenizer_dir):
    """A toy decoder folder with one extra initializer that no node reads."""
    folder = build_toy_artifact(tmp_path_factory.mktemp("toy") / "export", qwen3_tokenizer_dir)
    model = onnx.load(str(folder / MODEL))
    model.graph.initializer.append(
        onnx.numpy_helper.from_array(np.ones((64, 64), np.float32), "unused_weight")
    )
    (folder / DATA).unlink()
    onnx.save(model, str(folder / MODEL), save_as_external_data=True, location=DATA)
    return folder


@pytest.fixture(scope="module")
def optimized(toy_export, tmp_path_factory):
    out = tmp_path_factory.mktemp("opt") / "artifact"
    record = optimize_model(toy_export, out, level="all")
    return out, record


def _initializer_names(path):
    return {t.name for t in onnx.load(str(path), load_external_data=False).graph.initializer}


def test_optimized_graph_keeps_logits_and_is_applied(toy_export, optimized):
    out, record = optimized
    assert record["applied"] is True, record["reason"]
    # Layout-level rewrites are machine specific, so the saved graph stops at extended.
    assert record["saved_level"] == "extended"
    reference = DecoderRunner(toy_export / MODEL).teacher_forced(IDS)
    logits = DecoderRunner(out / MODEL).teacher_forced(IDS)
    np.testing.assert_allclose(logits, reference, rtol=1e-5, atol=1e-4)


def test_unused_initializer_is_removed_and_weights_live_in_one_data_file(optimized):
    out, record = optimized
    assert record["removed_initializers"] == 1
    assert "unused_weight" not in _initializer_names(out / MODEL)
    model = onnx.load(str(out / MODEL), load_external_data=False)
    locations = {
        entry.value
        for tensor in model.graph.initializer
        for entry in tensor.external_data
        if entry.key == "location"
    }
    assert locations == {DATA}
    assert sorted(p.name for p in out.glob("*.data")) == [DATA]


def test_non_model_files_are_carried_over(toy_export, optimized):
    out, _ = optimized
    for name in ("genai_config.json", "tokenizer.json", "generation_config.json"):
        assert (out / name).read_bytes() == (toy_export / name).read_bytes()


def test_optimizing_twice_gives_identical_bytes(toy_export, optimized, tmp_path):
    out, _ = optimized
    again = tmp_path / "again"
    optimize_model(toy_export, again, level="all")
    for name in (MODEL, DATA):
        assert (again / name).read_bytes() == (out / name).read_bytes()


def test_non_cpu_provider_keeps_unoptimized_graph_and_says_why(toy_export, tmp_path):
    record = optimize_model(toy_export, tmp_path / "dml", provider="DmlExecutionProvider")
    assert record["applied"] is False
    assert "DmlExecutionProvider" in record["reason"]
    assert (tmp_path / "dml" / MODEL).is_file()


def test_disabled_level_only_cleans_layout(toy_export, tmp_path):
    record = optimize_model(toy_export, tmp_path / "plain", level="disable")
    assert record["applied"] is False
    assert record["removed_initializers"] == 1
    assert "disables" in record["reason"]


def _negating_optimizer(src, dst_dir, level):
    """An 'optimizer' that breaks the graph: the logits come out negated."""
    model = onnx.load(str(src))
    for node in model.graph.node:
        node.output[:] = ["logits_raw" if name == "logits" else name for name in node.output]
    model.graph.node.append(onnx.helper.make_node("Neg", ["logits_raw"], ["logits"]))
    dst_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst_dir / MODEL), save_as_external_data=True, location=DATA)
    return dst_dir / MODEL


def test_graph_that_breaks_when_optimized_is_not_kept(toy_export, tmp_path):
    record = optimize_model(
        toy_export, tmp_path / "out", level="extended", optimizer=_negating_optimizer
    )
    assert record["applied"] is False
    assert "changes logits" in record["reason"]
    assert record["max_abs_logit_diff"] > 0
    kept = DecoderRunner(tmp_path / "out" / MODEL).teacher_forced(IDS)
    np.testing.assert_allclose(kept, DecoderRunner(toy_export / MODEL).teacher_forced(IDS))


def test_optimizer_that_fails_keeps_the_clean_graph_and_says_why(toy_export, tmp_path):
    def failing(src, dst_dir, level):
        raise RuntimeError("cannot save this graph")

    record = optimize_model(toy_export, tmp_path / "out", level="basic", optimizer=failing)
    assert record["applied"] is False
    assert "could not be saved" in record["reason"] and "cannot save" in record["reason"]
    assert (tmp_path / "out" / MODEL).is_file()


LEVEL_CASES = [
    ("all", "all"),
    ("ORT_ENABLE_BASIC", "basic"),
    (1, "basic"),
    ("disable", "disable"),
    (None, "extended"),
]


@pytest.mark.parametrize(("level", "name"), LEVEL_CASES)
def test_level_names_are_normalized(level, name):
    assert level_name(level) == name


def test_unknown_level_is_invalid_input():
    with pytest.raises(InvalidInput, match="allowed values"):
        level_name("turbo")


def test_input_folder_is_not_modified(toy_export, tmp_path):
    before = {p.name: p.read_bytes() for p in toy_export.iterdir()}
    optimize_model(toy_export, tmp_path / "x", level="basic")
    assert {p.name: p.read_bytes() for p in toy_export.iterdir()} == before
    shutil.rmtree(tmp_path / "x")
