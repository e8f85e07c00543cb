"""Verification by default: each file hashed once, again when it changes; no manifest: said."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from edgepipe.runtime import ArtifactError, Generator, load_artifact
from edgepipe.runtime.verify import UNVERIFIABLE, VERIFIED, sha256_file, verify_files
from tests.fixtures.toy import build_toy_artifact


@pytest.fixture(scope="module")
def toy_source(tmp_path_factory, qwen3_tokenizer_dir):
    folder = tmp_path_factory.mktemp("toy-verify") / "artifact"
    return build_toy_artifact(folder, qwen3_tokenizer_dir)


@pytest.fixture
def toy(toy_source, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPIPE_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "artifact"
    shutil.copytree(toy_source, folder)
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}
    profile = {"provider": "CPUExecutionProvider", "graph_variant": "dynamic"}
    (folder / "manifest.json").write_text(json.dumps({"profile": profile, "files": files}))
    return folder


def flip_a_byte(path, keep_mtime=False):
    stat = path.stat()
    with path.open("r+b") as handle:
        handle.seek(200)
        byte = handle.read(1)
        handle.seek(200)
        handle.write(bytes([byte[0] ^ 0xFF]))
    if keep_mtime:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_the_generator_verifies_by_default_and_refuses_a_flipped_byte(toy):
    assert Generator(toy).artifact.verification == VERIFIED
    flip_a_byte(toy / "model.onnx.data")
    with pytest.raises(ArtifactError, match=r"model\.onnx\.data: sha256 .* corrupt"):
        Generator(toy)


def test_each_file_is_hashed_once_until_it_changes(toy, tmp_path):
    files = json.loads((toy / "manifest.json").read_text())["files"]
    cache = tmp_path / "cache"
    assert verify_files(toy, files, cache=cache) == len(files)
    assert verify_files(toy, files, cache=cache) == 0  # remembered: no byte read
    (toy / "model.onnx.data").touch()  # a new mtime: hashed again (and still intact)
    assert verify_files(toy, files, cache=cache) == 1


def test_a_copy_is_hashed_again(toy, tmp_path):
    files = json.loads((toy / "manifest.json").read_text())["files"]
    cache = tmp_path / "cache"
    verify_files(toy, files, cache=cache)
    data = toy / "model.onnx.data"
    shutil.copy2(data, tmp_path / "copy")  # same size and mtime, new inode
    os.replace(tmp_path / "copy", data)
    assert verify_files(toy, files, cache=cache) == 1


def test_verification_can_be_turned_off(toy):
    flip_a_byte(toy / "tokenizer_config.json", keep_mtime=True)
    assert Generator(toy, verify=False).artifact.verification.startswith("not verified")


def test_a_folder_without_manifest_is_reported_unverifiable(toy):
    (toy / "manifest.json").unlink()
    assert load_artifact(toy, verify=True).verification == UNVERIFIABLE
    assert load_artifact(toy).verification != VERIFIED


def test_verify_must_be_a_bool(toy):
    with pytest.raises(ValueError, match="verify must be True or False"):
        Generator(toy, verify="no")


def test_an_unwritable_cache_only_costs_a_hash(toy, tmp_path):
    files = json.loads((toy / "manifest.json").read_text())["files"]
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert verify_files(toy, files, cache=blocker) == len(files)
    assert verify_files(toy, files, cache=blocker) == len(files)
