"""The toy decoder of tests/fixtures/toy.py follows the decoder contract."""

from __future__ import annotations

import json

from tests.fixtures.toy import CONTEXT, HEAD_DIM, LAYERS, VOCAB, build_toy_artifact


def test_toy_artifact_follows_the_decoder_contract(tmp_path, qwen3_tokenizer_dir):
    import onnxruntime as ort

    folder = build_toy_artifact(tmp_path / "toy", qwen3_tokenizer_dir)
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    assert inputs[:2] == ["input_ids", "attention_mask"]
    assert "past_key_values.1.value" in inputs and "present.1.value" in outputs
    assert session.get_outputs()[0].shape == ["batch", 1, VOCAB]


def test_toy_genai_config_describes_the_toy_graph(tmp_path, qwen3_tokenizer_dir):
    import onnxruntime as ort

    folder = build_toy_artifact(tmp_path / "toy", qwen3_tokenizer_dir)
    config = json.loads((folder / "genai_config.json").read_text())
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    past = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    decoder = config["model"]["decoder"]
    assert decoder["filename"] == "model.onnx"
    assert decoder["num_hidden_layers"] == LAYERS == len(past) // 2
    assert decoder["head_size"] == HEAD_DIM == past[0].shape[-1]
    assert config["model"]["context_length"] == CONTEXT
    assert config["model"]["vocab_size"] == VOCAB
