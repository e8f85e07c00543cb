"""The streaming LoRA merge (edgepipe.stages.lora) against peft's `merge_and_unload`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgepipe.errors import InvalidInput
from edgepipe.formats.safetensors import SafetensorsModel
from edgepipe.stages.lora import LoraMergedWeights, open_merged, write_merged_model
from tests.fixtures.lora import CASES, edit_adapter_config, hf_greedy_logits, save_tiny_adapter

pytest.importorskip("peft")

SMALL_PROMPT = [1, 17, 993, 40, 5, 123, 7]


def _tied(base: Path) -> bool:
    import json

    return bool(json.loads((base / "config.json").read_text())["tie_word_embeddings"])


@pytest.mark.parametrize("case", sorted(CASES))
def test_merged_tensors_match_peft_merge_and_unload(case, lora_cases):
    base, adapter, reference = lora_cases[case]
    merged = open_merged(base, adapter, tied=_tied(base))
    peft = SafetensorsModel(reference)
    changed = 0
    for name in peft.names():
        ours = merged.read(name)
        assert np.abs(ours - peft.read(name)).max() <= 1e-5, name
        chunks = np.concatenate(list(merged.read_chunks(name, 7)))
        np.testing.assert_array_equal(chunks, ours)
        changed += not np.array_equal(ours, SafetensorsModel(base).read(name))
    assert changed >= 4  # the adapter really changes the weights


def test_write_merged_model_loads_in_transformers_as_the_merge(lora_cases, tmp_path):
    base, adapter, reference = lora_cases["qwen2-saved-embed"]
    write_merged_model(open_merged(base, adapter, tied=True), tmp_path)
    (tmp_path / "config.json").write_bytes((base / "config.json").read_bytes())
    ours, _ = hf_greedy_logits(tmp_path, SMALL_PROMPT, 0)
    theirs, _ = hf_greedy_logits(reference, SMALL_PROMPT, 0)
    assert np.abs(ours[0] - theirs[0]).max() <= 1e-5


# --------------------------------------------------------------------------- refusals


def test_adapter_for_another_hidden_size_is_refused(make_tiny_model, tmp_path):
    other = make_tiny_model("qwen2", hidden_size=64, intermediate_size=128)
    adapter = save_tiny_adapter(other, tmp_path / "a", r=2, target_modules=["q_proj"])
    with pytest.raises(InvalidInput, match="trained on another model size"):
        open_merged(make_tiny_model("qwen2"), adapter, tied=True)


def test_unknown_target_module_is_refused(make_tiny_model, tmp_path):
    base = make_tiny_model("qwen2")
    adapter = save_tiny_adapter(base, tmp_path / "a", r=2, target_modules=["q_proj"])
    edit_adapter_config(adapter, target_modules=["q_proj", "c_attn"])
    with pytest.raises(InvalidInput, match="target_modules: 'c_attn' names no linear module"):
        open_merged(base, adapter, tied=True)


def test_adapter_with_more_layers_than_the_base_is_refused(make_tiny_model, tmp_path):
    deeper = make_tiny_model("qwen2", num_hidden_layers=3)
    adapter = save_tiny_adapter(deeper, tmp_path / "a", r=2, target_modules=["v_proj"])
    with pytest.raises(InvalidInput, match="layers.2.self_attn.v_proj: not in the base"):
        open_merged(make_tiny_model("qwen2"), adapter, tied=True)


def test_saved_embedding_that_peft_would_untie_is_refused(make_tiny_model, tmp_path):
    base = make_tiny_model("qwen2")
    adapter = save_tiny_adapter(
        base, tmp_path / "a", r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"]
    )
    with pytest.raises(InvalidInput, match="modules_to_save: .*ensure_weight_tying=True"):
        LoraMergedWeights(SafetensorsModel(base), adapter, tied=True)
