"""Tests for the chat templates in edgepipe/templates (via edgepipe.arch.tokenizer.chat_template).

Two kinds of check: hand-written strings of the official Qwen2.5-Instruct and Qwen3 formats (so a
wrong template cannot pass), and plain jinja2 (what the runtime uses) rendering exactly what
transformers' `apply_chat_template` renders from the written tokenizer folder.
"""

from __future__ import annotations

import json

import jinja2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgepipe.arch.tokenizer import chat_template

DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

ENVIRONMENTS = {
    "plain": jinja2.Environment(),
    "trim": jinja2.Environment(trim_blocks=True, lstrip_blocks=True),
    "strict": jinja2.Environment(undefined=jinja2.StrictUndefined),
}


def render(family: str, messages: list[dict], env: str = "plain", **kwargs) -> str:
    template = ENVIRONMENTS[env].from_string(chat_template(family))
    return template.render(messages=messages, **kwargs)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str, reasoning: str | None = None) -> dict:
    message = {"role": "assistant", "content": text}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    return message


def system(text: str) -> dict:
    return {"role": "system", "content": text}


def tool(text: str) -> dict:
    return {"role": "tool", "content": text}


# --- the official formats, written out by hand ------------------------------------------------


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_qwen2_5_adds_the_default_system_prompt(env):
    assert render("qwen2", [user("Hello")], env, add_generation_prompt=True) == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nHello<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_qwen2_5_multi_turn_with_own_system_prompt(env):
    messages = [system("You are terse."), user("Hi"), assistant("Hello!"), user("Bye")]
    assert render("qwen2", messages, env) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n"
    )


def test_qwen2_5_groups_consecutive_tool_results_in_one_user_turn():
    messages = [user("Q"), assistant("calling"), tool("r1"), tool("r2"), assistant("done")]
    assert render("qwen2", messages) == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nQ<|im_end|>\n"
        "<|im_start|>assistant\ncalling<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nr1\n</tool_response>\n"
        "<tool_response>\nr2\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\ndone<|im_end|>\n"
    )


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_qwen3_has_no_default_system_prompt_and_thinks_by_default(env):
    expected = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert render("qwen3", [user("Hi")], env, add_generation_prompt=True) == expected
    on = render("qwen3", [user("Hi")], env, add_generation_prompt=True, enable_thinking=True)
    assert on == expected


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_qwen3_thinking_off_adds_an_empty_think_block(env):
    text = render("qwen3", [user("Hi")], env, add_generation_prompt=True, enable_thinking=False)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_qwen3_drops_thinking_of_turns_before_the_last_query(env):
    messages = [
        system("S"),
        user("Q1"),
        assistant("<think>\nreason one\n</think>\n\nA1"),
        user("Q2"),
        assistant("A2", reasoning="reason two"),
        user("Q3"),
    ]
    assert render("qwen3", messages, env, add_generation_prompt=True) == (
        "<|im_start|>system\nS<|im_end|>\n"
        "<|im_start|>user\nQ1<|im_end|>\n"
        "<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>user\nQ2<|im_end|>\n"
        "<|im_start|>assistant\nA2<|im_end|>\n"
        "<|im_start|>user\nQ3<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_qwen3_keeps_thinking_after_the_last_query():
    messages = [user("Q"), assistant("\nA", reasoning="\nR\n")]
    assert render("qwen3", messages) == (
        "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<think>\nR\n</think>\n\nA<|im_end|>\n"
    )


def test_qwen3_final_assistant_turn_without_thinking_gets_an_empty_block():
    # The official template does this too: the last turn is rendered as the model emits it.
    assert render("qwen3", [user("Hi"), assistant("Hello")]) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nHello<|im_end|>\n"
    )


def test_qwen3_tool_results_do_not_count_as_the_last_query():
    messages = [
        user("Q"),
        assistant("calling", reasoning="R1"),
        tool("r1"),
        tool("r2"),
        user("<tool_response>r3</tool_response>"),
        assistant("done"),
    ]
    assert render("qwen3", messages) == (
        "<|im_start|>user\nQ<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nR1\n</think>\n\ncalling<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nr1\n</tool_response>\n"
        "<tool_response>\nr2\n</tool_response><|im_end|>\n"
        "<|im_start|>user\n<tool_response>r3</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\ndone<|im_end|>\n"
    )


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_tools_need_transformers_tojson_in_plain_jinja2(family):
    # Tools render (tests/test_chat_template_tools.py checks them against the official text);
    # jinja2's own tojson sorts keys, so an environment must register transformers' filter.
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    text = render(family, [user("Hi")], tools=tools)
    assert '{"function": {"name": "f", "parameters": {}}, "type": "function"}' in text
    env = jinja2.Environment()
    env.filters["tojson"] = lambda value: json.dumps(value, ensure_ascii=False)
    text = env.from_string(chat_template(family)).render(messages=[user("Hi")], tools=tools)
    assert '{"type": "function", "function": {"name": "f", "parameters": {}}}' in text


