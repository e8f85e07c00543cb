"""The static graph builder: fp32 prefill/decode graphs against transformers, the op set, the
shared weights, the graph contract and the genai_config.json."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgepipe import schema
from edgepipe.errors import InvalidInput
from edgepipe.stages.export.static import (
    DATA_FILE,
    DECODE_FILE,
    PREFILL_FILE,
    build_static_decoder,
)
from edgepipe.stages.quantize.qdq import StaticQuant, WeightQuant
from tests.fixtures.static import cpu_pipeline, transformers_logits

CHUNK, CAPACITY, VOCAB = 8, 64, 1000


@pytest.fixture(scope="module", params=["qwen2", "qwen3"])
def exported(request, make_tiny_model, tmp_path_factory):
    """(family, model folder, fp32 static export) of a tiny model with a 1000-token vocab."""
    model = make_tiny_model(request.param, vocab_size=VOCAB)
    out = tmp_path_factory.mktemp(f"static-{request.param}")
    return request.param, model, build_static_decoder(model, out, chunk=CHUNK, kv_capacity=CAPACITY)


@pytest.mark.parametrize("prompt_len", [1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK])
def test_fp32_graphs_give_transformers_logits_for_every_prompt_shape(exported, prompt_len):
    _, model, result = exported
    ids = [int(i) for i in np.random.default_rng(prompt_len).integers(0, VOCAB, prompt_len + 3)]
    reference = transformers_logits(model, ids)
    pipeline = cpu_pipeline(result.out_dir)
    cache = pipeline.new_cache()
    rows = [pipeline.prefill(cache, ids[:prompt_len])]
    rows += [pipeline.step(cache, t) for t in ids[prompt_len:-1]]
    got = np.stack(rows)
    want = reference[prompt_len - 1 : -1]
    scale = float(np.abs(want).max())
    assert np.abs(got - want).max() <= 1e-4 * scale, "prefill (left-padded chunks) + decode"
    assert cache.length == len(ids) - 1


def test_graphs_use_only_standard_ops_the_qnn_profile_lists(exported):
    profile = schema.load_profile("qnn-htp")
    for name in (PREFILL_FILE, DECODE_FILE):
        model = onnx.load(str(exported[2].out_dir / name), load_external_data=False)
        assert {o.domain for o in model.opset_import} == {""}
        ops = {(n.domain, n.op_type) for n in model.graph.node}
        assert all(domain == "" for domain, _ in ops)
        refused = sorted(op for _, op in ops if not profile.accepts_op(op))
        assert refused == [], f"{name} uses ops the qnn-htp profile does not list"


def test_prefill_and_decode_read_the_same_bytes_of_one_data_file(exported):
    folder = exported[2].out_dir
    tables = []
    for name in (PREFILL_FILE, DECODE_FILE):
        model = onnx.load(str(folder / name), load_external_data=False)
        external = {
            init.name: tuple((e.key, e.value) for e in init.external_data)
            for init in model.graph.initializer
            if init.data_location == onnx.TensorProto.EXTERNAL
        }
        tables.append(external)
    prefill, decode = tables
    assert prefill and prefill == decode, "every weight is stored once and viewed by both graphs"
    assert {dict(v)["location"] for v in prefill.values()} == {DATA_FILE}
    assert sorted(p.name for p in folder.glob("*.data")) == [DATA_FILE]


def test_graph_io_follows_the_static_contract(exported):
    family, model, result = exported
    config = json.loads((model / "config.json").read_text())
    kvh = config["num_key_value_heads"]
    head = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    for name, seq in ((PREFILL_FILE, CHUNK), (DECODE_FILE, 1)):
        session = ort.InferenceSession(
            str(result.out_dir / name), providers=["CPUExecutionProvider"]
        )
        inputs = {i.name: (i.type, i.shape) for i in session.get_inputs()}
        outputs = {o.name: (o.type, o.shape) for o in session.get_outputs()}
        assert inputs["input_ids"] == ("tensor(int64)", [1, seq])
        assert inputs["position_ids"] == ("tensor(int64)", [1, seq])
        assert inputs["attention_mask"] == ("tensor(float)", [1, 1, seq, CAPACITY + seq])
        assert inputs["past_key_values.1.value"] == ("tensor(float)", [1, kvh, CAPACITY, head])
        assert outputs["logits"] == ("tensor(float)", [1, 1, VOCAB])
        assert outputs["present.0.key"] == ("tensor(float)", [1, kvh, seq, head])
        assert len(inputs) == 3 + 2 * config["num_hidden_layers"]


def test_genai_config_describes_the_pipeline_and_parses_in_onnxruntime_genai(exported):
    folder = exported[2].out_dir
    config = json.loads((folder / "genai_config.json").read_text())
    assert config["model"]["type"] == "decoder-pipeline"
    assert config["model"]["context_length"] == CAPACITY
    decoder = config["model"]["decoder"]
    stages = {name: spec for entry in decoder["pipeline"] for name, spec in entry.items()}
    assert stages["prefill"]["filename"] == PREFILL_FILE and stages["prefill"]["run_on_prompt"]
    assert stages["decode"]["filename"] == DECODE_FILE and stages["decode"]["run_on_token_gen"]
    assert not stages["decode"]["run_on_prompt"] and not stages["prefill"]["run_on_token_gen"]
    assert decoder["sliding_window"]["window_size"] == CHUNK
    assert decoder["sliding_window"]["alignment"] == "left"
    import onnxruntime_genai as og

    og.Config(str(folder))  # genai's own parser accepts every key


def test_quantized_export_stores_codes_per_the_spec(make_tiny_model, tmp_path):
    model = make_tiny_model("qwen3", vocab_size=VOCAB)
    quant = StaticQuant(
        WeightQuant(8),
        WeightQuant(8),
        WeightQuant(4, 32),
        overrides=(("*.mlp.*", WeightQuant(4, 32)),),
    )
    result = build_static_decoder(model, tmp_path, chunk=CHUNK, kv_capacity=CAPACITY, quant=quant)
    graph = onnx.load(str(result.prefill_path), load_external_data=False).graph
    dtypes = {i.name: i.data_type for i in graph.initializer}
    assert dtypes["layers.0.attn.q_proj.q"] == onnx.TensorProto.INT8
    assert dtypes["layers.0.mlp.up_proj.q"] == onnx.TensorProto.INT4
    assert dtypes["lm_head.q"] == onnx.TensorProto.INT4
    assert dtypes["embed_tokens.q"] == onnx.TensorProto.INT8
    ops = {n.name: n.op_type for n in graph.node}
    assert ops["layers.0.attn.q_proj/Gemm"] == "Gemm"  # per channel: Gemm(transB=1)
    assert ops["layers.0.mlp.up_proj/MatMul"] == "MatMul"  # LPBQ: MatMul
    assert result.quantized["model.layers.0.mlp.up_proj.weight"] == "int4/b32"
    assert result.quantized["model.layers.0.self_attn.q_proj.weight"] == "int8/pc"
    assert not any(n.domain for n in graph.node)


def test_a_kv_capacity_below_the_chunk_is_refused(make_tiny_model, tmp_path):
    with pytest.raises(InvalidInput, match="kv_capacity: 4; must be at least prefill_chunk"):
        build_static_decoder(make_tiny_model("qwen2"), tmp_path, chunk=8, kv_capacity=4)
