"""Tests for edgepipe.runtime.tools: parsing `<tool_call>` blocks (whole and streamed) and
checking tool definitions and tool_choice."""

from __future__ import annotations

import json
import re

import pytest

from edgepipe.runtime.tools import (
    ToolCall,
    ToolCallStream,
    check_tool_choice,
    check_tools,
    parse_tool_calls,
    prepare_messages,
    tojson,
)
from tests.fixtures.constrained import TOOLS, WEATHER_TOOL


def block(name, arguments):
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


WEATHER = block("get_weather", {"city": "Paris", "unit": "celsius"})
SEARCH = block("search", {"query": "edge <b> & 北京", "filters": {"year": 2024}})
BROKEN = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par\n</tool_call>'


def test_one_call_is_parsed_and_removed_from_the_text():
    parsed = parse_tool_calls(WEATHER)
    assert parsed.text == ""
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"})
    ]
    assert parsed.tool_call_errors == []
    assert re.fullmatch(r"call_[0-9a-f]{24}", parsed.tool_calls[0].id)


def test_several_calls_after_text_keep_order_and_unique_ids():
    parsed = parse_tool_calls("Let me check both.\n" + WEATHER + "\n" + SEARCH)
    assert parsed.text == "Let me check both."
    assert [c.name for c in parsed.tool_calls] == ["get_weather", "search"]
    assert parsed.tool_calls[1].arguments["query"] == "edge <b> & 北京"
    assert len({c.id for c in parsed.tool_calls}) == 2


def test_text_without_calls_is_unchanged():
    text = "Plain answer with <b>tags</b> and a < sign <tool but no call."
    assert parse_tool_calls(text).text == text


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (BROKEN, "not valid JSON"),
        ('<tool_call>\n["get_weather"]\n</tool_call>', "not a JSON object"),
        ('<tool_call>\n{"arguments": {}}\n</tool_call>', "no string 'name'"),
        ('<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>', "not a JSON object"),
    ],
)
def test_a_malformed_call_stays_in_the_text_with_an_error(body, reason):
    parsed = parse_tool_calls("Answer: " + body + "\n" + WEATHER)
    assert parsed.text == "Answer: " + body
    assert [c.name for c in parsed.tool_calls] == ["get_weather"]
    assert len(parsed.tool_call_errors) == 1 and reason in parsed.tool_call_errors[0]


def test_an_unclosed_call_is_text_with_an_error():
    parsed = parse_tool_calls('Hi <tool_call>\n{"name": "f", "argu')
    assert parsed.text == 'Hi <tool_call>\n{"name": "f", "argu'
    assert parsed.tool_calls == [] and "not closed" in parsed.tool_call_errors[0]


def test_quoted_arguments_are_parsed():
    parsed = parse_tool_calls(
        '<tool_call>\n{"name": "f", "arguments": "{\\"a\\": 1}"}\n</tool_call>'
    )
    assert parsed.tool_calls[0].arguments == {"a": 1}


def test_calls_inside_thinking_are_not_calls():
    reply = "<think>\nMaybe " + WEATHER + "?\n</think>\n\n" + SEARCH
    parsed = parse_tool_calls(reply)
    assert [c.name for c in parsed.tool_calls] == ["search"]
    assert parsed.text.startswith("<think>\nMaybe <tool_call>")
    started = parse_tool_calls("Maybe " + WEATHER + "</think>\n\n" + SEARCH, thinking=True)
    assert [c.name for c in started.tool_calls] == ["search"]


REPLY = "Checking.\n" + WEATHER + "\n" + BROKEN + "\n" + SEARCH + "\nDone <tool"


def stream(chunks, **kwargs):
    parser = ToolCallStream(**kwargs)
    events = []
    for chunk in chunks:
        events += parser.feed(chunk)
    events += parser.close()
    return events, parser.result


def summary(events):
    text = "".join(e for e in events if isinstance(e, str))
    calls = [(e.name, e.arguments) for e in events if isinstance(e, ToolCall)]
    return text, calls


