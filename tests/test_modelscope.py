"""ModelScope downloads (edgepipe.stages.modelscope) against a pre-filled local cache, offline."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from edgepipe.errors import BuildFailed, MissingDependency
from edgepipe.stages.modelscope import modelscope_download

REVISION = "v1.0.0"
PATTERNS = ("config.json", "*.safetensors")


def prefill(cache: Path, repo_id: str, revision: str, source: Path) -> Path:
    """Lay `source`'s files out as modelscope-hub's cache does:
    `<MODELSCOPE_CACHE>/models/<owner>--<name>/snapshots/<revision>/`."""
    snapshot = cache / "models" / repo_id.replace("/", "--") / "snapshots" / revision
    shutil.copytree(source, snapshot)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    pytest.importorskip("modelscope")
    cache = tmp_path / "modelscope"
    monkeypatch.setenv("MODELSCOPE_CACHE", str(cache))
    monkeypatch.setenv("MODELSCOPE_OFFLINE", "1")
    return cache


def test_offline_download_reads_the_prefilled_cache(offline_cache, make_tiny_model):
    snapshot = prefill(offline_cache, "Qwen/Tiny-Qwen2", REVISION, make_tiny_model("qwen2"))
    got = modelscope_download("Qwen/Tiny-Qwen2", REVISION, PATTERNS)
    assert got.resolve() == snapshot.resolve()
    assert (got / "config.json").is_file()


def test_offline_cache_miss_says_how_to_fix_it(offline_cache, make_tiny_model):
    prefill(offline_cache, "Qwen/Tiny-Qwen2", REVISION, make_tiny_model("qwen2"))
    with pytest.raises(BuildFailed) as err:
        modelscope_download("Qwen/Tiny-Qwen2", "v2.0.0", PATTERNS)
    message = str(err.value)
    assert "source.modelscope: could not fetch Qwen/Tiny-Qwen2@v2.0.0" in message
    assert "MODELSCOPE_OFFLINE" in message and "MODELSCOPE_CACHE" in message


def test_missing_package_names_the_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "modelscope", None)  # import fails as if not installed
    with pytest.raises(MissingDependency, match=r"pip install 'edgepipe\[modelscope\]'"):
        modelscope_download("Qwen/Tiny-Qwen2", REVISION, PATTERNS)
