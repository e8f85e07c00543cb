"""Chat templates with tools: edgepipe's templates render what the official ones render.

Three renderings must agree, token for token with the real Qwen tokenizer, for both families:
edgepipe's runtime (`ChatTemplate.render`, plain jinja2 with transformers' `tojson`),
transformers' `apply_chat_template` with edgepipe's template, and transformers'
`apply_chat_template` with the official template text (tests/fixtures/official_templates.py).
"""

from __future__ import annotations

import pytest

from edgepipe.arch.tokenizer import chat_template
from edgepipe.runtime.chat import ChatTemplate
from tests.fixtures.official_templates import OFFICIAL

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city. Use <b>only</b> for cities & towns.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "城市, e.g. 北京"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1},
            },
            "required": ["city"],
        },
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search the web.",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string"},
                "filters": {
                    "type": "object",
                    "properties": {"site": {"type": "string"}, "year": {"type": "integer"}},
                },
                "tags": {"type": "array", "items": {"type": "string"}},
            },
            "required": ["query"],
        },
    },
}
BARE = {"name": "now", "description": "Current time (no arguments).", "parameters": {}}

TOOL_SETS = {
    "one": [WEATHER],
    "two": [WEATHER, SEARCH],
    "bare_function": [BARE, SEARCH],
}


def user(text):
    return {"role": "user", "content": text}


def call(name, arguments, wrapped=True):
    inner = {"name": name, "arguments": arguments}
    return {"type": "function", "function": inner} if wrapped else inner


CONVERSATIONS = {
    "question": [user("What's the weather in Paris?")],
    "system": [{"role": "system", "content": "Be brief."}, user("Weather in 北京?")],
    "call_and_result": [
        user("Weather in Paris?"),
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [call("get_weather", {"city": "Paris", "unit": "celsius"})],
        },
        {"role": "tool", "content": '{"temp": 21, "sky": "<clear>"}'},
    ],
    "text_then_two_calls": [
        {"role": "system", "content": "S"},
        user("Paris and Rome?"),
        {
            "role": "assistant",
            "content": "Checking both.",
            "tool_calls": [
                call("get_weather", {"city": "Paris"}),
                call("get_weather", {"city": "Rome", "days": 2}, wrapped=False),
            ],
        },
        {"role": "tool", "content": "sunny"},
        {"role": "tool", "content": "rain"},
        {"role": "assistant", "content": "Paris is sunny, Rome rainy."},
        user("And tomorrow?"),
    ],
    "string_arguments": [
        user("Search"),
        {"role": "assistant", "content": "", "tool_calls": [call("search", '{"query": "x"}')]},
        {"role": "tool", "content": "result"},
    ],
    "reasoning_and_calls": [
        user("Q"),
        {
            "role": "assistant",
            "content": "<think>\nneed data\n</think>\n\n",
            "tool_calls": [call("search", {"query": "q", "filters": {"year": 2024}})],
        },
        {"role": "tool", "content": "r"},
        {"role": "assistant", "content": "A", "reasoning_content": "got it"},
    ],
}
OPTIONS = {
    "plain": {"add_generation_prompt": False},
    "generation": {"add_generation_prompt": True},
    "thinking_off": {"add_generation_prompt": True, "enable_thinking": False},
}


@pytest.fixture(scope="module")
def hf_tokenizers(qwen_tokenizer_dir, qwen3_tokenizer_dir):
    from transformers import AutoTokenizer

    return {
        "qwen2": AutoTokenizer.from_pretrained(qwen_tokenizer_dir),
        "qwen3": AutoTokenizer.from_pretrained(qwen3_tokenizer_dir),
    }


def renderings(hf_tokenizers, family, messages, tools, options):
    hf = hf_tokenizers[family]
    ours = ChatTemplate(chat_template(family)).render(messages, tools=tools, **options)
    theirs = hf.apply_chat_template(
        messages, tools=tools, chat_template=chat_template(family), tokenize=False, **options
    )
    official = hf.apply_chat_template(
        messages, tools=tools, chat_template=OFFICIAL[family], tokenize=False, **options
    )
    return hf, ours, theirs, official


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("tool_set", TOOL_SETS)
@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_tools_render_as_the_official_template_token_for_token(
    hf_tokenizers, family, tool_set, conversation, option
):
    messages, tools = CONVERSATIONS[conversation], TOOL_SETS[tool_set]
    hf, ours, theirs, official = renderings(hf_tokenizers, family, messages, tools, OPTIONS[option])
    assert ours == theirs == official
    ids = hf(ours, add_special_tokens=False)["input_ids"]
    assert ids == hf(official, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_tool_calls_and_results_render_as_official_without_tools(
    hf_tokenizers, family, conversation
):
    _, ours, theirs, official = renderings(
        hf_tokenizers, family, CONVERSATIONS[conversation], None, {"add_generation_prompt": True}
    )
    assert ours == theirs == official


def test_tools_keep_key_order_and_do_not_escape_html(hf_tokenizers):
    text = ChatTemplate(chat_template("qwen3")).render([user("hi")], tools=[WEATHER])
    assert '{"type": "function", "function": {"name": "get_weather"' in text
    assert "<b>only</b> for cities & towns" in text and "城市" in text


def test_qwen2_5_tool_block_is_the_official_wording():
    text = ChatTemplate(chat_template("qwen2")).render(
        [user("hi")], tools=[BARE], add_generation_prompt=True
    )
    assert text == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
        "assistant.\n\n# Tools\n\nYou may call one or more functions to assist with the user "
        "query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n"
        '<tools>\n{"name": "now", "description": "Current time (no arguments).", '
        '"parameters": {}}\n</tools>\n\nFor each function call, return a json object with '
        "function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
