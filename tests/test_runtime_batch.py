"""SlotBatch: rows that join and leave a shared KV batch give the tokens they give alone."""

from __future__ import annotations

import json

import pytest

from edgepipe.runtime import Generator, GeneratorError, PromptTooLong
from edgepipe.runtime.batch import RowRequest, SlotBatch
from edgepipe.runtime.prefix import PrefixCache
from edgepipe.runtime.sampling import merge_params

PROMPTS = [
    "Hello world, this is",
    "Hi",
    "A much longer prompt with quite a few more tokens in it than the others",
    "x y z",
    "Hello world, this is a longer one",
]


@pytest.fixture(scope="module")
def gen(serve_toy_dir):
    return Generator(serve_toy_dir)


def new_batch(gen, slots=3, capacity=128, prefix=None):
    art = gen.artifact
    return SlotBatch(
        gen.engine,
        gen.tokenizer,
        slots=slots,
        capacity=capacity,
        eos_token_ids=art.eos_token_ids,
        pad_token_id=art.pad_token_id,
        prefix_cache=prefix,
    )


def drain(batch, requests, eager=False):
    """Join `requests` as slots free up; return each one's (tokens, text, finish reason).

    `eager`: take each new row's first token right after it joins (`sample`), as the server's
    scheduler does, instead of in the next step.
    """
    pending, owner, out = list(enumerate(requests)), {}, {}
    while pending or batch.active:
        emissions = []
        while pending and batch.free:
            i, request = pending.pop(0)
            slot = batch.join(request)
            batch.prefill(slot)
            owner[slot] = i
            out[i] = ([], [], None)
            if eager:
                emissions.append(batch.sample(slot))
        for e in emissions + batch.step():
            tokens, texts, _ = out[owner[e.slot]]
            tokens.append(e.token)
            texts.append(e.text)
            if e.done:
                out[owner[e.slot]] = (tokens, texts, e.finish_reason)
    return [(t, "".join(x), r) for t, x, r in (out[i] for i in range(len(requests)))]


@pytest.mark.parametrize("eager", [False, True])
def test_rows_joining_and_leaving_give_their_tokens_alone(gen, eager):
    params = [merge_params(gen.defaults, max_new_tokens=n) for n in (5, 30, 12, 20, 7, 1)]
    prompts = PROMPTS + ["One token"]
    requests = [RowRequest(gen.encode(p), q) for p, q in zip(prompts, params, strict=True)]
    results = drain(new_batch(gen, slots=3), requests, eager=eager)
    for prompt, p, (tokens, text, reason) in zip(prompts, params, results, strict=True):
        alone = gen.generate(prompt, max_new_tokens=p.max_new_tokens)
        assert tokens == alone.token_ids and text == alone.text
        assert reason == alone.finish_reason


def test_a_cached_prefix_is_reused_without_changing_tokens(gen):
    prefix = PrefixCache(1 << 24)
    batch = new_batch(gen, prefix=prefix)
    params = merge_params(gen.defaults, max_new_tokens=10)
    first = drain(batch, [RowRequest(gen.encode(PROMPTS[0]), params)])[0]
    again = drain(batch, [RowRequest(gen.encode(PROMPTS[4]), params)])[0]
    assert prefix.stats.hits == 1 and prefix.stats.reused_tokens >= 4
    assert again[0] == gen.generate(PROMPTS[4], max_new_tokens=10).token_ids
    assert first[0] == gen.generate(PROMPTS[0], max_new_tokens=10).token_ids


def test_a_cancelled_row_frees_its_slot_between_steps(gen):
    batch = new_batch(gen, slots=1)
    params = merge_params(gen.defaults, max_new_tokens=50)
    slot = batch.join(RowRequest(gen.encode("Hi"), params))
    batch.prefill(slot)
    batch.step()
    assert batch.free == 0 and batch.kv_bytes_in_use > 0
    batch.cancel(slot)
    assert batch.free == 1 and batch.kv_bytes_in_use == 0 and batch.step() == []


def test_a_row_stops_at_the_slot_capacity_with_length(gen):
    batch = new_batch(gen, slots=1, capacity=32)
    params = merge_params(gen.defaults, max_new_tokens=100, stop_token_ids=[])
    prompt = gen.encode(PROMPTS[2])
    ((tokens, _, reason),) = drain(batch, [RowRequest(prompt, params)])
    assert reason == "length" and len(tokens) == 32 - len(prompt) + 1


