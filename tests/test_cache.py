"""Tests for edgepipe.build.cache: keys, verified reuse, corruption detection, atomic stores."""

from __future__ import annotations

import json

import pytest

from edgepipe.build.cache import ENTRY_FILE, StageCache, content_hash, default_cache_root, hash_tree


@pytest.fixture
def stage_output(tmp_path):
    out = tmp_path / "export"
    (out / "sub").mkdir(parents=True)
    (out / "model.onnx").write_bytes(b"graph" * 100)
    (out / "model.onnx.data").write_bytes(bytes(range(256)) * 64)
    (out / "sub" / "genai_config.json").write_text('{"model": {}}')
    return out


def test_key_is_stable_and_depends_on_every_input(tmp_path):
    cache = StageCache(tmp_path)
    inputs = {"source": {"preset": "tiny-qwen2", "seed": 0}, "quant": None}
    assert cache.key("export", inputs) == cache.key("export", dict(reversed(inputs.items())))
    assert cache.key("export", inputs) != cache.key("export", {**inputs, "quant": "int4"})
    assert cache.key("export", inputs) != cache.key("reference", inputs)


def test_stored_entry_is_found_with_identical_files(tmp_path, stage_output):
    cache = StageCache(tmp_path / "cache")
    key = cache.key("export", {"a": 1})
    assert cache.lookup("export", key) is None
    entry = cache.store("export", key, stage_output)
    assert entry == cache.lookup("export", key)
    assert hash_tree(entry, exclude=(ENTRY_FILE,)) == hash_tree(stage_output)
    recorded = json.loads((entry / ENTRY_FILE).read_text())["files"]
    assert sorted(recorded) == ["model.onnx", "model.onnx.data", "sub/genai_config.json"]
    dest = tmp_path / "copy"
    cache.materialize(entry, dest)
    assert hash_tree(dest) == hash_tree(stage_output)


def test_flipped_byte_in_entry_is_detected_and_entry_removed(tmp_path, stage_output):
    cache = StageCache(tmp_path / "cache")
    key = cache.key("export", {"a": 1})
    entry = cache.store("export", key, stage_output)
    data = entry / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[1000] ^= 0x01
    data.write_bytes(bytes(raw))
    assert cache.lookup("export", key) is None
    assert not entry.exists()
    # The stage runs again and stores a good entry under the same key.
    assert cache.store("export", key, stage_output) is not None
    assert cache.lookup("export", key) is not None


@pytest.mark.parametrize("damage", ["delete_file", "add_file", "delete_entry_json"])
def test_damaged_entry_counts_as_miss(tmp_path, stage_output, damage):
    cache = StageCache(tmp_path / "cache")
    key = cache.key("export", {"a": 1})
    entry = cache.store("export", key, stage_output)
    if damage == "delete_file":
        (entry / "model.onnx").unlink()
    elif damage == "add_file":
        (entry / "extra.bin").write_bytes(b"x")
    else:
        (entry / ENTRY_FILE).unlink()
    assert cache.lookup("export", key) is None


def test_store_leaves_no_temp_folder_and_moves_when_asked(tmp_path, stage_output):
    cache = StageCache(tmp_path / "cache")
    key = cache.key("export", {"a": 2})
    cache.store("export", key, stage_output, move=True)
    assert not stage_output.exists()
    assert [p.name for p in (tmp_path / "cache" / "export").iterdir()] == [key]


def test_disabled_cache_never_hits_or_stores(tmp_path, stage_output):
    cache = StageCache(tmp_path / "cache", enabled=False)
    key = cache.key("export", {"a": 1})
    assert cache.store("export", key, stage_output) is None
    assert cache.lookup("export", key) is None
    assert not (tmp_path / "cache").exists()


def test_unwritable_cache_is_not_an_error(tmp_path, stage_output):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cache = StageCache(blocker / "cache")
    assert cache.store("export", "k" * 64, stage_output) is None


def test_default_root_honours_edgepipe_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGEPIPE_CACHE", str(tmp_path))
    assert default_cache_root() == tmp_path / "stages"


def test_content_hash_ignores_key_order():
    assert content_hash({"a": 1, "b": [1, 2]}) == content_hash({"b": [1, 2], "a": 1})
    assert content_hash({"a": 1}) != content_hash({"a": 2})
