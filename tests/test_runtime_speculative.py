"""Prompt-lookup speculative decoding: the drafter, exactness against plain greedy, rollback."""

from __future__ import annotations

import numpy as np
import pytest

from edgepipe.runtime import Generator, GeneratorError
from edgepipe.runtime.detokenize import IncrementalDetokenizer, StopStringFilter
from edgepipe.runtime.rows import Row
from edgepipe.runtime.sampling import Sampler, SamplingParams
from edgepipe.runtime.speculative import NgramDrafter
from edgepipe.runtime.speculative import decode as speculative_decode
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
def trained_shipped(tmp_path_factory):
    """The bundled trained model as shipped (exported, then optimized): fp32 and int4 Generators.

    Trained on Python source, it continues code by copying from its context, so prompt lookup
    drafts get accepted (random weights accept almost none on short outputs).
    """
    from edgepipe.arch.bundled import expand_bundled
    from edgepipe.stages.export.dynamic import build_decoder
    from edgepipe.stages.optimize import optimize_model
    from edgepipe.stages.quantize.plan import QuantPlan

    root = tmp_path_factory.mktemp("trained-shipped")
    model = expand_bundled("tiny-trained", root / "model")
    # The tiny-trained recipe's cpu-x64 precision: int4 body, int8 tied table, accuracy_level 4.
    int4 = QuantPlan.from_precision("int4", accuracy_level=4, lm_head="int8")
    gens = {}
    for name, quant in (("fp32", None), ("int4", int4)):
        build_decoder(model, root / f"{name}-export", quant=quant, context_length=1024)
        optimize_model(root / f"{name}-export", root / name, level="all")
        gens[name] = Generator(root / name)
    return gens


TRAINED_PROMPTS = [
    "def add(a, b):\n    return a + b\n\n\ndef add(a, b):\n",
    "Rewrite the file with add renamed to plus.\n\n" + CODE + "\n\nRewritten file:\n" + CODE[:20],
]


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


@pytest.mark.parametrize("prompt", TRAINED_PROMPTS)
def test_speculative_greedy_equals_plain_greedy_on_the_shipped_graph(trained_shipped, prompt):
    gen = trained_shipped["fp32"]
    assert gen.engine.keeps_logits  # verified through logits_to_keep, not an all-logits export
    plain = gen.generate(prompt, max_new_tokens=64, stop_token_ids=[])
    spec = gen.generate(prompt, max_new_tokens=64, stop_token_ids=[], speculative="ngram")
    assert spec.token_ids == plain.token_ids
    assert spec.metrics.accepted_tokens > 0  # drafts were verified and kept, not just skipped
    assert spec.metrics.verify_calls < len(spec.token_ids) - 1  # fewer calls than tokens


def test_int4_verify_rows_stay_close_to_one_token_steps(trained_shipped):
    """int4 with accuracy_level 4: a K + 1 token call's logits differ slightly from one-token
    calls' (MatMulNBits quantizes activations per call), so speculative greedy may part from
    plain greedy on a near tie. Bound the difference and report where the outputs part."""
    gen = trained_shipped["int4"]
    ids = gen.encode(TRAINED_PROMPTS[1])
    n = len(ids)
    plain = gen.engine.begin([ids], 8, None)
    tokens = [int(np.argmax(plain.prefill()[0]))]
    rows = []
    for i in range(4):
        rows.append(plain.step(np.array([[tokens[-1]]]), np.array([n + i + 1]))[0])
        tokens.append(int(np.argmax(rows[-1])))
    spec = gen.engine.begin([ids], 8, None)
    spec.prefill()
    verified = spec.verify(np.array([tokens[:4]]), np.array([n + 4]))[0]
    scale = float(np.abs(np.stack(rows)).max())
    # Measured here: 0.007 at a logit scale of 9-11 (fp32: 5e-6); 0.03-0.055 on other int4 models.
    assert np.abs(verified - np.stack(rows)).max() <= 0.01 * scale
    assert [int(np.argmax(r)) for r in verified] == tokens[1:]

    prompt = TRAINED_PROMPTS[1]
    want = gen.generate(prompt, max_new_tokens=64, stop_token_ids=[]).token_ids
    got = gen.generate(prompt, max_new_tokens=64, stop_token_ids=[], speculative="ngram")
    same = next(
        (i for i, (a, b) in enumerate(zip(want, got.token_ids, strict=False)) if a != b), len(want)
    )
    print(f"int4 speculative greedy equals plain greedy for {same} of {len(want)} tokens")
    assert got.metrics.accepted_tokens > 0
    assert same >= 1  # the first token comes from the same prefill


