"""A reply's text as OpenAI's message parts, whole (`chat_message`) and streamed (`StreamedReply`).

Scripted model outputs: what a Qwen model writes when it calls tools, thinks first, or breaks
a call's JSON.
"""

from __future__ import annotations

import json

import pytest

from edgepipe.serve.replies import StreamedReply, chat_message
from edgepipe.serve.responses import ChunkWriter, Outcome, full_response
from edgepipe.serve.structured import Structured

AUTO = Structured(tools=[{"type": "function", "function": {"name": "f"}}], choice="auto")
ONE_CALL = Structured(tools=AUTO.tools, choice="auto", parallel=False)
NONE = Structured(tools=AUTO.tools, choice="none")
WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
SEARCH = '{"name": "search", "arguments": {"query": "café <b>"}}'
TWO_CALLS = f"<tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>\n{SEARCH}\n</tool_call>"
BROKEN = '<tool_call>\n{"name": "get_weather", "arguments": {"city": Paris}}\n</tool_call>'
THOUGHT = "<think>\nThe user wants the weather: call get_weather.\n</think>\n\n"


def called(message) -> list[tuple[str, dict]]:
    return [
        (c["function"]["name"], json.loads(c["function"]["arguments"]))
        for c in message.get("tool_calls") or []
    ]


def streamed(text: str, structured: Structured, *, started=False, reasoning=True, size=1):
    """Feed `text` in pieces of `size` characters; return the deltas and the reply."""
    reply = StreamedReply(started=started, reasoning=reasoning, structured=structured)
    deltas = []
    for i in range(0, len(text), size):
        deltas += reply.push(text[i : i + size])
        if reply.complete:
            break
    return deltas + reply.close(), reply


def joined(deltas, key) -> str:
    return "".join(d.get(key, "") for d in deltas)


def streamed_calls(deltas) -> list[tuple[str, dict]]:
    """Accumulate tool-call deltas by index, as OpenAI's clients do."""
    calls: dict[int, dict] = {}
    for delta in deltas:
        for part in delta.get("tool_calls", []):
            entry = calls.setdefault(part["index"], {"name": "", "arguments": ""})
            entry["name"] += part.get("function", {}).get("name", "")
            entry["arguments"] += part["function"]["arguments"]
    return [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())]


def test_text_then_a_call_gives_content_and_one_tool_call():
    message = chat_message(
        f"Let me check.\n<tool_call>\n{WEATHER}\n</tool_call>",
        reasoning=True,
        started=False,
        structured=AUTO,
    )
    assert message["content"] == "Let me check."
    assert called(message) == [("get_weather", {"city": "Paris", "unit": "celsius"})]
    call = message["tool_calls"][0]
    assert call["type"] == "function" and call["id"].startswith("call_") and len(call["id"]) > 10
    assert isinstance(call["function"]["arguments"], str)


def test_calls_only_give_null_content_and_the_tool_calls_finish_reason():
    out = Outcome("chat", "toy", 5, text=TWO_CALLS, finish_reason="stop")
    body = full_response(out, reasoning=True, started=False, structured=AUTO)
    message = body["choices"][0]["message"]
    assert message["content"] is None
    assert [name for name, _ in called(message)] == ["get_weather", "search"]
    assert called(message)[1][1] == {"query": "café <b>"}  # not escaped, not ASCII-fied
    assert body["choices"][0]["finish_reason"] == "tool_calls" == out.finish_reason
    assert len({c["id"] for c in message["tool_calls"]}) == 2


def test_malformed_call_json_stays_in_the_content():
    message = chat_message(f"Sure. {BROKEN}", reasoning=True, started=False, structured=AUTO)
    assert "tool_calls" not in message
    assert message["content"] == f"Sure. {BROKEN}"
    out = Outcome("chat", "toy", 5, text=BROKEN, finish_reason="stop")
    body = full_response(out, reasoning=True, started=False, structured=AUTO)
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["message"]["content"] == BROKEN


