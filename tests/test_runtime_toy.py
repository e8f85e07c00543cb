"""A toy decoder that follows the export contract, for runtime tests that need no real model.

One attention layer (GroupQueryAttention with rotary, shared past/present buffers, seqlens_k
and total_sequence_length computed from the attention mask as docs/contracts.md specifies) and
two layers' worth of KV inputs, over the real Qwen vocabulary size so the real tokenizer's ids
work. Random weights: the text is gibberish, but every runtime mechanism (batching, cache
growth, stop tokens, sampling) runs through a real onnxruntime graph.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

VOCAB = 151936
HIDDEN = 32
HEADS = 2
KV_HEADS = 1
HEAD_DIM = 16
LAYERS = 2
CONTEXT = 256


def build_toy_artifact(
    folder: Path, tokenizer_dir: Path, *, seed: int = 0, fp16: bool = False, context: int = CONTEXT
):
    """Write a toy decoder artifact into `folder` (tokenizer files copied from tokenizer_dir)."""
    import onnx
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copytree(tokenizer_dir, folder, dirs_exist_ok=True)
    rng = np.random.default_rng(seed)
    dt = np.float16 if fp16 else np.float32
    kv_type = T.FLOAT16 if fp16 else T.FLOAT

    def init(name, array):
        return numpy_helper.from_array(np.asarray(array), name)

    inv = 1.0 / (1e4 ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM))
    angles = np.outer(np.arange(context), inv)
    inits = [
        init("embed", rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)),
        init("wq", (rng.standard_normal((HIDDEN, HEADS * HEAD_DIM)) * 0.5).astype(np.float32)),
        init("wk", (rng.standard_normal((HIDDEN, KV_HEADS * HEAD_DIM)) * 0.5).astype(np.float32)),
        init("wv", rng.standard_normal((HIDDEN, KV_HEADS * HEAD_DIM)).astype(np.float32)),
        init("wo", rng.standard_normal((HEADS * HEAD_DIM, HIDDEN)).astype(np.float32)),
        init("lm_head", (rng.standard_normal((HIDDEN, VOCAB)) * 0.6).astype(np.float32)),
        init("cos", np.cos(angles).astype(dt)),
        init("sin", np.sin(angles).astype(dt)),
        init("one", np.array(1, np.int64)),
        init("axis1", np.array([1], np.int64)),
        init("last_start", np.array([-1], np.int64)),
        init("last_end", np.array([np.iinfo(np.int64).max], np.int64)),
    ]
    nodes = [
        helper.make_node("ReduceSum", ["attention_mask", "axis1"], ["mask_sum"], keepdims=0),
        helper.make_node("Sub", ["mask_sum", "one"], ["seqlens64"]),
        helper.make_node("Cast", ["seqlens64"], ["seqlens_k"], to=T.INT32),
        helper.make_node("Shape", ["attention_mask"], ["mask_shape"]),
        helper.make_node("Gather", ["mask_shape", "one"], ["total64"], axis=0),
        helper.make_node("Cast", ["total64"], ["total_len"], to=T.INT32),
        helper.make_node("Gather", ["embed", "input_ids"], ["h"]),
        helper.make_node("MatMul", ["h", "wq"], ["q32"]),
        helper.make_node("MatMul", ["h", "wk"], ["k32"]),
        helper.make_node("MatMul", ["h", "wv"], ["v32"]),
    ]
    for name in ("q", "k", "v"):
        nodes.append(helper.make_node("Cast", [f"{name}32"], [name], to=kv_type))
    inputs = [
        helper.make_tensor_value_info("input_ids", T.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_mask", T.INT64, ["batch", "total"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", T.FLOAT, ["batch", 1, VOCAB])]
    attn_out = None
    for i in range(LAYERS):
        kv_shape = ["batch", KV_HEADS, "past", HEAD_DIM]
        for kind in ("key", "value"):
            inputs.append(
                helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", kv_type, kv_shape)
            )
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", kv_type, kv_shape))
        # Layer 1 attends with layer 0's output as its query so both caches matter.
        query = "q" if i == 0 else "q1"
        nodes.append(
            helper.make_node(
                "GroupQueryAttention",
                [
                    query,
                    "k",
                    "v",
                    f"past_key_values.{i}.key",
                    f"past_key_values.{i}.value",
                    "seqlens_k",
                    "total_len",
                    "cos",
                    "sin",
                ],
                [f"attn{i}", f"present.{i}.key", f"present.{i}.value"],
                domain="com.microsoft",
                num_heads=HEADS,
                kv_num_heads=KV_HEADS,
                do_rotary=1,
                rotary_interleaved=0,
            )
        )
        if i == 0:
            nodes.append(helper.make_node("Add", ["q", "attn0"], ["q1"]))
        attn_out = f"attn{i}"
    nodes += [
        helper.make_node("Cast", [attn_out], ["attn32"], to=T.FLOAT),
        helper.make_node("MatMul", ["attn32", "wo"], ["o"]),
        helper.make_node("Add", ["o", "o"], ["h2"]),
        helper.make_node("Slice", ["h2", "last_start", "last_end", "axis1"], ["h_last"]),
        helper.make_node("MatMul", ["h_last", "lm_head"], ["logits"]),
    ]
    graph = helper.make_graph(nodes, "toy", inputs, outputs, inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 8
    onnx.save(
        model,
        str(folder / "model.onnx"),
        save_as_external_data=True,
        location="model.onnx.data",
        size_threshold=1024,
    )
    config = {
        "model": {
            "type": "qwen3",
            "context_length": context,
            "vocab_size": VOCAB,
            "bos_token_id": 151643,
            "eos_token_id": [151645, 151643],
            "pad_token_id": 151643,
            "decoder": {
                "filename": "model.onnx",
                "head_size": HEAD_DIM,
                "hidden_size": HIDDEN,
                "num_attention_heads": HEADS,
                "num_hidden_layers": LAYERS,
                "num_key_value_heads": KV_HEADS,
                "session_options": {"provider_options": []},
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        "search": {"max_length": context, "do_sample": False, "past_present_share_buffer": True},
    }
    (folder / "genai_config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(
        json.dumps({"do_sample": False, "eos_token_id": [151645, 151643], "max_new_tokens": 32})
    )
    return folder


def test_toy_artifact_follows_the_decoder_contract(tmp_path, qwen3_tokenizer_dir):
    import onnxruntime as ort

    folder = build_toy_artifact(tmp_path / "toy", qwen3_tokenizer_dir)
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    assert inputs[:2] == ["input_ids", "attention_mask"]
    assert "past_key_values.1.value" in inputs and "present.1.value" in outputs
    assert session.get_outputs()[0].shape == ["batch", 1, VOCAB]