class NextTokenModel:
    """A stand-in request whose greedy next token is `rule(previous token)`; counts its calls."""

    capacity = 4096

    def __init__(self, rule, vocab: int = 1000):
        self.rule, self.vocab, self.widths = rule, vocab, []

    def row_for(self, token: int) -> np.ndarray:
        row = np.zeros(self.vocab, dtype=np.float32)
        row[self.rule(int(token))] = 1.0
        return row

    def step(self, feed, lengths):
        self.widths.append(feed.shape[1])
        return np.stack([self.row_for(feed[0, -1])])

    def verify(self, feed, lengths):
        self.widths.append(feed.shape[1])
        return np.stack([np.stack([self.row_for(t) for t in feed[0]])])


def run_speculative(model: NextTokenModel, prompt: list[int], tokenizer, steps: int):
    row = Row(prompt=prompt, detok=IncrementalDetokenizer(tokenizer), stops=StopStringFilter(()))
    drafter = NgramDrafter(prompt)
    loop = speculative_decode(
        row, model, model.row_for(prompt[-1]), sampler=Sampler(SamplingParams()), stop_ids=set(),
        thinking=None, max_steps=steps, drafter=drafter,
    )  # fmt: skip
    for _ in loop:
        pass
    return row.out, drafter


def test_a_repeating_output_is_accepted_in_few_model_calls(qwen3_tokenizer):
    cycle = [101, 202, 303, 404, 505, 606]
    model = NextTokenModel(lambda t: cycle[(cycle.index(t) + 1) % len(cycle)])
    out, drafter = run_speculative(model, cycle * 2, qwen3_tokenizer, steps=60)
    assert out == (cycle * 12)[:60]  # what plain greedy gives
    assert drafter.stats.accepted == drafter.stats.drafted > 0
    assert len(model.widths) <= 15  # 59 tokens after the first, in at most 15 calls


def test_drafting_pauses_when_drafts_keep_failing(qwen3_tokenizer):
    # Every 1-gram of the prompt is followed by 999, but the model says t + 1 (mod 200).
    prompt = [t for t in range(100, 300) for t in (t, 999)][:-1]
    model = NextTokenModel(lambda t: 100 + (t - 99) % 200)  # 299 is followed by 100
    out, drafter = run_speculative(model, prompt, qwen3_tokenizer, steps=64)
    assert out == list(range(100, 100 + 64))
    assert drafter.stats.pauses >= 1 and drafter.stats.accepted == 0
    assert drafter.stats.verify_calls <= 16  # most steps ran as plain one-token steps


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


def test_speculation_refuses_a_decoder_built_before_logits_to_keep(tmp_path, qwen3_tokenizer_dir):
    # The toy's shipped-style graph slices the last position with constants, as every decoder
    # edgepipe shipped before logits_to_keep did.
    gen = Generator(build_toy_artifact(tmp_path / "toy", qwen3_tokenizer_dir))
    assert not gen.engine.verifies
    with pytest.raises(GeneratorError, match="no logits_to_keep input.*all_logits"):
        gen.generate("Hi", speculative="ngram")
    assert gen.generate("Hi", max_new_tokens=4).token_ids  # plain decoding is unaffected
