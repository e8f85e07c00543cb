"""Tests for edgepipe.build.matrix: the build matrix, its shards, and `edgepipe matrix` output."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgepipe.build.matrix import (
    MatrixEntry,
    build_matrix,
    format_matrix,
    parse_shard,
    shard_entries,
    shard_slice,
)
from edgepipe.build.plan import matrix_entries, plan_builds
from edgepipe.cli.main import main
from edgepipe.errors import InvalidInput
from edgepipe.schema import shipped as resources

RECIPES = [
    ("qwen3-0.6b", "qwen3-0.6b", ["cpu-x64", "qnn-htp", "directml"]),
    ("tiny-qwen2", "tiny-qwen2", ["cpu-x64"]),
    ("qwen2.5-0.5b-instruct", "recipes/q.yaml", ["cpu-arm64", "cpu-x64"]),
]


def test_matrix_is_sorted_and_deduplicated():
    entries = build_matrix([*RECIPES, ("tiny-qwen2", "tiny-qwen2", ["cpu-x64"])])
    assert entries == sorted(entries)
    pairs = [(e.recipe, e.profile) for e in entries]
    assert len(pairs) == len(set(pairs)) == 6


def test_profile_filter_keeps_only_named_profiles():
    entries = build_matrix(RECIPES, profiles=["cpu-x64"])
    assert {e.profile for e in entries} == {"cpu-x64"}
    assert len(entries) == 3


@given(
    pairs=st.sets(st.tuples(st.sampled_from("abcdefg"), st.sampled_from("xyz")), max_size=21),
    count=st.integers(1, 25),
)
def test_shards_cover_every_pair_exactly_once(pairs, count):
    entries = [MatrixEntry(r, p) for r, p in pairs]
    seen = []
    for index in range(1, count + 1):
        seen.extend(shard_slice(entries, index, count))
    assert sorted(seen) == sorted(entries)


def test_shard_slices_do_not_depend_on_input_order():
    entries = build_matrix(RECIPES)
    assert shard_slice(entries, 2, 3) == shard_slice(list(reversed(entries)), 2, 3)


@pytest.mark.parametrize("text", ["0/3", "4/3", "1/0", "a/b", "1", "1/2/3", ""])
def test_bad_shard_is_invalid_input(text):
    with pytest.raises(InvalidInput, match="--shard"):
        parse_shard(text)


def test_parse_shard_accepts_one_based_index():
    assert parse_shard("1/4") == (1, 4)
    assert parse_shard("4/4") == (4, 4)


def test_shard_entries_leave_out_empty_shards():
    entries = build_matrix(RECIPES)
    jobs = shard_entries(entries, shards=10)
    assert [j["shard"] for j in jobs] == [f"{i}/10" for i in range(1, 7)]
    assert all(len(j["builds"]) == 1 for j in jobs)


def test_github_format_is_one_line_of_include_entries():
    text = format_matrix(build_matrix(RECIPES), "github", shards=2)
    assert "\n" not in text
    doc = json.loads(text)
    assert [e["shard"] for e in doc["include"]] == ["1/2", "2/2"]
    assert all(e["name"] for e in doc["include"])


def test_unknown_format_is_invalid_input():
    with pytest.raises(InvalidInput, match="allowed values: github, json"):
        format_matrix([], "yaml")


def _shipped_pairs():
    return matrix_entries(list(resources.recipe_files()))


@pytest.mark.parametrize("shards", [None, 3])
def test_matrix_command_json_shards_cover_all_shipped_pairs(capsys, shards):
    argv = ["matrix", "--format", "json"] + ([] if shards is None else ["--shards", str(shards)])
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    everything = _shipped_pairs()
    assert [(b["recipe"], b["profile"]) for b in doc["builds"]] == [
        (e.recipe, e.profile) for e in everything
    ]
    covered = []
    for job in doc["shards"]:
        index, count = parse_shard(job["shard"])
        part = shard_slice(everything, index, count)
        assert [(b["recipe"], b["profile"]) for b in job["builds"]] == [
            (e.recipe, e.profile) for e in part
        ]
        covered.extend((e.recipe, e.profile) for e in part)
    assert sorted(covered) == sorted((e.recipe, e.profile) for e in everything)
    assert len(covered) == len(set(covered))


def test_build_shards_plan_the_same_pairs_as_matrix_shards():
    everything = _shipped_pairs()
    recipes = list(resources.recipe_files())
    planned = []
    for index in (1, 2):
        planned.extend(
            (p.recipe.name, p.profile.name) for p in plan_builds(recipes, shard=(index, 2))
        )
    assert sorted(planned) == sorted((e.recipe, e.profile) for e in everything)
