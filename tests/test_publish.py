"""Atomic publishing: the two-rename replace and the sweep of dead builds' folders."""

from __future__ import annotations

import os
from pathlib import Path

from edgepipe.build.publish import OLD_PREFIX, TMP_PREFIX, publish, sweep, tag


def _folder(path: Path, text: str) -> Path:
    path.mkdir(parents=True)
    (path / "model.onnx").write_text(text)
    return path


def test_publish_replaces_an_existing_artifact_and_removes_the_old_one(tmp_path):
    final = _folder(tmp_path / "dist" / "r" / "p", "old")
    publish(_folder(tmp_path / "new", "new"), final)
    assert (final / "model.onnx").read_text() == "new"
    assert sorted(p.name for p in final.parent.iterdir()) == ["p"]


def test_sweep_removes_dead_builds_and_keeps_live_ones(tmp_path):
    dead_pid = 2**22 + 12345  # above Linux's pid_max default: never a live process
    dead = _folder(tmp_path / f"{TMP_PREFIX}r-p-{dead_pid}-0123abcd", "x")
    live = _folder(tmp_path / f"{TMP_PREFIX}r-p-{os.getpid()}-0123abcd", "x")
    removed = sweep(tmp_path)
    assert removed == [dead]
    assert live.exists() and not dead.exists()


def test_sweep_restores_an_artifact_set_aside_by_a_killed_build(tmp_path):
    dead_pid = 2**22 + 12345
    aside = _folder(tmp_path / "r" / f"{OLD_PREFIX}cpu-x64-{dead_pid}-0123abcd", "old")
    sweep(tmp_path)
    assert not aside.exists()
    assert (tmp_path / "r" / "cpu-x64" / "model.onnx").read_text() == "old"


def test_tag_names_the_owning_process():
    pid, _, suffix = tag().partition("-")
    assert int(pid) == os.getpid() and len(suffix) == 8
