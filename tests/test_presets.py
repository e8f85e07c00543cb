"""Random-weight presets: names, shapes of the real models, transformers loads them, determinism."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edgepipe.arch.presets import PRESETS, preset_config, preset_tensors, write_preset
from edgepipe.errors import InvalidInput
from edgepipe.formats.safetensors import SafetensorsModel

# The spec, from the real models' config.json (https://huggingface.co/Qwen/Qwen2.5-0.5B,
# -1.5B, -3B, https://huggingface.co/Qwen/Qwen3-0.6B, -1.7B, -4B): hidden, layers, heads,
# kv heads, head_dim, intermediate. Written here on purpose, not read from the code under test.
SPEC_TABLE = {
    "qwen2.5-0.5b": (896, 24, 14, 2, 64, 4864),
    "qwen2.5-1.5b": (1536, 28, 12, 2, 128, 8960),
    "qwen2.5-3b": (2048, 36, 16, 2, 128, 11008),
    "qwen3-0.6b": (1024, 28, 16, 8, 128, 3072),
    "qwen3-1.7b": (2048, 28, 16, 8, 128, 6144),
    "qwen3-4b": (2560, 36, 32, 8, 128, 9728),
}


def test_preset_names_are_exactly_the_documented_ones():
    assert sorted(PRESETS) == sorted(["tiny-qwen2", "tiny-qwen3", *SPEC_TABLE])


@pytest.mark.parametrize("name", sorted(SPEC_TABLE))
def test_shape_exact_presets_follow_the_real_configs(name):
    config = preset_config(PRESETS[name])
    hidden, layers, heads, kv, head_dim, inter = SPEC_TABLE[name]
    assert config["hidden_size"] == hidden
    assert config["num_hidden_layers"] == layers
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (heads, kv)
    assert config.get("head_dim", hidden // heads) == head_dim
    assert config["intermediate_size"] == inter
    assert config["vocab_size"] == 151936 and config["tie_word_embeddings"] is True
    assert config["rope_parameters"]["rope_theta"] == 1e6 and config["rms_norm_eps"] == 1e-6


def test_qwen2_0_5b_preset_has_the_real_parameter_count():
    shapes = preset_tensors(PRESETS["qwen2.5-0.5b"])
    params = sum(int(np.prod(s)) for s in shapes.values())
    assert params == 494_032_768  # Qwen2.5-0.5B's published count (tied embedding counted once)


@pytest.fixture(scope="module")
def tiny_presets(tmp_path_factory):
    out = {}
    for name in ("tiny-qwen2", "tiny-qwen3"):
        out[name] = write_preset(name, 0, tmp_path_factory.mktemp(name))
    return out


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-qwen3"])
def test_tiny_preset_loads_in_transformers_and_generates_varied_tokens(name, tiny_presets):
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tiny_presets[name]
    config = AutoConfig.from_pretrained(folder)
    head_dim = getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    assert head_dim == (32 if name == "tiny-qwen2" else 48)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    prompt = torch.tensor([[151644, 872, 198, 9707]])
    out = model.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False)
    tokens = out[0, 4:].tolist()
    assert len(set(tokens)) >= 16, tokens


def test_tiny_preset_ships_tokenizer_and_generation_config(tiny_presets):
    folder = tiny_presets["tiny-qwen3"]
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == [
        151645,
        151643,
    ]
    assert (folder / "tokenizer.json").is_file()
    assert "<think>" in (folder / "tokenizer.json").read_text()


def test_same_seed_is_byte_identical_and_other_seed_differs(tiny_presets, tmp_path):
    again = write_preset("tiny-qwen2", 0, tmp_path / "again", tokenizer=False)
    other = write_preset("tiny-qwen2", 1, tmp_path / "other", tokenizer=False)
    original = (tiny_presets["tiny-qwen2"] / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == original
    assert (other / "model.safetensors").read_bytes() != original


def test_large_preset_is_sharded_with_an_index(tmp_path):
    folder = write_preset("tiny-qwen3", 0, tmp_path, shard_bytes=5_000_000, tokenizer=False)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    weights = SafetensorsModel(folder)
    assert index["metadata"]["total_size"] == sum(i.nbytes for i in weights.tensors.values())
    assert weights.tensors["model.embed_tokens.weight"].dtype == "BF16"


def test_norms_are_near_one_and_matrices_near_zero(tiny_presets):
    weights = SafetensorsModel(tiny_presets["tiny-qwen3"])
    norm = weights.read("model.layers.0.self_attn.q_norm.weight")
    matrix = weights.read("model.layers.0.mlp.up_proj.weight")
    assert abs(norm.mean() - 1) < 0.05 and norm.std() > 0.01
    assert abs(matrix.mean()) < 0.01 and 0.1 < matrix.std() < 0.2


def test_unknown_preset_lists_the_names(tmp_path):
    with pytest.raises(InvalidInput, match="tiny-qwen2"):
        write_preset("qwen9-1b", 0, tmp_path)