@pytest.mark.parametrize("reply", [REPLY, WEATHER + SEARCH, "<think>x</think>\n" + WEATHER])
def test_calls_split_across_chunks_at_every_point_parse_the_same(reply):
    whole = parse_tool_calls(reply)
    expected = (whole.text, [(c.name, c.arguments) for c in whole.tool_calls])
    for cut in range(len(reply) + 1):
        events, result = stream([reply[:cut], reply[cut:]])
        assert summary(events) == expected, cut
        assert result.text == whole.text and result.tool_call_errors == whole.tool_call_errors
    for cuts in ([1] * len(reply), [3, 7, 11] * len(reply)):
        chunks, at = [], 0
        for size in cuts:
            if at >= len(reply):
                break
            chunks.append(reply[at : at + size])
            at += size
        assert summary(stream(chunks)[0]) == expected


def test_streamed_text_never_contains_call_markup():
    reply = "Sure.\n" + WEATHER + "\n" + SEARCH
    for cut in range(len(reply) + 1):
        events, _ = stream([reply[:cut], reply[cut:]])
        deltas = [e for e in events if isinstance(e, str)]
        assert "".join(deltas) == "Sure.", cut
        assert not any("<" in d for d in deltas)


def test_a_call_is_yielded_as_soon_as_its_block_closes():
    parser = ToolCallStream()
    assert parser.feed("Hi " + WEATHER[:-1]) == ["Hi"]
    events = parser.feed(WEATHER[-1] + "\nmore")
    assert isinstance(events[0], ToolCall) and events[0].name == "get_weather"


def test_tojson_keeps_key_order_and_does_not_escape():
    value = {"b": 1, "a": "<&>'", "c": "北京"}
    assert tojson(value) == '{"b": 1, "a": "<&>\'", "c": "北京"}'
    assert tojson(value, indent=2) == json.dumps(value, ensure_ascii=False, indent=2)


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


@pytest.mark.parametrize(
    ("tools", "message"),
    [
        ([{"type": "function", "function": {"description": "x"}}], "tools[0] has no name"),
        ([TOOL, {"name": ""}], "tools[1] has no name"),
        ([{"name": "f", "parameters": "object"}], "parameters must be a JSON schema object"),
        ([TOOL, {"name": "f"}], "used by an earlier tool"),
        ("f", "must be a list"),
        ([["f"]], "tools[0] must be a dict"),
    ],
)
def test_bad_tools_are_refused_with_the_reason(tools, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_tools(tools)


def test_tool_choice_resolves_to_a_mode_or_a_name():
    tools = check_tools([TOOL, {"name": "g"}])
    assert check_tool_choice("auto", tools) == "auto"
    assert check_tool_choice("required", tools) == "required"
    assert check_tool_choice({"type": "function", "function": {"name": "g"}}, tools) == "g"
    with pytest.raises(ValueError, match="not in tools"):
        check_tool_choice({"type": "function", "function": {"name": "h"}}, tools)
    with pytest.raises(ValueError, match="tool_choice must be one of"):
        check_tool_choice("any", tools)
    with pytest.raises(ValueError, match="needs at least one tool"):
        check_tool_choice("required", [])


def test_prepare_messages_parses_string_arguments_and_tool_call_objects():
    call = ToolCall(name="f", arguments={"x": 1}, id="call_1")
    messages = [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": "g", "arguments": '{"y": 2}'}}
            ],
        },
    ]
    out = prepare_messages(messages)
    assert out[0]["tool_calls"][0]["function"] == {"name": "f", "arguments": {"x": 1}}
    assert out[1]["tool_calls"][0]["function"]["arguments"] == {"y": 2}
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == '{"y": 2}'  # not mutated


# --- Generator.chat with tools (toy artifacts with each family's template) ---------------------

ASK = [{"role": "user", "content": "Weather in Paris?"}]
SAMPLED = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}


@pytest.fixture(scope="module")
def generators(flat_toy_dirs):
    from edgepipe.runtime import Generator

    return {family: Generator(folder) for family, folder in flat_toy_dirs.items()}


