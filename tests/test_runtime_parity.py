"""The runtime's greedy output against onnxruntime-genai (and transformers, on exported models)."""

from __future__ import annotations

import pytest

from edgepipe.runtime import Generator
from tests.test_runtime_toy import build_toy_artifact

og = pytest.importorskip("onnxruntime_genai")


@pytest.fixture(scope="module")
def toy(tmp_path_factory, qwen3_tokenizer_dir):
    return build_toy_artifact(
        tmp_path_factory.mktemp("toy-parity") / "artifact", qwen3_tokenizer_dir
    )


def genai_greedy(folder, ids: list[int], new_tokens: int) -> list[int]:
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


@pytest.mark.parametrize("prompt", ["Hello world, this is", "你好 🫠 สวัสดี", "x"])
def test_greedy_equals_onnxruntime_genai_on_the_toy_artifact(toy, prompt):
    gen = Generator(toy)
    ids = gen.encode(prompt)
    ours = gen.generate(ids, max_new_tokens=64, stop_token_ids=[]).token_ids
    theirs = genai_greedy(toy, ids, 64)
    assert len(ours) == 64
    assert ours == theirs[:64]