def test_thinking_before_a_call_is_reasoning_content():
    text = THOUGHT + f"<tool_call>\n{WEATHER}\n</tool_call>"
    for started, body in ((False, text), (True, text[len("<think>") :])):
        message = chat_message(body, reasoning=True, started=started, structured=AUTO)
        assert message["reasoning_content"] == "The user wants the weather: call get_weather."
        assert message["content"] is None and len(called(message)) == 1


def test_a_call_inside_thinking_is_not_a_call():
    text = f"<think>\nmaybe <tool_call>\n{WEATHER}\n</tool_call>\n</think>\n\nNo call."
    message = chat_message(text, reasoning=True, started=False, structured=AUTO)
    assert "tool_calls" not in message and message["content"] == "No call."
    assert "<tool_call>" in message["reasoning_content"]


def test_tool_choice_none_and_no_tools_leave_markup_as_text():
    for structured in (NONE, Structured()):
        message = chat_message(TWO_CALLS, reasoning=False, started=False, structured=structured)
        assert message["content"] == TWO_CALLS and "tool_calls" not in message


def test_parallel_tool_calls_false_keeps_the_first_call():
    message = chat_message(TWO_CALLS, reasoning=True, started=False, structured=ONE_CALL)
    assert [name for name, _ in called(message)] == ["get_weather"]
    deltas, reply = streamed(TWO_CALLS, ONE_CALL)
    assert reply.complete and [c.name for c in reply.tool_calls] == ["get_weather"]
    assert streamed_calls(deltas) == called(message)


@pytest.mark.parametrize("size", [1, 2, 5, 13, 1000])
@pytest.mark.parametrize(
    "text",
    [
        f"Let me check.\n<tool_call>\n{WEATHER}\n</tool_call>",
        TWO_CALLS,
        THOUGHT + TWO_CALLS,
        f"Sure. {BROKEN} ok",
        "Just text, <tool_ but no call.",
    ],
)
def test_streamed_deltas_agree_with_the_whole_message(text, size):
    whole = chat_message(text, reasoning=True, started=False, structured=AUTO)
    deltas, _ = streamed(text, AUTO, size=size)
    assert streamed_calls(deltas) == called(whole)
    assert joined(deltas, "content").strip() == (whole["content"] or "").strip()
    # Up to the newlines around the thinking block (see serve/reasoning.py).
    assert joined(deltas, "reasoning_content").strip() == whole.get("reasoning_content", "")
    if BROKEN not in text:  # a malformed block is content, as written
        assert "tool_call>" not in joined(deltas, "content")
    for delta in deltas:
        for part in delta.get("tool_calls", []):
            assert set(part) in ({"index", "id", "type", "function"}, {"index", "function"})


def test_a_streamed_call_opens_with_its_id_and_name_then_its_arguments():
    deltas, _ = streamed(TWO_CALLS, AUTO, size=7)
    parts = [part for d in deltas for part in d.get("tool_calls", [])]
    assert [p["index"] for p in parts] == [0, 0, 1, 1]
    head, body = parts[0], parts[1]
    assert head["id"].startswith("call_") and head["type"] == "function"
    assert head["function"] == {"name": "get_weather", "arguments": ""}
    assert json.loads(body["function"]["arguments"]) == json.loads(WEATHER)["arguments"]


def test_the_finish_reason_comes_in_an_empty_delta_after_tool_calls():
    out = Outcome("chat", "toy", 5)
    writer = ChunkWriter(out, usage=False)
    deltas, _ = streamed(TWO_CALLS, AUTO)
    events = [
        json.loads(line[6:]) for line in writer.deltas(deltas, "tool_calls").split("\n\n")[:-1]
    ]
    assert [e["choices"][0]["finish_reason"] for e in events] == [None] * 4 + ["tool_calls"]
    assert events[-1]["choices"][0]["delta"] == {}
    text = [
        json.loads(x[6:]) for x in writer.deltas([{"content": "hi"}], "stop").split("\n\n")[:-1]
    ]
    assert len(text) == 1 and text[0]["choices"][0]["delta"] == {"content": "hi"}
    assert text[0]["choices"][0]["finish_reason"] == "stop"
