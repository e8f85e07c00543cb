"""Tests for edgepipe.stages.source: source identity (cache keys) and materializing each kind."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from edgepipe.errors import BuildFailed, InvalidInput
from edgepipe.schema import Source
from edgepipe.stages.source import HUB_ALLOW_PATTERNS, source_from_recipe


def stage(block: dict, recipe_dir=None):
    """The source stage of a recipe whose `source:` block is `block` (validated as a recipe's)."""
    context = {"base_dir": recipe_dir} if recipe_dir is not None else None
    return source_from_recipe(Source.model_validate(block, context=context))


def test_preset_identity_is_name_and_seed_and_materializes_a_model_folder(tmp_path):
    source = stage({"preset": {"name": "tiny-qwen2", "seed": 3}})
    assert source.identity() == {"preset": "tiny-qwen2", "seed": 3}
    folder = source.materialize(tmp_path)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "qwen2"
    assert list(folder.glob("*.safetensors"))
    assert source.materialize(tmp_path) == folder  # once per build


def test_path_identity_follows_file_content_not_folder_name(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "qwen2"}')
    (folder / "model.safetensors").write_bytes(b"weights-1")
    (folder / "README.md").write_text("not part of the identity")
    first = stage({"path": str(folder)}).identity()
    assert sorted(first["files"]) == ["config.json", "model.safetensors"]
    (folder / "model.safetensors").write_bytes(b"weights-2")
    assert stage({"path": str(folder)}).identity() != first


def test_relative_path_resolves_against_the_recipe_folder(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    source = stage({"path": "m"}, recipe_dir=tmp_path)
    assert source.materialize(tmp_path / "work") == tmp_path / "m"


def test_path_without_config_is_invalid_input(tmp_path):
    with pytest.raises(InvalidInput, match="config.json"):
        stage({"path": str(tmp_path)}).identity()


@pytest.mark.parametrize("block", [{}, {"path": "a", "preset": {"name": "tiny-qwen2"}}])
def test_a_source_block_needs_exactly_one_kind(block):
    # The schema enforces it, so the stage never sees an ambiguous block.
    with pytest.raises(ValidationError, match="exactly one of hub, modelscope, path, preset"):
        Source.model_validate(block)


def test_hub_identity_is_id_and_pinned_revision():
    source = stage({"hub": {"id": "Qwen/Qwen3-0.6B", "revision": "a" * 40}})
    assert source.identity() == {"hub": "Qwen/Qwen3-0.6B", "revision": "a" * 40}
    assert source.revision == "a" * 40


def test_offline_hub_miss_fails_with_a_hint(tmp_path, monkeypatch):
    import huggingface_hub

    calls = {}

    def offline_snapshot_download(**kwargs):
        calls.update(kwargs)
        raise huggingface_hub.errors.LocalEntryNotFoundError("not in the cache")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline_snapshot_download)
    source = stage({"hub": {"id": "Qwen/Qwen3-0.6B", "revision": "b" * 40}})
    with pytest.raises(BuildFailed, match="HF_HUB_OFFLINE"):
        source.materialize(tmp_path)
    assert calls["revision"] == "b" * 40
    assert calls["allow_patterns"] == list(HUB_ALLOW_PATTERNS)


def test_bundled_identity_hashes_the_compact_files_and_materializes_a_full_folder(tmp_path):
    source = stage({"bundled": {"name": "tiny-trained"}})
    ident = source.identity()
    assert ident["bundled"] == "tiny-trained"
    assert {"config.json", "model.safetensors"} <= set(ident["files"])
    folder = source.materialize(tmp_path)
    assert folder.parent == tmp_path
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    assert config["vocab_size"] == 151936 and (folder / "tokenizer.json").is_file()


def test_unknown_bundled_name_lists_the_known_ones():
    with pytest.raises(ValidationError, match="tiny-trained"):
        stage({"bundled": {"name": "nope"}})
