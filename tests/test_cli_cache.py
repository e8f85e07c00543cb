"""The stage cache's size cap (LRU eviction), its corrupt-entry note, and `edgepipe cache`."""

from __future__ import annotations

import os

import pytest

from edgepipe.build.cache import StageCache, list_entries
from edgepipe.cli.main import main


def output(folder, size):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx.data").write_bytes(os.urandom(size))
    return folder


@pytest.fixture
def notes():
    return []


def test_a_store_past_the_cap_evicts_the_least_recently_used(tmp_path, notes):
    cache = StageCache(tmp_path / "c", max_bytes=25_000, report=notes.append)
    for i, name in enumerate(("a", "b")):
        cache.store("export", name * 8, output(tmp_path / name, 10_000))
        os.utime(cache.entry_dir("export", name * 8) / "entry.json", (i, i))
    assert cache.lookup("export", "a" * 8) is not None  # a hit makes "a" the most recent
    cache.store("export", "c" * 8, output(tmp_path / "c-out", 10_000))
    assert sorted(e.key for e in list_entries(tmp_path / "c")) == ["a" * 8, "c" * 8]
    assert notes and notes[-1].startswith("cache: evicted 1 least recently used entries")


def test_a_corrupt_entry_is_rebuilt_with_a_note(tmp_path, notes):
    cache = StageCache(tmp_path / "c", report=notes.append)
    entry = cache.store("export", "k" * 8, output(tmp_path / "o", 100))
    (entry / "model.onnx.data").write_bytes(b"flipped")
    assert cache.lookup("export", "k" * 8) is None
    assert notes == ["cache: export entry kkkkkkkk was corrupt; removed, rebuilding it"]


def test_cache_ls_prune_clear(tmp_path, capsys):
    root = tmp_path / "c"
    cache = StageCache(root, report=lambda m: None)
    for name in ("a", "b"):
        cache.store("export", name * 8, output(tmp_path / name, 2_000_000))
    assert main(["cache", "ls", "--cache-dir", str(root)]) == 0
    assert "2 entries, 0.00 GB" in capsys.readouterr().out
    assert main(["cache", "prune", "--max-gb", "0.003", "--cache-dir", str(root)]) == 0
    assert capsys.readouterr().out.startswith("removed 1 entries")
    assert main(["cache", "clear", "--cache-dir", str(root)]) == 0
    assert list_entries(root) == []
    (tmp_path / "f").write_text("")
    assert main(["cache", "ls", "--cache-dir", str(tmp_path / "f")]) == 2
