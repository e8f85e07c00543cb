"""Tests for edgepipe.stages.hub: what is fetched, and how a failed fetch is reported."""

from __future__ import annotations

import pytest

from edgepipe.errors import BuildFailed
from edgepipe.stages.hub import hub_download

huggingface_hub = pytest.importorskip("huggingface_hub")


def test_only_the_given_patterns_are_fetched_at_the_pinned_revision(monkeypatch, tmp_path):
    seen = {}

    def snapshot_download(**kwargs):
        seen.update(kwargs)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert hub_download("me/lora", "v1.0", ("adapter_config.json",)) == tmp_path
    assert seen == {
        "repo_id": "me/lora",
        "revision": "v1.0",
        "allow_patterns": ["adapter_config.json"],
    }


def test_offline_cache_miss_names_the_field_and_the_fix(monkeypatch):
    def snapshot_download(**kwargs):
        raise FileNotFoundError("not in the cache")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(BuildFailed, match=r"source\.adapter\.hub: .*unset HF_HUB_OFFLINE"):
        hub_download("me/lora", "v1.0", ("adapter_config.json",), field="source.adapter.hub")
