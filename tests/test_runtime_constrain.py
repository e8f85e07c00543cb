"""Tests for constrained decoding (edgepipe.runtime.constrain) through the Generator.

The toy artifact has random weights over the real Qwen vocabulary: left alone it writes
gibberish, so what validates here validates because of the constraint.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from edgepipe.runtime import ConstraintUnavailable, Generator, InvalidConstraint
from edgepipe.runtime.constrain import apply_bitmask, grammar_for

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "score": {"type": "number", "minimum": -100, "maximum": 100, "multipleOf": 0.5},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "address"],
    "additionalProperties": False,
}
# Temperature 1 with top-k 20 (Qwen's recommended k): top-k keeps the sampler off a full sort of
# the 151,936 logits per token, which would dominate these tests' time.
SAMPLED = {"do_sample": True, "temperature": 1.0, "top_k": 20, "top_p": 1.0}
RUNS = 100
BATCH = 25


@pytest.fixture(scope="module")
def gen(flat_toy_dirs):
    return Generator(flat_toy_dirs["qwen3"], intra_op_num_threads=1)


def sampled(gen, prompt, runs=RUNS, **params):
    """`runs` seeded sampled generations, in batches (one numpy Generator per batch)."""
    results = []
    for seed in range(runs // BATCH):
        results += gen.generate([prompt] * BATCH, seed=seed, **SAMPLED, **params)
    return results


def valid(text, schema) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False
    return True


def test_every_sampled_generation_satisfies_the_schema(gen):
    results = sampled(gen, "Person:", json_schema=SCHEMA, max_new_tokens=200)
    texts = [r.text for r in results]
    assert all(valid(t, SCHEMA) for t in texts), [t for t in texts if not valid(t, SCHEMA)][:3]
    assert all(r.finish_reason == "stop" for r in results)
    assert len(set(texts)) > RUNS // 4  # sampled, not one forced answer
    assert ", " in texts[0] and ": " in texts[0]  # the way Qwen writes JSON


def test_without_the_constraint_the_same_generations_mostly_fail(gen):
    results = sampled(gen, "Person:", max_new_tokens=40)
    assert sum(valid(r.text, SCHEMA) for r in results) < RUNS // 10


def test_json_object_gives_an_object(gen):
    # Any object: a random model may write one long string, so only finished replies parse.
    results = sampled(gen, "JSON:", runs=BATCH, json_object=True, max_new_tokens=120)
    assert all(r.text.startswith("{") for r in results)
    finished = [r for r in results if r.finish_reason == "stop"]
    assert all(isinstance(json.loads(r.text), dict) for r in finished)


def test_regex_and_choices_constrain_every_sample(gen):
    pattern = r"[0-9]{3}-[a-z]{2,4}"
    results = sampled(gen, "Code:", regex=pattern, max_new_tokens=20)
    assert all(re.fullmatch(pattern, r.text) for r in results), [r.text for r in results][:5]
    assert (
        sum(
            re.fullmatch(pattern, r.text) is not None
            for r in sampled(gen, "Code:", max_new_tokens=8)
        )
        == 0
    )
    choices = ["yes", "no", "maybe later"]
    picked = sampled(gen, "Answer:", choices=choices, max_new_tokens=10)
    assert {r.text for r in picked} <= set(choices)


def test_greedy_constrained_stream_matches_generate(gen):
    stream = gen.stream("Person:", json_schema=SCHEMA, max_new_tokens=200)
    text = "".join(stream)
    assert (
        text
        == stream.result.text
        == gen.generate("Person:", json_schema=SCHEMA, max_new_tokens=200).text
    )
    assert valid(text, SCHEMA)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"json_schema": {"type": "objekt"}}, "Invalid type: objekt"),
        ({"json_schema": "{not json"}, "json_schema is not valid JSON"),
        ({"json_schema": {"type": "object", "dependentSchemas": {}}}, "dependentSchemas"),
        ({"json_schema": {"type": "string", "format": "weird"}}, "Unknown format: weird"),
        ({"regex": "(abc"}, "invalid regex"),
        ({"regex": "a[^\\s\\S]b"}, "matches nothing"),
        ({"choices": []}, "choices must be a non-empty list"),
        ({"choices": "yes"}, "choices must be a non-empty list"),
        ({"regex": "a", "json_object": True}, "give one constraint at most"),
    ],
)
def test_bad_constraints_fail_before_generation(gen, monkeypatch, params, message):
    calls = []
    monkeypatch.setattr(gen._engine, "begin", lambda *a, **k: calls.append(a))
    with pytest.raises(InvalidConstraint, match=re.escape(message)):
        gen.generate("x", **params)
    with pytest.raises(InvalidConstraint, match=re.escape(message)):
        gen.stream("x", **params)
    assert calls == []


def test_missing_library_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)
    with pytest.raises(
        ConstraintUnavailable, match=re.escape("pip install 'edgepipe[constrained]'")
    ):
        grammar_for(json_object=True)
    assert grammar_for() is None  # no constraint, no import


def test_the_runtime_imports_llguidance_only_for_a_constraint(gen):
    code = (
        "import sys\n"
        "from edgepipe.runtime import Generator\n"
        f"gen = Generator({str(gen.artifact.path)!r})\n"
        "gen.generate('x', max_new_tokens=2)\n"
        "assert 'llguidance' not in sys.modules\n"
        "gen.generate('x', max_new_tokens=2, regex='[a-z]+')\n"
        "assert 'llguidance' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_apply_bitmask_sets_exactly_the_disallowed_logits_to_minus_infinity():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(1000).astype(np.float32)
    allowed = rng.integers(0, 2, 1000).astype(np.uint8)
    out = logits.copy()
    apply_bitmask(out, allowed)
    assert np.array_equal(out[allowed == 1], logits[allowed == 1])
    assert np.all(np.isneginf(out[allowed == 0]))
