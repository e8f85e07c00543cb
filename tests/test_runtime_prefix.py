"""PrefixCache (longest-prefix lookup, replacement, byte budget) and `Generator`'s prefix reuse
across calls (PrefixLease): the same tokens and logits as without it, on tiny fp32 and int4
exports, with chat sessions, speculation, thinking budgets, constraints and capacity limits."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from edgepipe.runtime import ChatSession, Generator, GeneratorError
from edgepipe.runtime.engines.kv import KVCache
from edgepipe.runtime.prefix import PrefixCache, PrefixLease, open_prefix_cache

SYSTEM = (
    "You are a careful assistant for a small library. Answer in one short paragraph, cite the "
    "section you used, and say so plainly when the documents do not cover the question. "
) * 3
GREEDY = {"do_sample": False, "stop_token_ids": [], "max_new_tokens": 40}


def cache_with(values: float, batch: int = 2, capacity: int = 16) -> KVCache:
    kv = KVCache(2, 1, 4, batch=batch, capacity=capacity)
    for array in kv.keys + kv.values:
        array[:] = values
    return kv


def test_load_copies_the_longest_common_prefix_and_keeps_one_token_to_feed():
    prefix = PrefixCache(1 << 20, min_tokens=2)
    source = cache_with(1.0)
    source.keys[0][0, :, :, :] = np.arange(16)[None, :, None]
    prefix.save([1, 2, 3, 4, 5], source, row=0)
    target = cache_with(0.0)
    assert prefix.load([1, 2, 3, 9], target, row=1) == 3
    assert np.array_equal(target.keys[0][1, 0, :3, 0], [0, 1, 2])
    assert target.keys[0][1, 0, 3, 0] == 0
    assert prefix.load([1, 2, 3, 4, 5], target, row=1) == 4  # one token left to feed
    assert prefix.load([7, 8, 9], target, row=1) == 0
    assert prefix.stats.lookups == 3 and prefix.stats.hits == 2
    assert prefix.stats.hit_rate == 2 / 3


def test_a_longer_entry_replaces_its_prefix_and_the_budget_evicts_the_oldest():
    kv = cache_with(1.0)
    one_entry = 2 * 2 * 1 * 8 * 4 * 4  # layers x (k, v) x heads x 8 positions x dim x fp32
    prefix = PrefixCache(2 * one_entry, min_tokens=2)
    prefix.save([1, 2, 3, 4], kv, row=0)
    prefix.save([1, 2, 3, 4, 5, 6, 7, 8], kv, row=0)
    assert len(prefix) == 1 and prefix.nbytes == one_entry
    prefix.save([1, 2, 3], kv, row=0)  # already covered: nothing new
    assert len(prefix) == 1
    prefix.save([20, 21, 22, 23, 24, 25, 26, 27], kv, row=0)
    prefix.save([30, 31, 32, 33, 34, 35, 36, 37], kv, row=0)
    assert len(prefix) == 2 and prefix.nbytes <= 2 * one_entry
    assert prefix.load([1, 2, 3, 4, 5], kv, row=1) == 0  # the oldest went first


def test_min_suffix_leaves_that_many_prompt_tokens_to_prefill():
    prefix = PrefixCache(1 << 20, min_tokens=2, min_suffix=2)
    prefix.save([1, 2, 3, 4, 5, 6], cache_with(1.0), row=0)
    assert prefix.load([1, 2, 3, 4, 5, 6], cache_with(0.0), row=1) == 4
    assert prefix.load([1, 2, 3, 4, 5, 6, 7, 8], cache_with(0.0), row=1) == 6


def test_save_without_copy_keeps_a_nearly_full_buffer_and_counts_it_whole():
    per_position = 2 * 2 * 1 * 4 * 4  # layers x (k, v) x heads x dim x fp32
    kv = cache_with(1.0, batch=1, capacity=40)
    views, copies = PrefixCache(1 << 20, min_tokens=2), PrefixCache(1 << 20, min_tokens=2)
    views.save([1, 2, 3, 4, 5, 6, 7, 8], kv, row=0, copy=False)  # 32 positions unused: kept
    copies.save([1, 2, 3, 4, 5, 6, 7, 8], kv, row=0)
    kv.keys[0][0, 0, :4, 0] = 7.0  # a write the kept buffer shows and the copy does not
    for prefix, seen in ((views, 7.0), (copies, 1.0)):
        target = cache_with(0.0)
        assert prefix.load([1, 2, 3, 4, 9], target, row=0) == 4
        assert target.keys[0][0, 0, 0, 0] == seen
    assert views.nbytes == 40 * per_position and copies.nbytes == 8 * per_position


def test_save_without_copy_copies_a_buffer_with_much_unused_capacity():
    kv = cache_with(1.0, batch=1, capacity=64)
    prefix = PrefixCache(1 << 20, min_tokens=2)
    prefix.save([1, 2, 3, 4], kv, row=0, copy=False)  # 60 positions unused: copied
    kv.keys[0][:] = 7.0
    target = cache_with(0.0)
    assert prefix.load([1, 2, 3, 4, 9], target, row=0) == 4
    assert target.keys[0][0, 0, 0, 0] == 1.0 and prefix.nbytes == 4 * 2 * 2 * 1 * 4 * 4


def test_an_entry_over_the_budget_keeps_its_first_positions_that_fit():
    kv = cache_with(1.0, capacity=64)
    per_position = 2 * 2 * 1 * 4 * 4  # layers x (k, v) x heads x dim x fp32
    prefix = PrefixCache(10 * per_position + 3, min_tokens=2)
    prefix.save(list(range(40)), kv, row=0, copy=False)
    assert len(prefix) == 1 and prefix.nbytes == 10 * per_position
    assert prefix.load(list(range(40)), cache_with(0.0, capacity=64), row=0) == 10


def test_the_byte_budget_is_never_exceeded_and_old_entries_go_first():
    rng = np.random.default_rng(0)
    kv = cache_with(1.0, capacity=64)
    per_position = 2 * 2 * 1 * 4 * 4
    prefix = PrefixCache(50 * per_position, min_tokens=2)
    saved = []
    for i in range(40):
        ids = [1000 + i, *rng.integers(0, 50, int(rng.integers(4, 40))).tolist()]
        prefix.save(ids, kv, row=0, copy=bool(i % 2))
        saved.append(ids)
        assert 0 < prefix.nbytes <= prefix.max_bytes
    assert len(prefix) < 40  # evicted
    assert prefix.load(saved[-1] + [1], cache_with(0.0, capacity=64), row=0) == len(saved[-1])
    assert prefix.load(saved[0] + [1], cache_with(0.0, capacity=64), row=0) == 0


# -- Generator: prefix reuse across calls ----------------------------------------------------------


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_qwen2_dir, tiny_qwen3_dir):
    """Tiny exports: fp32 Qwen2, int4 Qwen3 (accuracy_level 4, as cpu-x64 ships), and an fp32
    Qwen3 returning every position's logits (what speculative decoding needs)."""
    from edgepipe.stages.export.dynamic import build_decoder
    from edgepipe.stages.quantize.plan import QuantPlan

    root = tmp_path_factory.mktemp("prefix-artifacts")
    build_decoder(tiny_qwen2_dir, root / "fp32")
    int4 = QuantPlan.from_precision("int4", accuracy_level=4)
    build_decoder(tiny_qwen3_dir, root / "int4", quant=int4)
    build_decoder(tiny_qwen3_dir, root / "all-logits", all_logits=True)
    return root


