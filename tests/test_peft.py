"""Reading PEFT adapter folders (edgepipe.formats.peft): what is indexed, what is refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from edgepipe.errors import InvalidInput
from edgepipe.formats.peft import lora_scale, read_adapter
from edgepipe.formats.safetensors import write_safetensors
from tests.fixtures.lora import save_tiny_adapter

CONFIG = {
    "peft_type": "LORA",
    "r": 2,
    "lora_alpha": 4,
    "target_modules": ["q_proj"],
    "bias": "none",
}
PAIR = "base_model.model.model.layers.0.self_attn.q_proj"


def write_adapter(folder: Path, config: dict | None = CONFIG, *, pickle_only: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (folder / "adapter_config.json").write_text(json.dumps(config))
    if pickle_only:
        (folder / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    else:
        tensors = {
            f"{PAIR}.lora_A.weight": np.ones((2, 8), np.float32),
            f"{PAIR}.lora_B.weight": np.ones((8, 2), np.float32),
            "base_model.model.lm_head.weight": np.ones((5, 8), np.float32),
        }
        write_safetensors(folder / "adapter_model.safetensors", tensors)
    return folder


def test_pairs_and_saved_modules_are_indexed_by_base_names(tmp_path):
    adapter = read_adapter(write_adapter(tmp_path))
    pair = adapter.pairs["model.layers.0.self_attn.q_proj.weight"]
    assert (pair.a.shape, pair.b.shape, pair.scale) == ((2, 8), (8, 2), 2.0)
    assert list(adapter.saved) == ["lm_head.weight"]


def test_scale_follows_rslora_and_the_patterns():
    config = {**CONFIG, "r": 4, "lora_alpha": 8, "rank_pattern": {"o_proj": 2}}
    assert lora_scale(config, "model.layers.0.self_attn.q_proj") == (4, 2.0)
    assert lora_scale(config, "model.layers.0.self_attn.o_proj") == (2, 4.0)
    assert lora_scale({**config, "use_rslora": True}, "x.q_proj") == (4, 8 / math.sqrt(4))
    assert (
        lora_scale(
            {**config, "alpha_pattern": {r"layers\.1\..*": 1}}, "model.layers.1.mlp.up_proj"
        )[1]
        == 0.25
    )


def test_missing_adapter_config_is_refused(tmp_path):
    with pytest.raises(InvalidInput, match="no adapter_config.json"):
        read_adapter(write_adapter(tmp_path, None))


def test_pickle_only_adapter_is_refused_with_the_conversion_command(tmp_path):
    with pytest.raises(InvalidInput, match=r"only adapter_model.bin.*safe_serialization=True"):
        read_adapter(write_adapter(tmp_path, pickle_only=True))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"peft_type": "IA3"}, "peft_type"),
        ({"use_dora": True}, "use_dora"),
        ({"bias": "all"}, "bias"),
        ({"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
        ({"r": 3}, "rank r=3"),
    ],
)
def test_unsupported_config_is_refused_naming_the_field(tmp_path, change, field):
    with pytest.raises(InvalidInput, match=field):
        read_adapter(write_adapter(tmp_path, {**CONFIG, **change}))


def test_a_dora_adapter_made_by_peft_is_refused(make_tiny_model, tmp_path):
    adapter = save_tiny_adapter(
        make_tiny_model("qwen3"), tmp_path / "dora", r=2, target_modules=["q_proj"], use_dora=True
    )
    with pytest.raises(InvalidInput, match="use_dora: True: not supported") as err:
        read_adapter(adapter)
    assert "adapter_config.json" in str(err.value)
