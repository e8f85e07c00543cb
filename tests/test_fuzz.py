"""Property tests: any input to the loaders, templates, sampler, detokenizer and CLI parser
ends in a result or the error we document, never a traceback. Bounded for CI: few examples,
no deadline (a shared CI core is slow, not wrong)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgepipe.cli.main import build_parser, main
from edgepipe.runtime.chat import ChatTemplate
from edgepipe.runtime.detokenize import IncrementalDetokenizer, TokenBytes
from edgepipe.runtime.sampling import Sampler, SamplingParams, merge_params

TEMPLATES = Path(__file__).resolve().parents[1] / "edgepipe" / "arch" / "templates"
FUZZ = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
documents = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=12,
)
# Documents shaped like recipes and profiles, so the fuzz reaches past the top-level checks.
RECIPE = yaml.safe_load(
    (Path(__file__).resolve().parents[1] / "recipes" / "tiny-qwen2.yaml").read_text()
)


@st.composite
def mutated_recipe(draw):
    doc = dict(RECIPE)
    for key in draw(st.lists(st.sampled_from(sorted(doc)), max_size=3)):
        doc[key] = draw(documents)
    return doc


@FUZZ
@given(doc=documents | mutated_recipe(), kind=st.sampled_from(["recipe", "profile"]))
def test_validate_any_yaml_exits_0_or_2(tmp_path, doc, kind, capsys):
    path = tmp_path / f"{kind}.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    assert main(["validate", str(path)]) in (0, 2)
    capsys.readouterr()


@FUZZ
@given(raw=st.binary(max_size=200))
def test_validate_any_bytes_exits_0_or_2(tmp_path, raw, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(raw)
    assert main(["validate", str(path)]) in (0, 2)
    capsys.readouterr()


messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant", "tool"]) | st.text(max_size=8),
         "content": st.text() | st.none() | st.integers()},
        optional={"tool_calls": documents, "reasoning_content": st.text(max_size=20)},
    ),
    max_size=5,
)  # fmt: skip


@pytest.mark.parametrize("name", ["qwen2.5.jinja", "qwen3.jinja"])
@FUZZ
@given(msgs=messages, thinking=st.none() | st.booleans(), tools=st.none() | documents)
def test_chat_templates_render_any_messages_or_refuse_them(name, msgs, thinking, tools):
    template = ChatTemplate((TEMPLATES / name).read_text(encoding="utf-8"))
    if tools is not None:
        msgs = [*msgs, {"role": "assistant", "content": "", "tool_calls": tools}]
    with contextlib.suppress(ValueError):  # TemplateRefused included
        assert isinstance(template.render(msgs, enable_thinking=thinking), str)


params = st.fixed_dictionaries(
    {},
    optional={
        name: scalars | st.lists(scalars, max_size=3)
        for name in ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "min_p",
                     "repetition_penalty", "seed", "stop_token_ids", "stop_strings")
    },
)  # fmt: skip


@FUZZ
@given(values=params, logits=st.lists(st.floats(-50, 50), min_size=2, max_size=64))
def test_sampling_parameters_are_accepted_or_refused_with_value_error(values, logits):
    try:
        p = merge_params(SamplingParams(), **values)
    except ValueError:
        return
    token = Sampler(p).pick(np.array(logits, dtype=np.float32), [0, 1])
    assert 0 <= token < len(logits)


@FUZZ
@given(data=st.data())
def test_incremental_detokenizer_is_byte_exact_against_a_full_decode(qwen3_tokenizer, data):
    vocab = qwen3_tokenizer.get_vocab_size(with_added_tokens=True)
    ids = data.draw(st.lists(st.integers(0, vocab - 1), max_size=40))
    for token_bytes in (TokenBytes(qwen3_tokenizer), None):
        detok = IncrementalDetokenizer(qwen3_tokenizer, token_bytes)
        text = "".join(detok.feed(ids)) + detok.flush()
        assert text == qwen3_tokenizer.decode(ids, skip_special_tokens=True)


@FUZZ
@given(argv=st.lists(st.sampled_from(["build", "run", "chat", "bench", "matrix", "validate",
                                      "list", "-p", "--json", "--shard", "1/0", "-o", "--jobs",
                                      "x", "--max-new-tokens", "-5", "--top-p", "nan", "--"])
                     | st.text(max_size=10), max_size=6))  # fmt: skip
def test_the_argument_parser_parses_or_exits_2(argv, capsys):
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:
        assert exc.code in (0, 2)
    capsys.readouterr()
