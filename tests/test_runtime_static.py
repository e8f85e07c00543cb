"""The static pipeline driver and the Generator on static artifacts.

On CPU over fp32 static graphs the runtime must generate exactly what transformers generates for
every prompt shape (left-padded partial chunks, several chunks). On the simulated HTP (small
builds of `tests/fixtures/static.py`) every prompt shape generates, and greedy generation on the
QNN provider matches the same QDQ graphs on CPU.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from edgepipe.runtime import ChatSession, Generator, KVCacheFull, PromptTooLong
from edgepipe.stages.export.static import build_static_decoder
from tests.fixtures.static import SMALL_CHUNK, SMALL_VOCAB, needs_qnn

CHUNK, CAPACITY = 8, 64
PROMPT_LENGTHS = [1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK]


@pytest.fixture(scope="module", params=["qwen2", "qwen3"])
def fp32_static(request, tmp_path_factory):
    """(model folder, Generator over its fp32 static export on CPU) of a real-vocab tiny model."""
    model = request.getfixturevalue(f"tiny_{request.param}_dir")
    out = tmp_path_factory.mktemp(f"static-fp32-{request.param}")
    build_static_decoder(model, out, chunk=CHUNK, kv_capacity=CAPACITY)
    return model, Generator(out)


def transformers_greedy(model_dir, ids, steps):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with torch.no_grad():
        out = model.eval().generate(
            torch.tensor([ids]), max_new_tokens=steps, do_sample=False, eos_token_id=None
        )
    return out[0, len(ids) :].tolist()


def test_a_bare_static_export_runs_on_cpu(fp32_static):
    _, gen = fp32_static
    assert gen.artifact.graph_variant == "static"
    assert gen.provider == "CPUExecutionProvider"
    assert gen.context_length == CAPACITY


@pytest.mark.parametrize("prompt_len", PROMPT_LENGTHS)
def test_every_prompt_length_generates_what_transformers_generates(fp32_static, prompt_len):
    model, gen = fp32_static
    ids = [int(i) for i in np.random.default_rng(prompt_len).integers(0, 151000, prompt_len)]
    result = gen.generate(ids, max_new_tokens=6, do_sample=False, stop_token_ids=[])
    assert result.token_ids == transformers_greedy(model, ids, 6)
    assert result.metrics.kv_capacity == CAPACITY


def test_a_batch_generates_each_row_as_alone(fp32_static):
    _, gen = fp32_static
    prompts = [[11, 12, 13], list(range(100, 120))]
    batch = gen.generate(prompts, max_new_tokens=5, do_sample=False, stop_token_ids=[])
    assert batch[0].metrics.prefill_calls == 1 + 20 // CHUNK + 1  # a call per row and chunk
    for prompt, row in zip(prompts, batch, strict=True):
        alone = gen.generate(prompt, max_new_tokens=5, do_sample=False, stop_token_ids=[])
        assert row.token_ids == alone.token_ids


def test_generation_stops_with_length_when_the_cache_is_full(fp32_static):
    _, gen = fp32_static
    result = gen.generate(list(range(300, 360)), max_new_tokens=20, do_sample=False)
    # 60 prompt slots + 4 fed tokens fill the 64 slots; the 5th sampled token needs none.
    assert (len(result.token_ids), result.finish_reason) == (5, "length")


def test_a_prompt_longer_than_the_cache_is_refused_or_truncated(fp32_static):
    _, gen = fp32_static
    with pytest.raises(PromptTooLong, match="allows 63"):
        gen.generate(list(range(400, 470)), max_new_tokens=4)
    result = gen.generate(list(range(400, 470)), max_new_tokens=4, truncate="left", do_sample=False)
    assert len(result.prompt_token_ids) == CAPACITY - 4 and len(result.token_ids) == 4


def test_feeding_past_the_capacity_raises_a_clear_error(fp32_static):
    _, gen = fp32_static
    pipeline = gen.engine.pipeline
    cache = pipeline.new_cache()
    pipeline.prefill(cache, list(range(1, CAPACITY + 1)))
    with pytest.raises(KVCacheFull, match="64 of 64 slots used .* kv_capacity 64"):
        pipeline.step(cache, 5)
    cache = pipeline.new_cache()
    pipeline.prefill(cache, list(range(1, 60)))
    keys = [k.copy() for k in cache.keys]
    with pytest.raises(KVCacheFull, match="59 of 64 slots used and 9 more"):
        pipeline.prefill(cache, list(range(9)))
    assert cache.length == 59, "nothing was fed"
    for before, after in zip(keys, cache.keys, strict=True):
        np.testing.assert_array_equal(before, after)


def test_a_chat_session_reuses_the_static_cache(fp32_static):
    _, gen = fp32_static
    session = ChatSession(gen, max_new_tokens=4, do_sample=False)
    session.send("Hi")
    cached = session.cached_tokens
    second = session.send("And then?")
    assert cached > 0
    assert second.metrics.prompt_tokens < len(second.prompt_token_ids), "only the new turn is fed"
    fresh = gen.chat(session.messages[:-1], max_new_tokens=4, do_sample=False)
    assert fresh.token_ids == second.token_ids


# -- the simulated HTP -------------------------------------------------------------------

BUILDS = [("qwen2", "int8"), ("qwen3", "int8"), ("qwen2", "int4"), ("qwen3", "int4")]


@needs_qnn
@pytest.mark.parametrize(("family", "precision"), BUILDS)
def test_greedy_on_qnn_matches_the_same_graphs_on_cpu_for_every_prompt_length(
    small_static_build, family, precision
):
    artifact = small_static_build(family, precision).artifact
    qnn = Generator(artifact)
    cpu = Generator(artifact, provider="CPUExecutionProvider")
    assert qnn.provider == "QNNExecutionProvider" and cpu.provider == "CPUExecutionProvider"
    assert {p.name for p in qnn.engine.files.values()} == {"prefill_ctx.onnx", "decode_ctx.onnx"}
    rng = np.random.default_rng(7)
    for n in [1, SMALL_CHUNK - 1, SMALL_CHUNK, SMALL_CHUNK + 1, 3 * SMALL_CHUNK]:
        ids = [int(i) for i in rng.integers(0, SMALL_VOCAB, n)]
        on_qnn = qnn.generate(ids, max_new_tokens=8, do_sample=False, stop_token_ids=[])
        on_cpu = cpu.generate(ids, max_new_tokens=8, do_sample=False, stop_token_ids=[])
        assert len(on_qnn.token_ids) == 8, f"{n}-token prompt"
        assert on_qnn.token_ids == on_cpu.token_ids, f"{n}-token prompt"


@needs_qnn
def test_without_onnxruntime_qnn_a_qnn_artifact_runs_on_cpu(small_static_build, monkeypatch):
    import edgepipe.runtime.qnn as qnn

    artifact = small_static_build("qwen3", "int8").artifact
    monkeypatch.setattr(qnn, "qnn_available", lambda: False)
    gen = Generator(artifact)
    assert gen.provider == "CPUExecutionProvider"
    assert {p.name for p in gen.engine.files.values()} == {"prefill.onnx", "decode.onnx"}
    assert len(gen.generate([5, 6, 7], max_new_tokens=3, stop_token_ids=[]).token_ids) == 3


@needs_qnn
def test_an_artifact_without_ep_context_graphs_compiles_the_qdq_graphs_on_qnn(
    small_static_build, tmp_path
):
    source = small_static_build("qwen2", "int8").artifact
    copy = shutil.copytree(source, tmp_path / "copy")
    for path in copy.glob("*_ctx*"):
        path.unlink()
    options = Generator(source, provider="CPUExecutionProvider").artifact.provider_options
    (copy / "manifest.json").unlink()  # a bare folder: no EPContext graphs, no QNN options
    gen = Generator(copy, provider="QNNExecutionProvider", provider_options=options)
    assert {p.name for p in gen.engine.files.values()} == {"prefill.onnx", "decode.onnx"}
    assert len(gen.generate([9, 8, 7], max_new_tokens=2, stop_token_ids=[]).token_ids) == 2
