"""Sampling parameters and the sampler: validation, determinism, and the filtered distributions.

The distribution tests draw many tokens and run a chi-square goodness-of-fit test against the
expected *filtered* distribution (computed by hand in the test, not by the code under test), and
also check that the same counts reject the *unfiltered* distribution, so the test cannot pass by
accident with a sampler that ignores the filter.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgepipe.runtime.sampling import (
    Sampler,
    SamplingParams,
    apply_repetition_penalty,
    filtered_distribution,
    merge_params,
    params_from_generation_config,
)

# Chi-square critical values at p = 0.001 (df -> value), from standard tables.
CHI2_CRIT_0001 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 9: 27.88}
DRAWS = 20_000

# A 10-token vocabulary with known probabilities (softmax of log p is p itself).
PROBS = np.array([0.30, 0.20, 0.15, 0.10, 0.08, 0.06, 0.05, 0.03, 0.02, 0.01])
LOGITS = np.log(PROBS).astype(np.float32)


def chi_square(counts: np.ndarray, expected_probs: np.ndarray) -> float:
    expected = expected_probs * counts.sum()
    mask = expected > 0
    # A draw of a token with zero expected probability is an outright failure.
    if np.any(counts[~mask] > 0):
        return float("inf")
    return float((((counts - expected) ** 2)[mask] / expected[mask]).sum())


def draw_counts(params: SamplingParams, logits=LOGITS, draws=DRAWS) -> np.ndarray:
    sampler = Sampler(params)
    counts = np.zeros(logits.size, dtype=np.int64)
    for _ in range(draws):
        counts[sampler.pick(logits, ())] += 1
    return counts


def assert_fits(counts: np.ndarray, expected: np.ndarray) -> None:
    df = int(np.count_nonzero(expected)) - 1
    assert chi_square(counts, expected) < CHI2_CRIT_0001[df]
    # The same counts must reject the unfiltered distribution: the test has teeth.
    assert chi_square(counts, PROBS) > CHI2_CRIT_0001[PROBS.size - 1]


def renormalised(keep: int) -> np.ndarray:
    out = np.zeros_like(PROBS)
    out[:keep] = PROBS[:keep] / PROBS[:keep].sum()
    return out


def test_top_k_draws_match_the_top_k_distribution():
    counts = draw_counts(SamplingParams(do_sample=True, top_k=3, seed=1))
    assert_fits(counts, renormalised(3))


def test_top_p_keeps_the_smallest_set_reaching_p():
    # 0.30 + 0.20 = 0.50 < 0.6, so the third token is needed: {0.30, 0.20, 0.15}.
    counts = draw_counts(SamplingParams(do_sample=True, top_p=0.6, seed=2))
    assert_fits(counts, renormalised(3))


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    # min_p 0.3 keeps p >= 0.09: the first four tokens.
    counts = draw_counts(SamplingParams(do_sample=True, min_p=0.3, seed=3))
    assert_fits(counts, renormalised(4))


def test_temperature_sharpens_the_distribution():
    # T = 0.5 squares the probabilities (then renormalises), restricted to top_k 4.
    counts = draw_counts(SamplingParams(do_sample=True, temperature=0.5, top_k=4, seed=4))
    sharp = np.zeros_like(PROBS)
    sharp[:4] = PROBS[:4] ** 2 / (PROBS[:4] ** 2).sum()
    assert_fits(counts, sharp)


def test_unfiltered_sampling_matches_the_softmax():
    counts = draw_counts(SamplingParams(do_sample=True, seed=5))
    assert chi_square(counts, PROBS) < CHI2_CRIT_0001[9]
    # ...and a plausible wrong answer (top-5 only) is rejected.
    assert chi_square(counts, renormalised(5)) == float("inf")


def test_same_seed_gives_the_same_draws_and_other_seeds_differ():
    def draws(seed):
        sampler = Sampler(SamplingParams(do_sample=True, seed=seed))
        return [sampler.pick(LOGITS, ()) for _ in range(50)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_greedy_picks_the_argmax_and_ignores_the_seed():
    logits = np.array([0.1, 3.0, 2.9, -1.0], dtype=np.float32)
    assert Sampler(SamplingParams()).pick(logits, ()) == 1
    assert Sampler(SamplingParams(do_sample=True, temperature=0.0, seed=3)).pick(logits, ()) == 1


def test_repetition_penalty_follows_the_transformers_definition():
    logits = np.array([2.0, -2.0, 1.0], dtype=np.float32)
    apply_repetition_penalty(logits, [0, 1], 2.0)
    assert logits.tolist() == [1.0, -4.0, 1.0]


def test_repetition_penalty_changes_the_greedy_choice():
    logits = np.array([2.0, 1.5, 0.0], dtype=np.float32)
    params = SamplingParams(repetition_penalty=1.5)
    assert Sampler(params).pick(logits, [0]) == 1
    assert Sampler(SamplingParams()).pick(logits, [0]) == 0


def test_filtered_distribution_is_most_likely_first_and_sums_to_one():
    # top_p applies to the top-k renormalised mass (as in transformers): 0.30/0.83 + 0.20/0.83
    # = 0.60 < 0.7, so three tokens stay.
    ids, probs = filtered_distribution(LOGITS, top_k=5, top_p=0.7)
    assert ids.tolist() == [0, 1, 2]
    assert probs.sum() == pytest.approx(1.0)
    assert np.all(np.diff(probs) <= 0)


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("max_new_tokens", 0, "max_new_tokens must be >= 1"),
        ("max_new_tokens", 2.5, "max_new_tokens must be an int"),
        ("temperature", -0.1, "temperature must be a number in [0.0, inf)"),
        ("top_k", -1, "top_k must be an int >= 0"),
        ("top_p", 0.0, "top_p must be a number in (0.0, 1.0]"),
        ("top_p", 1.5, "top_p must be a number in (0.0, 1.0]"),
        ("min_p", 1.2, "min_p must be a number in [0.0, 1.0]"),
        ("repetition_penalty", 0.0, "repetition_penalty must be a number in (0.0, inf)"),
        ("seed", -3, "seed must be an int >= 0"),
        ("stop_strings", [""], "stop_strings must be non-empty strings"),
        ("stop_token_ids", [-1], "stop_token_ids must be ints >= 0"),
    ],
)
def test_invalid_parameter_raises_value_error_naming_it(field, value, needle):
    with pytest.raises(ValueError) as info:
        merge_params(SamplingParams(), **{field: value})
    assert needle in str(info.value)


def test_unknown_parameter_is_named_with_the_allowed_ones():
    with pytest.raises(ValueError, match=r"unknown generation parameter\(s\) \['topk'\]"):
        merge_params(SamplingParams(), topk=3)


def test_none_keeps_the_default_and_a_single_stop_string_becomes_a_tuple():
    params = merge_params(SamplingParams(top_k=20), top_k=None, stop_strings="END")
    assert params.top_k == 20
    assert params.stop_strings == ("END",)


def test_defaults_come_from_generation_config():
    params = params_from_generation_config(
        {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "bos_token_id": 1}
    )
    assert (params.do_sample, params.temperature, params.top_p, params.top_k) == (
        True,
        0.6,
        0.95,
        20,
    )
    assert params.min_p == 0.0


def _reference_top_p(logits, temperature, top_p):
    """The full-sort definition filtered_distribution must keep."""
    scores = np.asarray(logits, dtype=np.float64) / temperature
    order = np.argsort(-scores, kind="stable")
    probs = np.exp(scores[order] - scores[order][0])
    probs /= probs.sum()
    keep = int(np.count_nonzero(np.cumsum(probs) - probs < top_p))
    return order[:keep], probs[:keep] / probs[:keep].sum()


@pytest.mark.parametrize("spread", [8.0, 0.01])  # peaked (narrowed path) and flat (fallback)
def test_top_p_alone_gives_the_full_sort_result_on_a_large_vocabulary(spread):
    logits = (np.random.default_rng(1).standard_normal(151936) * spread).astype(np.float32)
    ids, probs = filtered_distribution(logits, temperature=0.7, top_p=0.9)
    want_ids, want_probs = _reference_top_p(logits, 0.7, 0.9)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(probs, want_probs, rtol=1e-9)


def test_greedy_pick_does_not_copy_or_change_the_logits():
    logits = np.random.default_rng(2).standard_normal(151936).astype(np.float32)
    before = logits.copy()
    assert Sampler(SamplingParams()).pick(logits, ()) == int(np.argmax(before))
    np.testing.assert_array_equal(logits, before)


@pytest.mark.parametrize("top_p", [1.0, 0.95])
def test_min_p_on_a_large_vocabulary_gives_the_full_sort_result(top_p):
    logits = (np.random.default_rng(3).standard_normal(151936) * 2).astype(np.float32)
    ids, probs = filtered_distribution(logits, temperature=0.8, min_p=0.05, top_p=top_p)
    scores = logits.astype(np.float64) / 0.8
    order = np.argsort(-scores, kind="stable")
    full = np.exp(scores[order] - scores[order][0])
    full /= full.sum()
    keep = int(np.count_nonzero(np.cumsum(full) - full < top_p))
    keep = min(keep, max(1, int(np.count_nonzero(full >= 0.05 * full[0]))))
    np.testing.assert_array_equal(ids, order[:keep])
    np.testing.assert_allclose(probs, full[:keep] / full[:keep].sum(), rtol=1e-9)
