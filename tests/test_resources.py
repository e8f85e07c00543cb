"""Shipped recipes/profiles are found in a checkout and in a wheel; built-in texts read back."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgepipe.errors import InvalidInput
from edgepipe.schema import shipped as resources

REPO = Path(__file__).resolve().parents[1]


def test_checkout_reads_recipes_and_profiles_in_place():
    assert resources.shipped_dir(resources.RECIPES) == REPO / "recipes"
    assert resources.shipped_dir(resources.PROFILES) == REPO / "device_profiles"
    assert resources.recipe_files()["tiny-qwen2"] == REPO / "recipes" / "tiny-qwen2.yaml"
    assert list(resources.profile_files()) == sorted(resources.profile_files())


def test_installed_wheel_reads_the_force_included_copies(tmp_path, monkeypatch):
    # A wheel has no pyproject.toml beside the package: files come from edgepipe/_shipped.
    package = tmp_path / "site-packages" / "edgepipe"
    (package / "_shipped" / "recipes").mkdir(parents=True)
    (package / "_shipped" / "recipes" / "r1.yaml").write_text("name: r1\n")
    monkeypatch.setattr(resources, "PACKAGE_DIR", package)
    assert resources.shipped_dir(resources.RECIPES) == package / "_shipped" / "recipes"
    assert resources.recipe_files() == {"r1": package / "_shipped" / "recipes" / "r1.yaml"}
    assert resources.profile_files() == {}


def test_wheel_layout_is_declared_in_pyproject():
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert '"recipes" = "edgepipe/_shipped/recipes"' in text
    assert '"device_profiles" = "edgepipe/_shipped/device_profiles"' in text


def test_shipped_dir_rejects_an_unknown_kind():
    with pytest.raises(ValueError, match="recipes"):
        resources.shipped_dir("models")


def test_resolve_accepts_a_shipped_name_or_a_path(tmp_path):
    assert resources.resolve_recipe("qwen3-0.6b") == REPO / "recipes" / "qwen3-0.6b.yaml"
    assert resources.resolve_profile("cpu-x64") == REPO / "device_profiles" / "cpu-x64.yaml"
    mine = tmp_path / "mine.yaml"
    mine.write_text("name: mine\n")
    assert resources.resolve_recipe(str(mine)) == mine
    assert resources.resolve_profile(mine) == mine


def test_resolve_unknown_name_lists_the_shipped_ones():
    with pytest.raises(InvalidInput) as info:
        resources.resolve_profile("cpu-x86")
    message = str(info.value)
    assert message.startswith("cpu-x86: unknown device profile; shipped ones are: cpu-arm64, ")
    assert "qnn-htp" in message and "path of a .yaml file" in message


def test_resolve_missing_path_says_file_not_found(tmp_path):
    with pytest.raises(InvalidInput, match="nope.yaml: file not found"):
        resources.resolve_recipe(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("qwen3-0.6b", False), ("mine.yaml", True), ("a/b", True), ("x.yml", True)],
)
def test_looks_like_path(text, expected):
    assert resources.looks_like_path(text) is expected


@pytest.mark.parametrize("name", resources.BUILTIN_TEXT_FILES)
def test_builtin_texts_are_a_few_kilobytes_each(name):
    text = resources.read_builtin_text(name)
    assert 1500 < len(text.encode("utf-8")) < 20_000


def test_builtin_texts_cover_prose_code_and_cjk():
    assert "def " in resources.read_builtin_text("code")
    cjk = resources.read_builtin_text("cjk")
    assert sum("\u4e00" <= ch <= "\u9fff" for ch in cjk) > 300
    assert any("\u3040" <= ch <= "\u30ff" for ch in cjk), "some Japanese kana"
    mixed = resources.read_builtin_text("mixed")
    for part in resources.BUILTIN_TEXT_FILES:
        assert resources.read_builtin_text(part) in mixed


def test_unknown_builtin_text_lists_the_allowed_names():
    with pytest.raises(InvalidInput, match="allowed: prose, code, cjk, mixed"):
        resources.read_builtin_text("wikitext")
