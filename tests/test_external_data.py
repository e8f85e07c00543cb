"""A weight two initializers share is stored once (`edgepipe.formats.external_data`), through the
export, onnx-ir's re-save and onnxruntime's offline optimizer."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from edgepipe.arch.presets import write_preset
from edgepipe.formats.external_data import duplicate_initializers, share_duplicates
from edgepipe.stages.export.dynamic import build_decoder
from edgepipe.stages.optimize import clean_layout, optimize_model, ort_optimize
from edgepipe.stages.quantize.plan import QuantPlan
from edgepipe.stages.validate.runner import DecoderRunner

PROMPT = [9, 8, 7, 6, 5]


@pytest.fixture(scope="module", params=["int4", "int8"])
def tied_export(request, tmp_path_factory):
    """A tiny tied model exported with a `request.param` head (one shared table)."""
    folder = tmp_path_factory.mktemp(f"tied-{request.param}")
    source = write_preset("tiny-qwen2", 0, folder / "src")
    plan = QuantPlan.from_precision("int4", block_size=32, lm_head=request.param)
    build_decoder(source, folder / "export", quant=plan, context_length=128)
    return folder / "export"


def _resaved(src, dst):
    """`src` saved again by onnx-ir, which writes every initializer on its own."""
    dst.mkdir()
    ir.save(ir.load(src / "model.onnx"), dst / "model.onnx", external_data="model.onnx.data")
    return dst / "model.onnx"


def _logits(model_path) -> np.ndarray:
    runner = DecoderRunner(model_path)
    logits, _ = runner.step(PROMPT, runner.empty_past(), len(PROMPT))
    return logits


def test_the_export_stores_the_tied_table_once(tied_export):
    assert duplicate_initializers(tied_export / "model.onnx") == []


def test_a_resaved_graph_holds_the_table_twice_until_shared(tied_export, tmp_path):
    model = _resaved(tied_export, tmp_path / "resaved")
    assert duplicate_initializers(model) == [("embed_tokens.qweight", "lm_head.qweight")]
    before = (tmp_path / "resaved" / "model.onnx.data").stat().st_size
    assert share_duplicates(model) == 1
    assert duplicate_initializers(model) == []
    table = onnx.load(str(model), load_external_data=False)
    sizes = {t.name: int(np.prod(t.dims)) for t in table.graph.initializer}
    after = (tmp_path / "resaved" / "model.onnx.data").stat().st_size
    assert before - after >= sizes["embed_tokens.qweight"]
    np.testing.assert_array_equal(_logits(model), _logits(tied_export / "model.onnx"))


def test_sharing_a_graph_without_duplicates_changes_nothing(tied_export, tmp_path):
    shutil.copytree(tied_export, tmp_path / "copy")
    data = (tmp_path / "copy" / "model.onnx.data").read_bytes()
    assert share_duplicates(tmp_path / "copy" / "model.onnx") == 0
    assert (tmp_path / "copy" / "model.onnx.data").read_bytes() == data


def test_the_optimized_graph_stores_the_tied_table_once(tied_export, tmp_path):
    # onnxruntime's optimizer and the layout clean-up the optimize stage runs after it, called
    # directly: whether the stage keeps the optimized graph also depends on a timing probe,
    # which a loaded machine can tip either way.
    saved = ort_optimize(tied_export / "model.onnx", tmp_path / "ort", "all")
    clean_layout(saved.parent, tmp_path / "optimized")
    assert duplicate_initializers(tmp_path / "optimized" / "model.onnx") == []
    export_bytes = (tied_export / "model.onnx.data").stat().st_size
    assert (tmp_path / "optimized" / "model.onnx.data").stat().st_size <= export_bytes * 1.01


def test_the_optimize_stage_output_stores_the_tied_table_once(tied_export, tmp_path):
    record = optimize_model(tied_export, tmp_path / "optimized")
    assert record["reason"] is None or "slower" in record["reason"], record["reason"]
    assert duplicate_initializers(tmp_path / "optimized" / "model.onnx") == []