# --- plain jinja2 == transformers' apply_chat_template ------------------------------------------

CONVERSATIONS = {
    "single": [user("Hello")],
    "system": [system("Be brief."), user("What is 2+2?")],
    "multi_turn": [system("S"), user("a"), assistant("b"), user("c"), assistant("d"), user("e")],
    "thinking_history": [
        user("Q1"),
        assistant("<think>\nlong thought\n</think>\n\nA1"),
        user("Q2"),
        assistant("A2", reasoning="r2"),
    ],
    "tools_results": [user("Q"), assistant("x", reasoning="y"), tool("1"), tool("2")],
    "unicode": [user("你好 🙂 สวัสดี"), assistant("ok\n\n")],
}
OPTIONS = {
    "plain": {},
    "generation": {"add_generation_prompt": True},
    "thinking_on": {"add_generation_prompt": True, "enable_thinking": True},
    "thinking_off": {"add_generation_prompt": True, "enable_thinking": False},
}


@pytest.fixture(scope="module")
def hf_tokenizers(qwen_tokenizer_dir, qwen3_tokenizer_dir):
    from transformers import AutoTokenizer

    return {
        "qwen2": AutoTokenizer.from_pretrained(qwen_tokenizer_dir),
        "qwen3": AutoTokenizer.from_pretrained(qwen3_tokenizer_dir),
    }


def hf_render(hf_tokenizers, family: str, messages: list[dict], **kwargs) -> str:
    return hf_tokenizers[family].apply_chat_template(messages, tokenize=False, **kwargs)


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_plain_jinja2_renders_what_transformers_renders(
    hf_tokenizers, family, conversation, option
):
    messages, kwargs = CONVERSATIONS[conversation], OPTIONS[option]
    expected = hf_render(hf_tokenizers, family, messages, **kwargs)
    for env in ENVIRONMENTS:
        assert render(family, messages, env, **kwargs) == expected


def test_transformers_uses_the_written_template(hf_tokenizers):
    # Guards the comparison above: it must not pass because transformers fell back to a default.
    text = hf_render(hf_tokenizers, "qwen3", [user("Hi")], add_generation_prompt=True,
                     enable_thinking=False)  # fmt: skip
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert hf_render(hf_tokenizers, "qwen2", [user("Hi")]).startswith(
        f"<|im_start|>system\n{DEFAULT_SYSTEM}"
    )


_pieces = st.sampled_from(["hi", " ", "\n", "\n\n", "<think>", "</think>", "思考", "x y", ""])
_text = st.lists(_pieces, max_size=5).map("".join)
_message = st.one_of(
    st.builds(user, _text),
    st.builds(assistant, _text),
    st.builds(assistant, _text, _text),
    st.builds(system, _text),
    st.builds(tool, _text),
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    messages=st.lists(_message, min_size=1, max_size=7),
    add_generation_prompt=st.booleans(),
    thinking=st.sampled_from([None, True, False]),
)
def test_random_conversations_render_like_transformers(
    hf_tokenizers, messages, add_generation_prompt, thinking
):
    kwargs = {"add_generation_prompt": add_generation_prompt}
    if thinking is not None:
        kwargs["enable_thinking"] = thinking
    for family in ("qwen2", "qwen3"):
        assert render(family, messages, **kwargs) == hf_render(
            hf_tokenizers, family, messages, **kwargs
        )


GENAI_CONVERSATIONS = {
    **CONVERSATIONS,
    "wrapped_tool_result": [
        user("Q"),
        assistant("a", reasoning="r"),
        user("<tool_response>x</tool_response>"),
    ],
}


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", GENAI_CONVERSATIONS)
@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_onnxruntime_genai_renders_what_jinja2_renders(
    qwen3_genai_tokenizer, family, conversation, add_generation_prompt
):
    # genai-based apps render the artifact's template with their own engine (no enable_thinking).
    messages = GENAI_CONVERSATIONS[conversation]
    text = qwen3_genai_tokenizer.apply_chat_template(
        json.dumps(messages),
        template_str=chat_template(family),
        add_generation_prompt=add_generation_prompt,
    )
    assert text == render(family, messages, add_generation_prompt=add_generation_prompt)


def test_onnxruntime_genai_picks_up_the_artifact_template(qwen3_genai_tokenizer):
    text = qwen3_genai_tokenizer.apply_chat_template(json.dumps([user("hi")]))
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