def test_a_prompt_that_fills_the_slot_is_refused(gen):
    batch = new_batch(gen, slots=1, capacity=8)
    with pytest.raises(PromptTooLong):
        batch.join(RowRequest(list(range(100, 110)), merge_params(gen.defaults)))
    assert batch.free == 1


def test_static_engines_are_refused(gen):
    with pytest.raises(GeneratorError, match="dynamic"):
        SlotBatch(object(), gen.tokenizer, slots=1, capacity=8, eos_token_ids=[], pad_token_id=0)


def test_a_prompt_fed_a_budget_at_a_time_while_others_decode_keeps_every_token(serve_toy_dir):
    gen = Generator(serve_toy_dir, prefill_chunk=4)
    params = merge_params(gen.defaults, max_new_tokens=12)
    batch = new_batch(gen, slots=2)
    # The slow prompt takes slot 0, below the decoding row: decode steps pad it at its next
    # prompt position, which its next chunk must overwrite.
    slow = batch.join(RowRequest(gen.encode(PROMPTS[2]), params))
    fast = batch.join(RowRequest(gen.encode(PROMPTS[0]), params))
    batch.prefill(fast)
    out = {slow: [], fast: [batch.sample(fast).token]}
    calls = 0
    while batch.active:
        if batch.prefilling(slow):
            assert batch.prefill(slow, budget=4) == 4 or not batch.prefilling(slow)
            calls += 1
        for e in batch.step():
            out[e.slot].append(e.token)
    assert calls > 3
    assert out[slow] == gen.generate(PROMPTS[2], max_new_tokens=12).token_ids
    assert out[fast] == gen.generate(PROMPTS[0], max_new_tokens=12).token_ids


def test_a_constrained_row_among_free_rows_gives_what_each_gives_alone(gen):
    pytest.importorskip("llguidance")
    from edgepipe.runtime.constrain import constraint_for

    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 6}, "n": {"type": "integer"}},
        "required": ["name", "n"],
        "additionalProperties": False,
    }
    constraint = constraint_for({"json_schema": schema}, gen.tokenizer, gen.artifact)
    params = merge_params(gen.defaults, max_new_tokens=40)
    requests = [
        RowRequest(gen.encode(PROMPTS[0]), params),
        RowRequest(gen.encode("Person:"), params, constraint=constraint),
        RowRequest(gen.encode(PROMPTS[2]), params),
    ]
    results = drain(new_batch(gen, slots=3), requests, eager=True)
    constrained = gen.generate("Person:", json_schema=schema, max_new_tokens=40)
    assert results[1][0] == constrained.token_ids and results[1][1] == constrained.text
    assert results[1][2] == "stop" and json.loads(results[1][1])["name"] is not None
    for i in (0, 2):
        alone = gen.generate(PROMPTS[i], max_new_tokens=40)
        assert results[i][0] == alone.token_ids, PROMPTS[i]
    free = gen.generate("Person:", max_new_tokens=40).text
    assert free != constrained.text  # the toy writes no JSON on its own


def test_a_batch_shares_the_generator_byte_table(gen):
    batch = SlotBatch(
        gen.engine,
        gen.tokenizer,
        slots=1,
        capacity=8,
        eos_token_ids=[],
        pad_token_id=0,
        token_bytes=gen.token_bytes,
    )
    assert gen.token_bytes is not None and batch.token_bytes is gen.token_bytes
    assert new_batch(gen).token_bytes is not gen.token_bytes  # built when not given


# -- speculative decoding ------------------------------------------------------------------------

CODE = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n"
# The trained model copies code from its context: prompt-lookup drafts get accepted here.
GROUNDED = (
    "Rewrite the file with add renamed to plus.\n\n" + CODE + "\n\nRewritten file:\n" + CODE[:20]
)
REPEATED = "def add(a, b):\n    return a + b\n\n\ndef add(a, b):\n"


@pytest.fixture(scope="module")
def trained(trained_shipped_dir):
    return Generator(trained_shipped_dir)


def greedy(gen, n, **overrides):
    return merge_params(gen.defaults, max_new_tokens=n, do_sample=False, **overrides)


def plain(gen, prompt, p):
    return gen.generate(
        prompt,
        max_new_tokens=p.max_new_tokens,
        do_sample=False,
        stop_token_ids=p.stop_token_ids,
        stop_strings=p.stop_strings,
    )


