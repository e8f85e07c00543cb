"""Chat rendering with the runtime's sandboxed jinja2 == transformers' apply_chat_template."""

from __future__ import annotations

import pytest

from edgepipe.runtime import ChatTemplate, GeneratorError, TemplateRefused, split_thinking

CONVERSATIONS = {
    "single": [{"role": "user", "content": "Hello"}],
    "system": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
    ],
    "multi_turn": [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "<think>\nold thought\n</think>\n\nd"},
        {"role": "user", "content": "你好 🙂"},
    ],
}
THINKING = {"default": None, "on": True, "off": False}


@pytest.fixture(scope="module")
def templates(qwen_tokenizer_dir, qwen3_tokenizer_dir):
    return {
        "qwen2": ChatTemplate((qwen_tokenizer_dir / "chat_template.jinja").read_text()),
        "qwen3": ChatTemplate((qwen3_tokenizer_dir / "chat_template.jinja").read_text()),
    }


@pytest.fixture(scope="module")
def hf(qwen_tokenizer_dir, qwen3_tokenizer_dir):
    from transformers import AutoTokenizer

    return {
        "qwen2": AutoTokenizer.from_pretrained(qwen_tokenizer_dir),
        "qwen3": AutoTokenizer.from_pretrained(qwen3_tokenizer_dir),
    }


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("thinking", sorted(THINKING))
def test_render_equals_transformers_apply_chat_template(
    templates, hf, family, conversation, thinking
):
    messages = CONVERSATIONS[conversation]
    enable = THINKING[thinking]
    kwargs = {} if enable is None else {"enable_thinking": enable}
    expected = hf[family].apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **kwargs
    )
    assert templates[family].render(messages, enable_thinking=enable) == expected


def test_qwen3_thinking_off_ends_with_an_empty_think_block(templates):
    text = templates["qwen3"].render(CONVERSATIONS["single"], enable_thinking=False)
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert templates["qwen3"].supports_thinking
    assert not templates["qwen2"].supports_thinking


def test_qwen2_5_adds_its_default_system_prompt(templates):
    text = templates["qwen2"].render(CONVERSATIONS["single"])
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")


def test_template_refusal_is_a_generator_error_and_a_value_error_with_its_message():
    template = ChatTemplate("{{ raise_exception('no tools here') }}")
    with pytest.raises(TemplateRefused, match="no tools here") as refused:
        template.render([{"role": "user", "content": "x"}])
    assert isinstance(refused.value, GeneratorError) and isinstance(refused.value, ValueError)


def test_the_sandbox_blocks_python_internals():
    from jinja2.exceptions import SecurityError

    template = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(SecurityError):
        template.render([{"role": "user", "content": "x"}])


@pytest.mark.parametrize(
    ("message", "needle"),
    [
        ({"role": "robot", "content": "x"}, "messages[0].role must be one of"),
        ({"role": "user", "content": None}, "messages[0].content must be a string"),
    ],
)
def test_bad_messages_are_rejected_naming_the_field(templates, message, needle):
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        templates["qwen3"].render([message])


@pytest.mark.parametrize(
    ("text", "started", "thinking", "answer"),
    [
        ("<think>\nplan it\n</think>\n\nThe answer.", False, "plan it", "The answer."),
        ("plan it\n</think>\n\nThe answer.", True, "plan it", "The answer."),
        ("<think>\n\n</think>\n\nJust this.", False, "", "Just this."),
        (
            "<think>\nstill thinking when tokens ran out",
            False,
            "still thinking when tokens ran out",
            "",
        ),
        ("No thinking at all.", False, None, "No thinking at all."),
    ],
)
def test_split_thinking_separates_thinking_from_answer(text, started, thinking, answer):
    parts = split_thinking(text, started=started)
    assert (parts.thinking, parts.answer) == (thinking, answer)