def assert_valid_calls(result, allowed=("get_weather", "search")):
    jsonschema = pytest.importorskip("jsonschema")
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    assert result.tool_calls and result.tool_call_errors == []
    for call in result.tool_calls:
        assert call.name in allowed
        jsonschema.validate(call.arguments, schemas[call.name])


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_required_tool_choice_yields_calls_whose_arguments_fit_the_schema(generators, family):
    pytest.importorskip("llguidance")
    gen = generators[family]
    for seed in range(8):
        result = gen.chat(
            ASK, tools=TOOLS, tool_choice="required", seed=seed, max_new_tokens=160, **SAMPLED
        )
        assert_valid_calls(result)
        assert result.text == "" and result.finish_reason == "stop"


def test_named_tool_choice_forces_one_call_of_that_tool(generators):
    pytest.importorskip("llguidance")
    choice = {"type": "function", "function": {"name": "search"}}
    for seed in range(4):
        result = generators["qwen3"].chat(
            ASK, tools=TOOLS, tool_choice=choice, seed=seed, max_new_tokens=120, **SAMPLED
        )
        assert_valid_calls(result, allowed=("search",))
        assert len(result.tool_calls) == 1


def test_streamed_required_call_yields_tool_calls_not_markup(generators):
    pytest.importorskip("llguidance")
    stream = generators["qwen2"].chat_stream(
        ASK, tools=TOOLS, tool_choice="required", seed=1, max_new_tokens=160, **SAMPLED
    )
    events = list(stream)
    calls = [e for e in events if isinstance(e, ToolCall)]
    assert calls and calls == stream.result.tool_calls
    assert not any(isinstance(e, str) and "tool_call" in e for e in events)


def test_a_call_and_its_result_continue_the_conversation(generators):
    pytest.importorskip("llguidance")
    gen = generators["qwen3"]
    first = gen.chat(ASK, tools=TOOLS, tool_choice="required", max_new_tokens=160)
    history = ASK + [
        {"role": "assistant", "content": first.text, "tool_calls": first.tool_calls},
        {"role": "tool", "content": '{"temp": 21}'},
    ]
    prompt = gen.render_chat(history, tools=TOOLS, enable_thinking=False)
    call = first.tool_calls[0]
    assert f'{{"name": "{call.name}", "arguments": {json.dumps(call.arguments)}}}' in prompt
    assert '<tool_response>\n{"temp": 21}\n</tool_response>' in prompt
    again = gen.chat(history, tools=TOOLS, max_new_tokens=8, enable_thinking=False)
    assert again.finish_reason in ("stop", "length")


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_render_chat_shows_the_tools_prompt(generators, family):
    gen = generators[family]
    prompt = gen.render_chat(ASK, tools=TOOLS)
    assert prompt == gen.chat_template.render(ASK, tools=TOOLS)
    assert "# Tools" in prompt and json.dumps(WEATHER_TOOL, ensure_ascii=False) in prompt


def test_auto_parses_nothing_from_gibberish_and_none_keeps_text(generators):
    gen = generators["qwen2"]
    auto = gen.chat(ASK, tools=TOOLS, max_new_tokens=12, seed=0, **SAMPLED)
    assert auto.tool_calls == [] and "<tool_call>" not in auto.text
    none = gen.chat(ASK, tools=TOOLS, tool_choice="none", max_new_tokens=12, seed=0, **SAMPLED)
    assert none.tool_calls == [] and none.token_ids == auto.token_ids


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tools": [{"type": "function", "function": {}}]}, "tools[0] has no name"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice must be one of"),
        ({"tools": TOOLS, "tool_choice": "required", "enable_thinking": True}, "cannot think"),
        ({"tools": TOOLS, "tool_choice": "required", "regex": "a"}, "cannot be combined"),
    ],
)
def test_bad_tool_requests_fail_before_generation(generators, monkeypatch, kwargs, message):
    gen = generators["qwen3"]
    monkeypatch.setattr(gen._engine, "begin", lambda *a, **k: pytest.fail("generation started"))
    with pytest.raises(ValueError, match=re.escape(message)):
        gen.chat(ASK, **kwargs)