@pytest.mark.parametrize("prompt", [GROUNDED, PROMPTS[0]])
def test_a_lone_speculating_row_gives_plain_greedy_tokens(trained, prompt):
    assert trained.engine.keeps_logits  # verified through logits_to_keep
    batch = new_batch(trained, slots=2, capacity=256)
    p = greedy(trained, 64)
    request = RowRequest(trained.encode(prompt), p, stop_ids=[], speculative="ngram")
    ((tokens, text, reason),) = drain(batch, [request], eager=True)
    alone = trained.generate(prompt, max_new_tokens=64, do_sample=False, stop_token_ids=[])
    assert (tokens, text, reason) == (alone.token_ids, alone.text, alone.finish_reason)
    if prompt == GROUNDED:  # drafts were verified and kept, not just skipped
        assert batch.stats.accepted > 0
        assert batch.stats.verify_calls < len(tokens) - 1


def test_speculating_and_plain_rows_together_give_their_greedy_tokens(trained):
    prompts = [PROMPTS[0], GROUNDED, REPEATED, PROMPTS[2]]
    ns = [10, 90, 30, 5]
    specs = [None, "ngram", "ngram", None]
    prefix = PrefixCache(1 << 24)
    for _ in range(2):  # the second run reuses the prefixes the first one left
        batch = new_batch(trained, slots=3, capacity=256, prefix=prefix)
        requests = [
            RowRequest(trained.encode(q), greedy(trained, n), speculative=s)
            for q, n, s in zip(prompts, ns, specs, strict=True)
        ]
        results = drain(batch, requests, eager=True)
        for prompt, request, (tokens, text, reason) in zip(prompts, requests, results, strict=True):
            alone = plain(trained, prompt, request.params)
            assert (tokens, text, reason) == (alone.token_ids, alone.text, alone.finish_reason)
        # Slot 1's row decodes alone at the end: it verifies on its own row of the buffer.
        assert batch.stats.accepted > 0
    assert prefix.stats.hits > 0


@pytest.mark.parametrize("n", [1, 2, 5, 17])
def test_a_speculating_row_stops_at_max_new_tokens_exactly(trained, n):
    batch = new_batch(trained, slots=1, capacity=256)
    p = greedy(trained, n)
    request = RowRequest(trained.encode(GROUNDED), p, stop_ids=[], speculative="ngram")
    ((tokens, text, reason),) = drain(batch, [request])
    assert len(tokens) == n and reason == "length"
    alone = trained.generate(GROUNDED, max_new_tokens=n, do_sample=False, stop_token_ids=[])
    assert tokens == alone.token_ids and text == alone.text


def test_a_speculating_row_ends_at_a_stop_string_like_plain_decoding(trained):
    text = trained.generate(GROUNDED, max_new_tokens=40, do_sample=False, stop_token_ids=[]).text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    p = greedy(trained, 40, stop_strings=(stop,), stop_token_ids=[])
    batch = new_batch(trained, slots=1, capacity=256)
    request = RowRequest(trained.encode(GROUNDED), p, stop_ids=[], speculative="ngram")
    ((tokens, got, reason),) = drain(batch, [request])
    alone = plain(trained, GROUNDED, p)
    assert (tokens, got, reason) == (alone.token_ids, alone.text, "stop_string")
    assert stop not in got


def test_speculation_is_refused_for_sampled_and_constrained_rows_and_old_decoders(trained, gen):
    from edgepipe.runtime.constrain import constraint_for

    ids = trained.encode("x")
    batch = new_batch(trained, slots=1)
    sampled = merge_params(trained.defaults, do_sample=True, temperature=0.7)
    with pytest.raises(ValueError, match="greedy"):
        batch.join(RowRequest(ids, sampled, speculative="ngram"))
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    constraint = constraint_for({"json_schema": schema}, trained.tokenizer, trained.artifact)
    with pytest.raises(ValueError, match="constraint"):
        batch.join(RowRequest(ids, greedy(trained, 4), constraint=constraint, speculative="ngram"))
    assert batch.free == 1
    if not gen.engine.verifies:  # the toy decoder returns the last position's logits only
        with pytest.raises(GeneratorError, match="cannot verify"):
            new_batch(gen, slots=1).join(
                RowRequest(gen.encode("x"), greedy(gen, 4), speculative="ngram")
            )
