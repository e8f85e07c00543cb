"""The static validate stage: the schedule, the report of a small build on the simulated HTP,
thresholds, and refusals (a node the HTP cannot run)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgepipe.errors import BuildFailed
from edgepipe.stages.export.static import build_static_decoder
from edgepipe.stages.validate.metrics import QUALITY_KEYS
from edgepipe.stages.validate.static import (
    compile_on_htp,
    evaluation_schedule,
    greedy,
    quality_on_cpu,
    teacher_forced,
    validate_static,
)
from tests.fixtures.static import (
    HTP,
    SMALL_CAPACITY,
    SMALL_CHUNK,
    SMALL_VOCAB,
    cpu_pipeline,
    needs_qnn,
    one_op_graph,
    transformers_logits,
)

FILES = ("prefill.onnx", "decode.onnx")


@pytest.mark.parametrize(
    ("n_ids", "chunk", "expected"),
    [(256, 64, (96, 8)), (20, 8, (12, 7)), (5, 8, (3, 1)), (2, 8, (1, 0))],
)
def test_the_schedule_feeds_a_full_and_a_padded_chunk_then_decodes(n_ids, chunk, expected):
    prefill, decode = evaluation_schedule(n_ids, chunk)
    assert (prefill, decode) == expected
    assert prefill + decode <= n_ids - 1, "every row has a next token to score"


@needs_qnn
@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_a_small_build_reports_placement_accuracy_and_a_loading_ep_context(
    small_static_build, family
):
    result = small_static_build(family, "int8")
    report = result.validation
    assert report["passed"] and report["failures"] == []
    assert report["provider"] == "QNNExecutionProvider"
    assert report["placement"]["cpu_fallback"].startswith("disabled")
    assert report["reference"] == "fp32-static-cpu"
    assert report["schedule"] == {"prefill_tokens": 12, "decode_steps": 8, "rows": 10, "chunk": 8}
    assert report["cosine"] >= 0.99 and report["top1_agreement"] >= 0.5  # measured 0.998, 1.0
    assert report["htp_vs_cpu"]["cosine"] > 0.99999, "the HTP computes what the QDQ graph says"
    quality = report["quality"]
    assert quality["tokens"] == SMALL_CAPACITY, "every evaluation token the cache holds"
    assert tuple(quality) == QUALITY_KEYS, "the same quality shape as a dynamic build"
    assert quality["reference"] == "fp32-static-cpu"
    assert quality["kl"] > 0, "int8 weights are not the fp32 graph"
    assert quality["top1_agreement"] >= 0.5 and quality["cosine"] >= 0.99
    assert quality["greedy_agreement"] is not None and quality["greedy_steps"] == 16
    ctx = report["ep_context"]
    assert ctx["loads"] and ctx["max_abs_diff_vs_compile_session"] <= 1e-4
    assert ctx["rows_compared"] == 3
    manifest = json.loads((Path(result.artifact) / "manifest.json").read_text())
    static = manifest["static"]
    assert (static["chunk"], static["kv_capacity"]) == (SMALL_CHUNK, SMALL_CAPACITY)
    assert static["ep_context"]["graphs"] == {
        "prefill": "prefill_ctx.onnx",
        "decode": "decode_ctx.onnx",
    }
    assert (static["ep_context"]["soc_model"], static["ep_context"]["htp_arch"]) == (60, 73)
    for name in static["ep_context"]["binaries"] + list(static["ep_context"]["graphs"].values()):
        assert name in manifest["files"], "compiled graphs are hashed like every other file"
    assert static["weights"] == {
        "body": "int8/pc",
        "embedding": "int8/tensor",
        "lm_head": "int8/pc",
    }
    assert static["activations"]["activation_type"] == "uint16"


@needs_qnn
def test_thresholds_the_quantized_graphs_miss_are_failures(
    small_static_build, make_tiny_model, qwen3_tokenizer_dir, tmp_path
):
    artifact = Path(small_static_build("qwen3", "int8").artifact)
    model = make_tiny_model("qwen3", vocab_size=SMALL_VOCAB, tokenizer_dir=qwen3_tokenizer_dir)
    reference = build_static_decoder(
        model, tmp_path / "fp32", chunk=SMALL_CHUNK, kv_capacity=SMALL_CAPACITY
    )
    ids = [int(i) for i in np.random.default_rng(3).integers(0, SMALL_VOCAB, 40)]
    report = validate_static(
        artifact,
        reference.out_dir,
        ids,
        files=FILES,
        num_layers=2,
        pad_token_id=0,
        provider_options=HTP,
        thresholds={"min_cosine": 0.999999, "max_kl": 1.0},
        context_dir=tmp_path,
    )
    assert not report["passed"]
    # The schedule's rows on the HTP, then the whole text on CPU: both miss min_cosine.
    htp, text = report["failures"]
    assert htp.startswith("cosine = ") and ">= 0.999999" in htp
    assert text.startswith("evaluation text (40 tokens, QDQ graphs on CPU): cosine = ")
    assert ">= 0.999999" in text
    assert (tmp_path / "prefill_ctx.onnx").is_file() and (tmp_path / "decode_ctx.onnx").is_file()


@needs_qnn
def test_a_graph_with_a_node_the_htp_refuses_fails_the_compile(tmp_path):
    for name in FILES:
        one_op_graph(tmp_path / name, "Einsum", equation="ij->ji")
    with pytest.raises(
        BuildFailed, match="does not compile for the HTP with CPU fallback disabled"
    ):
        compile_on_htp(tmp_path, tmp_path, FILES, HTP)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_teacher_forced_rows_and_greedy_follow_transformers(make_tiny_model, tmp_path, family):
    # The whole-text quality report rests on these two loops over the static graphs.
    model = make_tiny_model(family, vocab_size=SMALL_VOCAB)
    export = build_static_decoder(model, tmp_path, chunk=SMALL_CHUNK, kv_capacity=SMALL_CAPACITY)
    pipeline = cpu_pipeline(export.out_dir)
    ids = [int(i) for i in np.random.default_rng(5).integers(0, SMALL_VOCAB, SMALL_CAPACITY + 6)]
    rows = teacher_forced(pipeline, ids)
    assert rows.shape == (SMALL_CAPACITY, SMALL_VOCAB), "cut at the KV capacity"
    reference = transformers_logits(model, ids[:SMALL_CAPACITY])
    np.testing.assert_allclose(rows, reference, atol=1e-4)
    out = greedy(pipeline, ids[:5], 12)
    expected, context = [], list(ids[:5])
    for _ in range(12):
        expected.append(int(np.argmax(transformers_logits(model, context)[-1])))
        context.append(expected[-1])
    assert out == expected and len(set(out)) > 1


def test_quality_on_cpu_writes_the_common_quality_block(make_tiny_model, tmp_path):
    # No HTP needed: the whole-text report runs on CPU. The fp32 graphs against themselves
    # must give a perfect report, in the shape every build writes.
    model = make_tiny_model("qwen3", vocab_size=SMALL_VOCAB)
    export = build_static_decoder(model, tmp_path, chunk=SMALL_CHUNK, kv_capacity=SMALL_CAPACITY)
    ids = [int(i) for i in np.random.default_rng(7).integers(0, SMALL_VOCAB, 40)]
    quality = quality_on_cpu(cpu_pipeline(export.out_dir), cpu_pipeline(export.out_dir), ids)
    assert tuple(quality) == QUALITY_KEYS
    assert quality["tokens"] == 40 and quality["reference"] == "fp32-static-cpu"
    assert quality["kl"] == pytest.approx(0.0, abs=1e-9) and quality["top1_agreement"] == 1.0
    assert quality["greedy_agreement"] == 1.0 and quality["greedy_exact"] == 1.0
    assert quality["greedy_steps"] == 16
