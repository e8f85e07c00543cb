"""Bad prompts and parameters through the Python API: the runtime's errors, never a traceback."""

from __future__ import annotations

import pytest

from edgepipe.runtime import Generator, InvalidPrompt
from tests.fixtures.toy import VOCAB, build_toy_artifact


@pytest.fixture(scope="module")
def gen(tmp_path_factory, qwen3_tokenizer_dir):
    folder = build_toy_artifact(tmp_path_factory.mktemp("toy-inputs") / "a", qwen3_tokenizer_dir)
    return Generator(folder)


@pytest.mark.parametrize("bad", [-1, VOCAB, 2**63, True])
def test_a_token_id_outside_the_vocabulary_is_refused(gen, bad):
    with pytest.raises(InvalidPrompt, match=r"prompt\[1\] = .* is not a token id"):
        gen.generate([1, bad, 2], max_new_tokens=2)


def test_a_bad_id_in_a_batch_names_the_row(gen):
    with pytest.raises(InvalidPrompt, match=r"prompt\[1\]\[0\]"):
        gen.generate([[1, 2], [-5]], max_new_tokens=2)


@pytest.mark.parametrize("text", ["caf\udce9", "\ud800 lone high"])
def test_a_lone_surrogate_in_a_prompt_is_refused(gen, text):
    with pytest.raises(InvalidPrompt, match="lone surrogate"):
        gen.generate(text, max_new_tokens=2)
    with pytest.raises(InvalidPrompt, match="lone surrogate"):
        gen.chat([{"role": "user", "content": text}], max_new_tokens=2)


@pytest.mark.parametrize("value", ["no", 1, None.__class__])
def test_do_sample_must_be_a_bool(gen, value):
    with pytest.raises(ValueError, match="do_sample must be True or False"):
        gen.generate("Hi", max_new_tokens=2, do_sample=value)


def test_stop_token_ids_that_are_not_a_list_are_refused(gen):
    with pytest.raises(ValueError, match="stop_token_ids"):
        gen.generate("Hi", max_new_tokens=2, stop_token_ids=1.5)
