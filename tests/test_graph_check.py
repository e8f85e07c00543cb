"""Tests for edgepipe.stages.validate.graph_check: ops and dtypes of a graph against its profile,
and what actually ran."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from edgepipe import schema
from edgepipe.errors import InvalidInput
from edgepipe.stages.export.dynamic import build_decoder
from edgepipe.stages.quantize.plan import QuantPlan
from edgepipe.stages.validate.graph_check import check_graph, provider_status, this_machine


def tiny_graph(path: Path, op: str = "Erf", dtype: int = TensorProto.FLOAT) -> Path:
    """x -> Add(x, x) -> op -> y, with x and y of `dtype`."""
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["x", "x"], ["s"], name="twice"),
            helper.make_node(op, ["s"], ["y"], name="the_op"),
        ],
        "g",
        [helper.make_tensor_value_info("x", dtype, [2])],
        [helper.make_tensor_value_info("y", dtype, [2])],
    )
    onnx.save(helper.make_model(graph), path)
    return path


def test_graph_with_an_op_outside_the_profile_fails_naming_the_op(tmp_path):
    report = check_graph(tiny_graph(tmp_path / "m.onnx", "Erf"), schema.load_profile("directml"))
    assert not report["passed"]
    assert report["ops_outside"] == {"Erf": ["the_op"]}
    assert report["failures"] == ["op Erf (node the_op) is not in profile directml's ops"]
    assert report["ops"] == {"Add": 1, "Erf": 1}


def test_graph_with_a_dtype_outside_the_profile_fails_naming_the_dtype(tmp_path):
    path = tiny_graph(tmp_path / "m.onnx", "Neg", TensorProto.DOUBLE)
    report = check_graph(path, schema.load_profile("directml"))
    assert list(report["dtypes_outside"]) == ["float64"]
    assert "dtype float64 (x, y)" in report["failures"][0]
    assert report["ops_outside"] == {}


def test_quantized_embedding_is_outside_the_directml_op_set(tiny_qwen2_dir, tmp_path):
    # cpu-x64's int4 layout gathers from the quantized table; DirectML has no such kernel.
    plan = QuantPlan.from_precision("int4", block_size=32, embedding="int4", lm_head="int4")
    build_decoder(tiny_qwen2_dir, tmp_path, quant=plan, context_length=64)
    dml = check_graph(tmp_path / "model.onnx", schema.load_profile("directml"))
    assert list(dml["ops_outside"]) == ["com.microsoft::GatherBlockQuantized"]
    assert "embed_tokens/GatherBlockQuantized" in dml["failures"][0]
    assert check_graph(tmp_path / "model.onnx", schema.load_profile("cpu-x64"))["passed"]


def test_domain_and_cast_targets_are_checked(tmp_path):
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["x"], ["h"], name="down", to=TensorProto.BFLOAT16),
            helper.make_node("MyOp", ["h"], ["y"], name="custom", domain="com.example"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), path)
    report = check_graph(path, schema.load_profile("cpu-x64"))
    assert list(report["ops_outside"]) == ["com.example::MyOp"]
    assert report["dtypes_outside"] == {"bfloat16": ["down (Cast to)"]}


def test_not_an_onnx_file_is_invalid_input(tmp_path):
    (tmp_path / "m.onnx").write_text("not a model")
    with pytest.raises(InvalidInput, match="not a readable ONNX model"):
        check_graph(tmp_path / "m.onnx", schema.load_profile("cpu-x64"))


def test_provider_status_says_plainly_what_did_not_run():
    dml = provider_status(schema.load_profile("directml"), "CPUExecutionProvider")
    assert dml["provider_run"] is False
    assert dml["note"].startswith("DmlExecutionProvider was NOT run")
    assert "onnxruntime-directml" in dml["note"]
    arm = provider_status(schema.load_profile("cpu-arm64"), "CPUExecutionProvider")
    x64 = provider_status(schema.load_profile("cpu-x64"), "CPUExecutionProvider")
    if this_machine() == "x86_64":
        assert arm["provider_run"] is False and "arm64 kernels were NOT run" in arm["note"]
        assert x64 == {**x64, "provider_run": True, "note": None}
    else:
        assert arm["provider_run"] is (this_machine() == "arm64")
