"""The Generator on a toy decoder that follows the export contract (tests/test_runtime_toy.py).

These check the runtime's own mechanisms through a real onnxruntime graph: the KV cache against
recomputing from scratch, batches against single prompts, padding, stop conditions, limits,
sampling determinism, chat sessions, thinking budgets, streaming and the async API. Parity with
transformers and onnxruntime-genai on real (tiny) Qwen models is in test_runtime_parity.py.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

import edgepipe.runtime
import edgepipe.runtime.errors
from edgepipe.runtime import ChatSession, Generator, GeneratorError, PromptTooLong
from tests.fixtures.toy import CONTEXT, HEAD_DIM, KV_HEADS, LAYERS, build_toy_artifact

PROMPTS = [
    "Hello world, this is",
    "Hi",
    "A much longer prompt with quite a few more tokens in it than the others",
]


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory, qwen3_tokenizer_dir):
    return build_toy_artifact(tmp_path_factory.mktemp("toy") / "artifact", qwen3_tokenizer_dir)


@pytest.fixture(scope="session")
def gen(toy_dir):
    return Generator(toy_dir)


def reference_greedy(gen: Generator, ids: list[int], steps: int) -> list[int]:
    """Greedy decoding that recomputes the whole sequence with a fresh cache every step."""
    ids = list(ids)
    out = []
    for _ in range(steps):
        cache = gen.engine.new_cache(batch=1, capacity=len(ids))
        logits = gen.engine.run(np.array([ids]), np.array([len(ids)]), cache.ortvalues())
        token = int(np.argmax(logits[0]))
        out.append(token)
        ids.append(token)
    return out


@pytest.mark.parametrize(
    "modules", ["edgepipe.runtime", "edgepipe.runtime.engines.static, edgepipe.runtime.qnn"]
)
def test_import_loads_no_heavy_or_build_side_module(modules):
    code = (
        f"import sys, {modules}\n"
        "heavy = ('torch', 'transformers', 'onnx', 'onnx_ir', 'onnxscript', 'pydantic', 'yaml')\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in heavy or m.startswith('edgepipe.')"
        " and not m.startswith('edgepipe.runtime')]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_runtime_error_is_a_generator_error_exported_from_the_package():
    errors = [
        obj
        for obj in vars(edgepipe.runtime.errors).values()
        if isinstance(obj, type) and issubclass(obj, Exception)
    ]
    assert len(errors) >= 6
    for error in errors:
        assert issubclass(error, GeneratorError), error
        assert getattr(edgepipe.runtime, error.__name__) is error
        assert error.__name__ in edgepipe.runtime.__all__


def test_greedy_with_the_kv_cache_equals_recomputing_from_scratch(gen):
    ids = gen.encode(PROMPTS[0])
    result = gen.generate(ids, max_new_tokens=24, stop_token_ids=[])
    assert result.token_ids == reference_greedy(gen, ids, 24)
    assert len(set(result.token_ids)) > 5  # the toy must not be a constant model


def test_steps_on_one_reused_binding_give_the_logits_of_a_fresh_binding_each(gen):
    # The decode loop binds the KV buffers once and rebinds only ids, mask and logits per step.
    ids = gen.encode(PROMPTS[2])
    engine = gen.engine
    caches = [engine.new_cache(batch=1, capacity=len(ids) + 8) for _ in "ab"]
    kv_reused, kv_fresh = (c.ortvalues() for c in caches)
    io = engine.bind(kv_reused)
    lengths = np.array([len(ids)])
    reused = engine.run(np.array([ids]), lengths, kv_reused, io)
    fresh = engine.run(np.array([ids]), lengths, kv_fresh)
    for _ in range(6):
        np.testing.assert_array_equal(reused, fresh)
        token = np.array([[int(np.argmax(fresh[0]))]])
        lengths = lengths + 1
        previous = reused.copy()
        reused = engine.run(token, lengths, kv_reused, io)
        fresh = engine.run(token, lengths, kv_fresh)
        assert not np.array_equal(reused, previous)  # a new step, not the last logits again
    np.testing.assert_array_equal(reused, fresh)


def test_session_config_entries_win_over_the_spinning_mode(toy_dir):
    key = "session.intra_op.allow_spinning"
    off = Generator(toy_dir, spinning="off").session.get_session_options()
    assert off.get_session_config_entry(key) == "0"
    spinning = Generator(toy_dir, spinning="off", session_config={key: "1"})
    assert spinning.session.get_session_options().get_session_config_entry(key) == "1"


def test_batch_of_different_lengths_gives_each_row_what_it_gives_alone(gen):
    batch = gen.generate(PROMPTS, max_new_tokens=20, stop_token_ids=[])
    assert batch[0].metrics.prefill_calls == len(PROMPTS)  # row by row
    for prompt, row in zip(PROMPTS, batch, strict=True):
        alone = gen.generate(prompt, max_new_tokens=20, stop_token_ids=[])
        assert row.token_ids == alone.token_ids
        assert row.text == alone.text


def test_batch_of_equal_lengths_runs_in_one_prefill_and_matches(gen):
    prompts = [gen.encode("one two three"), gen.encode("four five six")]
    assert len(prompts[0]) == len(prompts[1])
    batch = gen.generate(prompts, max_new_tokens=12, stop_token_ids=[])
    assert batch[0].metrics.prefill_calls == 1
    for prompt, row in zip(prompts, batch, strict=True):
        assert row.token_ids == gen.generate(prompt, max_new_tokens=12, stop_token_ids=[]).token_ids


def test_gqa_left_padding_would_break_rows_which_is_why_batches_are_right_padded(gen):
    short, long = gen.encode("Hi"), gen.encode(PROMPTS[2])
    width = len(long)

    def present_keys(rows: list[list[int]], left: bool) -> np.ndarray:
        ids = np.full((len(rows), width), gen.artifact.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            where = slice(width - len(row), width) if left else slice(0, len(row))
            ids[i, where], mask[i, where] = row, 1
        empty = np.zeros((len(rows), KV_HEADS, 0, HEAD_DIM), np.float32)
        feeds = {"input_ids": ids, "attention_mask": mask}
        for i in range(LAYERS):
            feeds[f"past_key_values.{i}.key"] = feeds[f"past_key_values.{i}.value"] = empty
        return gen.session.run(["present.0.key"], feeds)[0]

    alone = gen.session.run(
        ["present.0.key"],
        {
            "input_ids": np.array([short]),
            "attention_mask": np.ones((1, len(short)), np.int64),
            **{
                f"past_key_values.{i}.{kind}": np.zeros((1, KV_HEADS, 0, HEAD_DIM), np.float32)
                for i in range(LAYERS)
                for kind in ("key", "value")
            },
        },
    )[0][0]
    right = present_keys([short, long], left=False)[0, :, : len(short)]
    left = present_keys([short, long], left=True)[0, :, width - len(short) :]
    np.testing.assert_array_equal(right, alone)
    assert not np.allclose(left, alone)  # rotary positions shift under left padding


def test_stop_token_ends_generation_and_is_kept_in_the_ids(gen):
    free = gen.generate(PROMPTS[0], max_new_tokens=24, stop_token_ids=[]).token_ids
    stop = free[6]
    cut = free.index(stop)
    result = gen.generate(PROMPTS[0], max_new_tokens=24, stop_token_ids=[stop])
    assert result.token_ids == free[: cut + 1]
    assert result.finish_reason == "stop"
    assert result.text == gen.decode(free[:cut])


def test_stop_string_cuts_the_text_before_it(gen):
    free = gen.generate(PROMPTS[0], max_new_tokens=24, stop_token_ids=[])
    stop = free.text[10:14]
    result = gen.generate(PROMPTS[0], max_new_tokens=24, stop_token_ids=[], stop_strings=[stop])
    assert result.finish_reason == "stop_string"
    assert result.text == free.text[: free.text.index(stop)]
    assert len(result.token_ids) < 24


def test_default_stop_tokens_are_the_artifacts_eos_ids(gen):
    assert set(gen.artifact.eos_token_ids) == {151645, 151643}


def test_stream_pieces_join_to_the_generated_text(gen):
    stream = gen.stream("你好，世界 🫠", max_new_tokens=30, stop_token_ids=[])
    pieces = list(stream)
    assert "".join(pieces) == stream.result.text
    assert stream.result.text == gen.decode(stream.result.token_ids)
    assert not any("\ufffd" in p for p in pieces[:-1])


def test_kv_cache_is_sized_for_the_request_not_the_context(gen):
    result = gen.generate(PROMPTS[0], max_new_tokens=10, stop_token_ids=[])
    prompt_len = len(result.prompt_token_ids)
    assert result.metrics.kv_capacity == 32 < CONTEXT  # 5 + 10 rounded up to 32
    assert prompt_len + 10 <= result.metrics.kv_capacity
    assert result.metrics.kv_bytes == LAYERS * 2 * KV_HEADS * 32 * HEAD_DIM * 4


def test_metrics_count_tokens_and_rates(gen):
    metrics = gen.generate(PROMPTS[:2], max_new_tokens=8, stop_token_ids=[])[0].metrics
    assert metrics.prompt_tokens == len(gen.encode(PROMPTS[0])) + len(gen.encode(PROMPTS[1]))
    assert metrics.generated_tokens == 16
    assert metrics.prefill_tokens_per_s > 0 and metrics.decode_tokens_per_s > 0
    assert 0 < metrics.time_to_first_token_s <= metrics.total_s


def test_max_length_caps_the_cache_and_ends_with_length(toy_dir):
    capped = Generator(toy_dir, max_length=40)
    result = capped.generate(PROMPTS[0], max_new_tokens=100, stop_token_ids=[])
    assert result.metrics.kv_capacity == 40
    assert len(result.prompt_token_ids) + len(result.token_ids) == 41  # last token needs no slot
    assert result.finish_reason == "length"


def test_a_prompt_longer_than_the_context_raises_or_is_left_truncated(gen):
    ids = list(range(1000, 1000 + CONTEXT + 10))
    with pytest.raises(PromptTooLong, match=f"prompt has {CONTEXT + 10} tokens"):
        gen.generate(ids, max_new_tokens=4)
    result = gen.generate(ids, max_new_tokens=4, truncate="left", stop_token_ids=[])
    assert result.prompt_token_ids == ids[-(CONTEXT - 4) :]
    assert len(result.token_ids) == 4


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"top_p": 2.0}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"truncate": "right"}, "truncate must be one of"),
        ({"tempreature": 0.5}, "unknown generation parameter"),
    ],
)
def test_invalid_parameters_raise_value_error_naming_them(gen, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        gen.generate("hi", **kwargs)


def test_same_seed_same_sample_other_seed_differs(gen):
    def sample(seed):
        # A high temperature: the toy's distributions are peaked enough for top-k to be argmax.
        params = {"do_sample": True, "temperature": 4.0, "seed": seed, "stop_token_ids": []}
        return gen.generate(PROMPTS[0], max_new_tokens=16, **params).token_ids

    assert sample(11) == sample(11)
    assert sample(11) != sample(12)


def test_chat_session_reuses_the_cache_and_matches_a_fresh_chat(gen):
    session = ChatSession(gen, system="Be terse.", enable_thinking=False, max_new_tokens=40)
    first = session.send("Tell me something", stop_token_ids=[151645])
    second = session.send("And then?", stop_token_ids=[151645])
    history = session.messages[:-1]
    fresh = gen.chat(history, enable_thinking=False, max_new_tokens=40, stop_token_ids=[151645])
    assert second.token_ids == fresh.token_ids
    assert second.text == fresh.text
    full_prompt = len(second.prompt_token_ids)
    assert second.metrics.prompt_tokens < full_prompt  # only the new suffix was prefilled
    assert first.metrics.kv_capacity < second.metrics.kv_capacity  # the cache grew
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant"] * 1 + [
        "user",
        "assistant",
    ]
    session.reset()
    assert session.messages == [{"role": "system", "content": "Be terse."}]
    assert session.cached_tokens == 0


@pytest.mark.filterwarnings("ignore:Specified provider 'DmlExecutionProvider':UserWarning")
def test_a_one_call_prefill_provider_never_continues_a_cache_with_several_tokens(
    gen, toy_dir, monkeypatch
):
    # DirectML's attention takes any multi-token call as the first of a sequence. Its provider
    # cannot run here: "install" it by name, and onnxruntime places the graph on CPU instead.
    # What this checks is the runtime's policy for a one-call-prefill provider (keyed on the
    # provider asked for), not DirectML itself: the model really runs on CPU.
    import onnxruntime as ort

    real = ort.get_available_providers
    monkeypatch.setattr(ort, "get_available_providers", lambda: [*real(), "DmlExecutionProvider"])
    dml = Generator(toy_dir, provider="DmlExecutionProvider", prefill_chunk=4)
    assert dml.session.get_providers() == ["CPUExecutionProvider"], "onnxruntime fell back"
    assert not dml.continues_prefill and dml.prefill_chunk is None
    assert gen.continues_prefill
    session = ChatSession(dml, system="Be terse.", enable_thinking=False, max_new_tokens=12)
    session.send("Tell me something", stop_token_ids=[])
    second = session.send("And then?", stop_token_ids=[])
    assert second.metrics.prompt_tokens == len(second.prompt_token_ids), "the whole conversation"
    fresh = gen.chat(
        session.messages[:-1], enable_thinking=False, max_new_tokens=12, stop_token_ids=[]
    )
    assert second.token_ids == fresh.token_ids


@pytest.fixture(scope="session")
def thinking_dir(toy_dir, tmp_path_factory):
    # A template whose generation prompt opens the thinking block, so the toy "thinks" from
    # its first token (a random toy would rarely emit <think> itself).
    folder = tmp_path_factory.mktemp("toy-thinking") / "artifact"
    shutil.copytree(toy_dir, folder)
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").write_text(
        template + "{%- if add_generation_prompt and enable_thinking is not defined %}"
        "{{- '<think>\\n' }}{%- endif %}"
    )
    return folder


def test_thinking_budget_closes_the_block_after_n_tokens(thinking_dir):
    gen = Generator(thinking_dir)
    messages = [{"role": "user", "content": "Think about it"}]
    close = gen.encode("</think>\n\n")
    result = gen.chat(messages, thinking_budget=5, max_new_tokens=20, stop_token_ids=[])
    ids = result.token_ids
    assert ids[5 : 5 + len(close)] == close
    assert result.thinking == gen.decode(ids[:5]).strip("\n")
    assert result.text == gen.decode(ids[5 + len(close) :]).lstrip("\n")


def test_chat_without_thinking_returns_no_thinking(gen):
    result = gen.chat([{"role": "user", "content": "Hi"}], enable_thinking=False, max_new_tokens=8)
    assert result.thinking is None


def test_async_variants_match_the_blocking_ones(gen):
    async def run():
        result = await gen.agenerate(PROMPTS[0], max_new_tokens=10, stop_token_ids=[])
        pieces = [p async for p in gen.astream(PROMPTS[0], max_new_tokens=10, stop_token_ids=[])]
        reply = await gen.achat(messages, enable_thinking=False, max_new_tokens=6)
        return result, pieces, reply

    messages = [{"role": "user", "content": "Hi"}]
    result, pieces, reply = asyncio.run(run())
    blocking_reply = gen.chat(messages, enable_thinking=False, max_new_tokens=6)
    assert reply.token_ids == blocking_reply.token_ids
    blocking = gen.generate(PROMPTS[0], max_new_tokens=10, stop_token_ids=[])
    assert result.token_ids == blocking.token_ids
    assert "".join(pieces) == blocking.text


def test_fp16_kv_cache_is_detected_from_the_graph(tmp_path, qwen3_tokenizer_dir):
    folder = build_toy_artifact(tmp_path / "fp16", qwen3_tokenizer_dir, fp16=True)
    gen16 = Generator(folder)
    result = gen16.generate(PROMPTS[0], max_new_tokens=6, stop_token_ids=[])
    assert gen16.kv_dtype == np.float16
    assert result.metrics.kv_bytes == LAYERS * 2 * KV_HEADS * 32 * HEAD_DIM * 2
    assert len(result.token_ids) == 6


def test_generation_defaults_come_from_generation_config(toy_dir, tmp_path):
    folder = tmp_path / "art"
    shutil.copytree(toy_dir, folder)
    (folder / "generation_config.json").write_text(json.dumps({"max_new_tokens": 3}))
    result = Generator(folder).generate("hello", stop_token_ids=[])
    assert len(result.token_ids) == 3


def test_chunked_prefill_gives_the_same_tokens(toy_dir, gen):
    ids = gen.encode(" ".join(["chunk the prefill of a longer prompt"] * 8))
    assert len(ids) > 40
    chunked = Generator(toy_dir, prefill_chunk=7)
    for prompt in (ids, [ids, ids[:20]]):
        expected = gen.generate(prompt, max_new_tokens=12, stop_token_ids=[])
        result = chunked.generate(prompt, max_new_tokens=12, stop_token_ids=[])
        if isinstance(result, list):
            assert [r.token_ids for r in result] == [r.token_ids for r in expected]
            assert result[0].metrics.prefill_calls == -(-len(ids) // 7) + -(-20 // 7)
        else:
            assert result.token_ids == expected.token_ids
            assert result.metrics.prefill_calls == -(-len(ids) // 7)
            assert expected.metrics.prefill_calls == 1
