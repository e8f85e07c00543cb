"""Prompt-lookup speculative decoding: the drafter, exactness against plain greedy, rollback."""

from __future__ import annotations

import numpy as np
import pytest

from edgepipe.runtime import Generator, GeneratorError
from edgepipe.runtime.speculative import NgramDrafter
from tests.fixtures.toy import build_toy_artifact

CODE = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n"
PROMPTS = [
    "Hello world, this is",
    "Rewrite with add renamed to plus:\n" + CODE,
    "the cat the cat the cat the cat the cat the",
    "Hi",
]


@pytest.fixture(scope="module")
def toy_all(tmp_path_factory, qwen3_tokenizer_dir):
    folder = tmp_path_factory.mktemp("toy-all") / "artifact"
    return Generator(build_toy_artifact(folder, qwen3_tokenizer_dir, all_logits=True))


@pytest.fixture(scope="module")
def tiny_all(tmp_path_factory, tiny_qwen2_dir, tiny_qwen3_dir):
    from edgepipe.stages.export.dynamic import build_decoder

    gens = {}
    for family, source in (("qwen2", tiny_qwen2_dir), ("qwen3", tiny_qwen3_dir)):
        folder = tmp_path_factory.mktemp(f"all-logits-{family}")
        build_decoder(source, folder, all_logits=True)
        gens[family] = Generator(folder)
    return gens


# -- the drafter ---------------------------------------------------------------------------------


def test_drafter_proposes_what_followed_the_latest_match_of_the_longest_tail():
    drafter = NgramDrafter([1, 2, 3, 9, 9, 2, 3, 4, 5, 6, 1, 2, 3], k_start=3)
    # Tail (1, 2, 3) occurred at the start, followed by 9 9 2; (2, 3) last occurred before 4 5 6.
    assert drafter.draft(room=8) == [9, 9, 2]
    assert drafter.draft(room=2) == [9, 9]
    assert NgramDrafter([5, 6, 7, 8], k_start=3).draft(room=8) == []


def test_drafter_grows_k_on_full_acceptance_and_shrinks_it_on_rejection():
    drafter = NgramDrafter([], k_start=4, k_max=8)
    drafter.record(drafted=4, accepted=4)
    assert drafter.k == 6
    drafter.record(drafted=6, accepted=2)
    assert drafter.k == 5


def test_drafter_pauses_when_acceptance_is_low_and_drafts_again_after_the_cooldown():
    drafter = NgramDrafter([1, 2, 1, 2, 1, 2], cooldown=3)
    for _ in range(5):
        drafter.record(drafted=4, accepted=0)
        if drafter.paused:
            break
    assert drafter.stats.pauses == 1 and drafter.paused == 3
    assert [drafter.draft(room=8) for _ in range(3)] == [[], [], []]
    assert drafter.draft(room=8) != []


# -- exactness -----------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", PROMPTS)
def test_speculative_greedy_equals_plain_greedy_on_the_toy(toy_all, prompt):
    plain = toy_all.generate(prompt, max_new_tokens=40, stop_token_ids=[])
    spec = toy_all.generate(prompt, max_new_tokens=40, stop_token_ids=[], speculative="ngram")
    assert spec.token_ids == plain.token_ids
    assert spec.text == plain.text
    assert spec.metrics.verify_calls > 0 or spec.metrics.drafted_tokens == 0


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
@pytest.mark.parametrize("prompt", PROMPTS[:3])
def test_speculative_greedy_equals_plain_greedy_on_tiny_models(tiny_all, family, prompt):
    gen = tiny_all[family]
    plain = gen.generate(prompt, max_new_tokens=48, stop_token_ids=[])
    spec = gen.generate(prompt, max_new_tokens=48, stop_token_ids=[], speculative="ngram")
    assert spec.token_ids == plain.token_ids


def test_speculation_drafts_and_accepts_on_a_repetitive_output(toy_all):
    # The toy's greedy output falls into a loop; once it does, every draft is right.
    spec = toy_all.generate(PROMPTS[2], max_new_tokens=64, stop_token_ids=[], speculative="ngram")
    m = spec.metrics
    assert m.verify_calls > 0 and m.accepted_tokens >= 8
    assert m.drafted_tokens >= m.accepted_tokens


def test_speculation_stops_at_stop_tokens_and_max_new_tokens_like_plain(toy_all):
    plain = toy_all.generate(PROMPTS[2], max_new_tokens=64, stop_token_ids=[])
    stop = plain.token_ids[30]
    for params in ({"max_new_tokens": 17, "stop_token_ids": []}, {"stop_token_ids": [stop]}):
        want = toy_all.generate(PROMPTS[2], **{"max_new_tokens": 64, **params})
        got = toy_all.generate(PROMPTS[2], **{"max_new_tokens": 64, **params}, speculative="ngram")
        assert (got.token_ids, got.finish_reason) == (want.token_ids, want.finish_reason)


def test_rejected_drafts_leave_the_cache_as_plain_decoding_leaves_it(toy_all):
    """KV after a verify step with wrong drafts gives the next-step logits of plain decoding."""
    ids = toy_all.encode(PROMPTS[1])
    n = len(ids)
    plain = toy_all.engine.begin([ids], 8, None)
    first = int(np.argmax(plain.prefill()[0]))
    second = int(np.argmax(plain.step(np.array([[first]]), np.array([n + 1]))[0]))
    want = plain.step(np.array([[second]]), np.array([n + 2]))

    spec = toy_all.engine.begin([ids], 8, None)
    spec.prefill()
    wrong = [(second + 1) % 1000, 7, 8]
    rows = spec.verify(np.array([[first, *wrong]]), np.array([n + 4]))[0]
    assert int(np.argmax(rows[0])) == second  # the first draft is rejected
    got = spec.step(np.array([[second]]), np.array([n + 2]))  # rolled back by length only
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# -- refusals ------------------------------------------------------------------------------------


def test_speculation_refuses_sampling_batches_and_unknown_modes(toy_all):
    with pytest.raises(ValueError, match="greedy"):
        toy_all.generate("Hi", do_sample=True, temperature=0.7, speculative="ngram")
    with pytest.raises(ValueError, match="one prompt"):
        toy_all.generate(["Hi", "Hello"], speculative="ngram")
    with pytest.raises(ValueError, match="speculative must be"):
        toy_all.generate("Hi", speculative="eagle")


def test_speculation_refuses_a_decoder_with_last_position_logits_only(
    tmp_path, qwen3_tokenizer_dir
):
    gen = Generator(build_toy_artifact(tmp_path / "toy", qwen3_tokenizer_dir))
    with pytest.raises(GeneratorError, match="all_logits"):
        gen.generate("Hi", speculative="ngram")
    assert gen.generate("Hi", max_new_tokens=4).token_ids  # plain decoding is unaffected
