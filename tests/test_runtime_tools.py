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