def pair(folder, **options):
    """(generator with the default prefix cache, the same without one)."""
    return Generator(folder, **options), Generator(folder, prefix_cache_bytes=0, **options)


def common_prefix(a: list[int], b: list[int]) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def greedy_logits(gen: Generator, ids: list[int], steps: int, store=None) -> np.ndarray:
    """The logits of `steps` greedy steps, through the engine calls `generate` makes."""
    request = gen.engine.begin([ids], steps, store)
    rows = [request.prefill()[0]]
    for i in range(steps - 1):
        token = np.array([[int(np.argmax(rows[-1]))]])
        rows.append(request.step(token, np.array([len(ids) + i + 1]))[0])
    return np.stack(rows)


@pytest.mark.parametrize("kind", ["fp32", "int4"])
def test_reuse_gives_the_tokens_and_logits_of_a_full_prefill(artifacts, kind):
    gen, ref = pair(artifacts / kind, prefill_chunk=32)
    first = gen.encode(SYSTEM + "Question: where are the maps kept?")
    second = gen.encode(SYSTEM + "Question: who may borrow the rare books, and for how long?")
    mid = first[:70] + gen.encode(" an unrelated ending that parts mid-way")
    assert gen.generate(first, **GREEDY).metrics.prefix_reused_tokens == 0
    # A shared system prompt, the same prompt again (two tokens still prefilled), a mid-way part.
    for ids, reused in ((second, common_prefix(first, second)), (first, len(first) - 2), (mid, 70)):
        # The engine calls of a call with reuse (a lease saves nothing until keep_cache).
        lease = PrefixLease(gen.prefix_cache, gen.engine, 32)
        logits = greedy_logits(gen, ids, 32, lease)
        assert lease.reused == reused
        np.testing.assert_allclose(logits, greedy_logits(ref, ids, 32), rtol=1e-5, atol=1e-5)
        want = ref.generate(ids, **GREEDY)
        got = gen.generate(ids, **GREEDY)
        assert got.metrics.prefix_reused_tokens == reused > 30
        assert got.token_ids == want.token_ids and len(got.token_ids) == 40
        assert got.metrics.prompt_tokens == len(ids) - reused
        assert got.metrics.prefill_calls == -(-(len(ids) - reused) // 32)
        assert want.metrics.prefill_calls == -(-len(ids) // 32) > got.metrics.prefill_calls
    stats = gen.prefix_stats
    assert stats.hits >= 3 and stats.reused_tokens >= 3 * 30 and ref.prefix_cache is None


def test_a_small_budget_evicts_and_is_never_exceeded(artifacts):
    per_position = 2 * 2 * 2 * 32 * 4  # layers x (k, v) x kv_heads x head_dim x fp32
    gen = Generator(artifacts / "fp32", prefix_cache_bytes=150 * per_position)
    prompts = [
        gen.encode(f"{word} " + SYSTEM[:250]) for word in ("Alpha", "Beta", "Gamma", "Delta")
    ]
    for ids in prompts:  # ~55 prompt + 8 generated positions each: two entries fit
        assert (
            gen.generate(ids, **{**GREEDY, "max_new_tokens": 8}).metrics.prefix_reused_tokens == 0
        )
        assert 0 < gen.prefix_cache.nbytes <= gen.prefix_cache.max_bytes
    assert len(gen.prefix_cache) == 2
    last = gen.generate(prompts[-1], **{**GREEDY, "max_new_tokens": 8})
    assert last.metrics.prefix_reused_tokens == len(prompts[-1]) - 2
    evicted = gen.generate(prompts[0], **{**GREEDY, "max_new_tokens": 8})
    assert evicted.metrics.prefix_reused_tokens == 0
    assert gen.prefix_cache.nbytes <= gen.prefix_cache.max_bytes


def test_batches_neither_read_nor_fill_the_cache(artifacts):
    gen = Generator(artifacts / "fp32")
    ids = gen.encode(SYSTEM)
    gen.generate(ids, **GREEDY)
    lookups, entries = gen.prefix_stats.lookups, len(gen.prefix_cache)
    batch = gen.generate([ids, ids[:50]], **GREEDY)
    assert [r.metrics.prefix_reused_tokens for r in batch] == [0, 0]
    assert batch[0].metrics.prompt_tokens == len(ids) + 50
    assert (gen.prefix_stats.lookups, len(gen.prefix_cache)) == (lookups, entries)


def test_a_cached_prefix_longer_than_the_new_request_capacity(artifacts):
    gen, ref = pair(artifacts / "fp32", max_length=256)
    ids = gen.encode(SYSTEM)
    long = gen.generate(ids, **{**GREEDY, "max_new_tokens": 120})
    assert len(ids) + len(long.token_ids) > 200  # an entry of 200+ positions
    short = ids[:60] + long.token_ids[:3]  # shares 60 positions; its request holds 96
    want = ref.generate(short, **{**GREEDY, "max_new_tokens": 20})
    got = gen.generate(short, **{**GREEDY, "max_new_tokens": 20})
    assert got.metrics.prefix_reused_tokens == 60 and got.metrics.kv_capacity == 96
    assert got.token_ids == want.token_ids
    # The whole cached sequence plus its answer's last token, at the max_length cap.
    full = ids + long.token_ids
    want = ref.generate(full, truncate="left", **GREEDY)
    got = gen.generate(full, truncate="left", **GREEDY)
    assert got.token_ids == want.token_ids and got.prompt_token_ids == want.prompt_token_ids


def test_stop_strings_and_stop_tokens_end_a_reused_call_as_a_fresh_one(artifacts):
    gen, ref = pair(artifacts / "int4")
    ids = gen.encode(SYSTEM + "Go.")
    plain = ref.generate(ids, **GREEDY)
    stop_text = ref.decode(plain.token_ids[10:12])
    gen.generate(ids, **GREEDY)
    for params in ({"stop_strings": [stop_text]}, {"stop_token_ids": [plain.token_ids[15]]}):
        want = ref.generate(ids, **{**GREEDY, **params})
        got = gen.generate(ids, **{**GREEDY, **params})
        assert got.metrics.prefix_reused_tokens == len(ids) - 2
        assert (got.text, got.token_ids, got.finish_reason) == (
            want.text,
            want.token_ids,
            want.finish_reason,
        )
        assert got.finish_reason != "length"


def test_chat_sessions_share_a_system_prompt_and_keep_their_own_cache(artifacts):
    gen, ref = pair(artifacts / "fp32")
    chat = {
        "enable_thinking": False,
        "max_new_tokens": 24,
        "stop_token_ids": [],
        "do_sample": False,
    }
    first = ChatSession(gen, system=SYSTEM, **chat)
    first.send("Where are the maps?")
    assert gen.prefix_stats.hits == 0 and len(gen.prefix_cache) == 1  # its first turn, copied
    session = ChatSession(gen, system=SYSTEM, **chat)
    turn1 = session.send("Who may borrow rare books?")
    assert turn1.metrics.prefix_reused_tokens >= len(gen.encode(SYSTEM))  # the shared system
    lookups, nbytes = gen.prefix_stats.lookups, gen.prefix_cache.nbytes
    turn2 = session.send("And for how long?")
    # The session's own cache served turn 2: no lookup, nothing saved (no double work).
    assert turn2.metrics.prefix_reused_tokens == 0
    assert turn2.metrics.prompt_tokens < len(turn2.prompt_token_ids) // 2
    assert (gen.prefix_stats.lookups, gen.prefix_cache.nbytes) == (lookups, nbytes)
    for result, history in ((turn1, session.messages[:2]), (turn2, session.messages[:4])):
        assert result.token_ids == ref.chat(history, **chat).token_ids
    # Turn 2 wrote into the session's cache; the entry saved from turn 1 is a copy, unchanged.
    again = gen.chat(session.messages[:2], **chat)
    assert again.metrics.prefix_reused_tokens > 0 and again.token_ids == turn1.token_ids


def test_a_session_turn_is_saved_as_a_copy(artifacts):
    gen = Generator(artifacts / "fp32")
    session = ChatSession(gen)
    ids = gen.encode(SYSTEM)
    lease = PrefixLease(gen.prefix_cache, gen.engine, 8, session)
    cache, reuse = lease.take_cache(ids)
    assert reuse == 0
    lease.keep_cache(cache, ids)
    cache.keys[0][:] = 0.5  # the session writes on into its cache
    probe = gen.engine.new_cache(1, len(ids) + 8)
    assert gen.prefix_cache.load(ids + [1, 2], probe, 0) == len(ids)
    assert not np.any(probe.keys[0][0, :, : len(ids)] == 0.5)
    assert session.cached_tokens == len(ids)


def test_speculative_calls_save_only_positions_they_kept(artifacts):
    gen, ref = pair(artifacts / "all-logits")
    code = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n"
    ids = gen.encode("Rewrite with add renamed to plus:\n" + code * 3)
    first = gen.generate(ids, speculative="ngram", **GREEDY)
    assert first.metrics.drafted_tokens > first.metrics.accepted_tokens  # drafts were rejected
    kept = ids + first.token_ids[:-1]  # the last sampled token was never fed
    probe = gen.engine.new_cache(1, len(kept) + 8)
    assert gen.prefix_cache.load(kept + [1, 2], probe, 0) == len(kept)
    fresh = ref.engine.begin([kept], 1, None)
    fresh.prefill()
    for got, want in zip(
        probe.keys + probe.values, fresh.cache.keys + fresh.cache.values, strict=True
    ):
        np.testing.assert_allclose(got[0, :, : len(kept)], want[0, :, : len(kept)], atol=1e-4)
    follow = kept + first.token_ids[-1:] + gen.encode("\nNow sub:")
    want = ref.generate(follow, **GREEDY)
    got = gen.generate(follow, speculative="ngram", **GREEDY)
    assert got.metrics.prefix_reused_tokens == len(kept) and got.token_ids == want.token_ids


@pytest.fixture(scope="module")
def thinking_dir(artifacts, tmp_path_factory):
    """The fp32 Qwen2 export with a template that opens a thinking block after the prompt."""
    folder = tmp_path_factory.mktemp("prefix-thinking") / "artifact"
    shutil.copytree(artifacts / "int4", folder)
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").write_text(
        template + "{%- if add_generation_prompt %}{{- '<think>\\n' }}{%- endif %}"
    )
    return folder


def test_a_thinking_budget_closes_the_block_as_without_reuse(thinking_dir):
    gen, ref = pair(thinking_dir)
    params = {"thinking_budget": 6, "max_new_tokens": 32, "stop_token_ids": [], "do_sample": False}
    for question in ("Where are the maps?", "Who may borrow rare books?"):
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        want, got = ref.chat(messages, **params), gen.chat(messages, **params)
        assert got.token_ids == want.token_ids
        assert (got.thinking, got.text) == (want.thinking, want.text)
        assert got.token_ids[6] == gen.tokenizer.token_to_id("</think>")
    assert got.metrics.prefix_reused_tokens > len(gen.encode(SYSTEM))


def test_a_constrained_reply_reuses_the_prefix(artifacts):
    pytest.importorskip("llguidance")
    gen, ref = pair(artifacts / "fp32")
    ids = gen.encode(SYSTEM + "Answer yes or no:")
    choices = {"choices": ["yes", "no", "maybe later"], "do_sample": False}
    gen.generate(ids, **choices)
    got, want = gen.generate(ids, **choices), ref.generate(ids, **choices)
    assert got.metrics.prefix_reused_tokens == len(ids) - 2
    assert got.text == want.text and got.text in choices["choices"]


def test_open_prefix_cache_refuses_static_sizes_and_skips_one_call_providers():
    assert open_prefix_cache(None, "dynamic", continues_prefill=True).max_bytes == 256 << 20
    assert open_prefix_cache(0, "dynamic", continues_prefill=True) is None
    assert open_prefix_cache(None, "dynamic", continues_prefill=False) is None
    assert open_prefix_cache(None, "static", continues_prefill=True) is None
    assert open_prefix_cache(0, "static", continues_prefill=True) is None
    with pytest.raises(GeneratorError, match="static artifacts keep no prefix cache"):
        open_prefix_cache(1 << 20, "static", continues_prefill=True)
    for bad in (-1, 1.5, True, "1M"):
        with pytest.raises(ValueError, match="prefix_cache_bytes must be"):
            open_prefix_cache(bad, "dynamic", continues_prefill=True)


def test_concurrent_calls_share_the_cache_and_keep_their_tokens(artifacts):
    from concurrent.futures import ThreadPoolExecutor

    gen, ref = pair(artifacts / "int4")
    prompts = [gen.encode(SYSTEM + f"Question {i}: which shelf?") for i in range(8)]
    want = [ref.generate(ids, **GREEDY).token_ids for ids in prompts]
    gen.generate(prompts[0], **GREEDY)
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda ids: gen.generate(ids, **GREEDY), prompts))
    assert [r.token_ids for r in got] == want
    assert all(r.metrics.prefix_reused_tokens >= len(gen.encode(SYSTEM)) - 1 for r in got)
    assert gen.prefix_cache.nbytes <= gen.prefix_cache.max_bytes


def test_a_static_artifact_has_no_prefix_cache_and_refuses_a_size(tiny_qwen2_dir, tmp_path):
    from edgepipe.stages.export.static import build_static_decoder

    build_static_decoder(tiny_qwen2_dir, tmp_path, chunk=8, kv_capacity=64)
    gen = Generator(tmp_path)
    assert gen.prefix_cache is None and gen.prefix_stats is None
    assert gen.generate("Hello there", max_new_tokens=4).metrics.prefix_reused_tokens == 0
    assert Generator(tmp_path, prefix_cache_bytes=0).prefix_cache is None
    with pytest.raises(GeneratorError, match="pass 0 or None"):
        Generator(tmp_path, prefix_cache_bytes=1 << 20)
