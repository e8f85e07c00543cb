"""The runtime's greedy output against onnxruntime-genai (and transformers, on exported models)."""

from __future__ import annotations

import pytest

from edgepipe.runtime import Generator
from tests.fixtures.toy import build_toy_artifact


@pytest.fixture(scope="module")
def toy(tmp_path_factory, qwen3_tokenizer_dir):
    return build_toy_artifact(
        tmp_path_factory.mktemp("toy-parity") / "artifact", qwen3_tokenizer_dir
    )


def genai_greedy(folder, ids: list[int], new_tokens: int) -> list[int]:
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    out = []
    while not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out


@pytest.mark.parametrize("prompt", ["Hello world, this is", "你好 🫠 สวัสดี"])
def test_greedy_equals_onnxruntime_genai_on_the_toy_artifact(toy, prompt):
    gen = Generator(toy)
    ids = gen.encode(prompt)
    ours = gen.generate(ids, max_new_tokens=64, stop_token_ids=[]).token_ids
    theirs = genai_greedy(toy, ids, 64)
    assert len(ours) == 64
    assert ours == theirs[:64]


# --- tiny random Qwen2 / Qwen3 exported by edgepipe.stages.export.dynamic (fp32) ---------------

PARITY_PROMPTS = ["Hello world, this is a test", "北京 🫠", "def f(x):\n    return"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_qwen2_dir, tiny_qwen3_dir):
    from edgepipe.stages.export.dynamic import build_decoder

    out = {}
    for family, source in (("qwen2", tiny_qwen2_dir), ("qwen3", tiny_qwen3_dir)):
        folder = tmp_path_factory.mktemp(f"exported-{family}")
        build_decoder(source, folder)
        out[family] = (source, folder)
    return out


@pytest.fixture(scope="module")
def hf_models(exported):
    import torch
    from transformers import AutoModelForCausalLM

    models = {}
    for family, (source, _) in exported.items():
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
        model.generation_config.eos_token_id = None  # 64 tokens, as the runtime's stop_token_ids=[]
        models[family] = model
    return models


def hf_greedy(model, ids: list[int], new_tokens: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=new_tokens,
            do_sample=False,
        )
    return out[0, len(ids) :].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_greedy_equals_transformers_generate_for_64_tokens(exported, hf_models, family):
    gen = Generator(exported[family][1])
    for prompt in PARITY_PROMPTS[:2]:
        ids = gen.encode(prompt)
        ours = gen.generate(ids, max_new_tokens=64, stop_token_ids=[]).token_ids
        assert ours == hf_greedy(hf_models[family], ids, 64)
        assert len(set(ours)) > 8  # varied output, not a degenerate loop


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_greedy_equals_onnxruntime_genai_on_the_exported_model(exported, family):
    folder = exported[family][1]
    gen = Generator(folder)
    ids = gen.encode(PARITY_PROMPTS[0])
    ours = gen.generate(ids, max_new_tokens=64, stop_token_ids=[]).token_ids
    assert ours == genai_greedy(folder, ids, 64)[:64]


@pytest.mark.slow
def test_batch_rows_equal_transformers_per_prompt(exported, hf_models):
    gen = Generator(exported["qwen3"][1])
    batch = gen.generate(PARITY_PROMPTS, max_new_tokens=24, stop_token_ids=[])
    for prompt, row in zip(PARITY_PROMPTS, batch, strict=True):
        assert row.token_ids == hf_greedy(hf_models["qwen3"], gen.encode(prompt), 24)
