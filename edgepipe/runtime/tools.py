"""Tool calling for Qwen chat: checking tool definitions, and parsing `<tool_call>` blocks.

Qwen2.5 and Qwen3 are trained to answer a function call as

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

one block per call (several calls are separated by a newline), possibly after some text. The
parser works on the accumulated reply, never on one chunk at a time: `ToolCallStream` buffers
whatever could still become `<tool_call>` (a chunk may end with `<tool_` and the next begin with
`call>`) and only releases text once it cannot, so raw markup never reaches the text stream — the
bug users report most in other servers. `parse_tool_calls(text)` is the same parser fed once, so
streaming and non-streaming results agree by construction.

A block whose body is not a JSON object with a string `name` (and an object `arguments`, if any)
is kept in the text as written and reported in `tool_call_errors`: a small model's broken call is
information for the app, never a crash.

`tojson` is transformers' chat-template filter (keys in insertion order, no HTML escaping,
non-ASCII kept); the official Qwen templates print tool definitions and call arguments with it,
so the runtime's template environment registers it to render them identically.
"""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
TOOL_CHOICES = ("auto", "none", "required")


def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """transformers' `tojson` chat-template filter: `json.dumps` with these defaults.

    jinja2's built-in `tojson` sorts keys and escapes `<`, `>`, `&` and `'` for HTML, which
    changes the prompt the model was trained on.
    """
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def new_call_id() -> str:
    """An id for a parsed call, `call_` + 24 random hex digits (OpenAI's style)."""
    return "call_" + secrets.token_hex(12)


@dataclass
class ToolCall:
    """One function call the model made.

    Attributes:
        id: generated (`call_<hex>`), to pair the call with its `role: tool` result.
        name: the function name.
        arguments: the arguments, parsed.
    """

    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=new_call_id)

    def to_message(self) -> dict:
        """The OpenAI-style entry for an assistant message's `tool_calls` list."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass
class ParsedReply:
    """A reply split into its text and its tool calls.

    Attributes:
        text: the reply without well-formed `<tool_call>` blocks (malformed ones stay in).
        tool_calls: the calls, in order.
        tool_call_errors: one message per malformed block left in `text`.
    """

    text: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_call_errors: list[str] = field(default_factory=list)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def parse_call_body(body: str) -> ToolCall | str:
    """The `ToolCall` in a block's body, or the reason it is not one."""
    try:
        data = json.loads(body)
    except json.JSONDecodeError as exc:
        return f"tool call is not valid JSON ({exc.msg} at char {exc.pos}): {body.strip()[:80]!r}"
    if not isinstance(data, dict):
        return f"tool call is not a JSON object: {body.strip()[:80]!r}"
    name = data.get("name")
    if not isinstance(name, str) or not name:
        return f"tool call has no string 'name': {body.strip()[:80]!r}"
    arguments = data.get("arguments", {})
    if isinstance(arguments, str):  # some fine-tunes quote the arguments object
        with contextlib.suppress(json.JSONDecodeError):
            arguments = json.loads(arguments)
    if not isinstance(arguments, dict):
        return f"tool call {name!r} has arguments that are not a JSON object"
    return ToolCall(name=name, arguments=arguments)


class ToolCallStream:
    """Incremental `<tool_call>` parser over a streamed reply.

    `feed(piece)` returns the events the new text completes: `str` text deltas and `ToolCall`s,
    in reply order; `close()` returns the rest at the end. Whitespace is held back until more
    text follows, so the newlines Qwen puts around and between calls never reach the text.
    With `thinking=True` (or a reply that opens with `<think>`), the thinking block passes
    through untouched: a call the model only thinks about is not a call.

    After `close()`, `result` holds the `ParsedReply` (its text is the joined deltas).
    """

    def __init__(self, *, thinking: bool = False):
        self._buffer = ""
        self._state = "think" if thinking else "start"
        self._space = ""  # held whitespace
        self._space_before_call = ""
        self._text: list[str] = []
        self.result = ParsedReply("")

    def feed(self, piece: str) -> list[str | ToolCall]:
        self._buffer += piece
        events: list[str | ToolCall] = []
        while self._step(events):
            pass
        return events

    def close(self) -> list[str | ToolCall]:
        events: list[str | ToolCall] = []
        rest, self._buffer = self._buffer, ""
        if self._state == "call":
            self.result.tool_call_errors.append("tool call not closed before the reply ended")
            self._space = self._space_before_call
            self._emit_text(CALL_OPEN + rest, events)
        elif self._state == "think":
            self._emit_raw(rest, events)
        else:
            self._emit_text(rest, events)
        self._state = "closed"
        self.result.text = "".join(self._text)
        return events

    # One transition of the state machine; False when it needs more text.
    def _step(self, events: list) -> bool:
        buf = self._buffer
        if self._state == "start":
            stripped = buf.lstrip()
            if not stripped or THINK_OPEN.startswith(stripped):
                return False  # might still open a thinking block
            self._state = "think" if stripped.startswith(THINK_OPEN) else "text"
            return True
        if self._state == "think":
            end = buf.find(THINK_CLOSE)
            if end < 0:
                keep = _partial_suffix(buf, THINK_CLOSE)
                self._emit_raw(buf[: len(buf) - keep], events)
                self._buffer = buf[len(buf) - keep :]
                return False
            self._emit_raw(buf[: end + len(THINK_CLOSE)], events)
            self._buffer = buf[end + len(THINK_CLOSE) :]
            self._state = "text"
            return True
        if self._state == "text":
            start = buf.find(CALL_OPEN)
            if start < 0:
                keep = _partial_suffix(buf, CALL_OPEN)
                self._emit_text(buf[: len(buf) - keep], events)
                self._buffer = buf[len(buf) - keep :]
                return False
            self._emit_text(buf[:start], events)
            # Whitespace before a call is markup, not text (restored if the call is malformed).
            self._space_before_call, self._space = self._space, ""
            self._buffer = buf[start + len(CALL_OPEN) :]
            self._state = "call"
            return True
        if self._state == "call":
            end = buf.find(CALL_CLOSE)
            if end < 0:
                return False
            body = buf[:end]
            self._buffer = buf[end + len(CALL_CLOSE) :]
            self._state = "text"
            call = parse_call_body(body)
            if isinstance(call, ToolCall):
                self.result.tool_calls.append(call)
                events.append(call)
            else:
                self.result.tool_call_errors.append(call)
                self._space = self._space_before_call
                self._emit_text(CALL_OPEN + body + CALL_CLOSE, events)
            return True
        return False

    def _emit_raw(self, text: str, events: list) -> None:
        if text:
            self._text.append(text)
            events.append(text)

    def _emit_text(self, text: str, events: list) -> None:
        """Emit `text` after any held whitespace; hold its own trailing whitespace."""
        if not text:
            return
        body = text.rstrip()
        if body:
            self._emit_raw(self._space + body, events)
            self._space = ""
        self._space += text[len(body) :]


def parse_tool_calls(text: str, *, thinking: bool = False) -> ParsedReply:
    """Split a complete reply into text and tool calls (see `ToolCallStream`)."""
    parser = ToolCallStream(thinking=thinking)
    parser.feed(text)
    parser.close()
    return parser.result


# --- checking what the caller passes -----------------------------------------------------------


def tool_function(tool: Mapping) -> Mapping:
    """The function part of a tool: `tool["function"]` (OpenAI shape) or the tool itself."""
    inner = tool.get("function")
    return inner if isinstance(inner, Mapping) else tool


def check_tools(tools: Sequence[Mapping] | None) -> list[dict]:
    """Check tool definitions before anything is rendered or generated.

    Accepts OpenAI's shape (`{"type": "function", "function": {"name", "description",
    "parameters"}}`) and the bare function dict; they are rendered as given, as the official
    templates do.

    Raises:
        ValueError: naming the tool index and what is wrong (no name, parameters not an object,
            a name used twice).
    """
    if tools is None:
        return []
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Iterable):
        raise ValueError("tools must be a list of tool definitions (dicts)")
    checked, names = [], set()
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise ValueError(f"tools[{i}] must be a dict, got {type(tool).__name__}")
        function = tool_function(tool)
        name = function.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ValueError(
                f"tools[{i}] has no name: give {{'type': 'function', 'function': "
                f"{{'name': ..., 'parameters': {{...}}}}}}"
            )
        if name in names:
            raise ValueError(f"tools[{i}]: the name {name!r} is used by an earlier tool")
        names.add(name)
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, Mapping):
            raise ValueError(f"tools[{i}] ({name}): parameters must be a JSON schema object")
        checked.append(dict(tool))
    return checked


def check_tool_choice(tool_choice, tools: Sequence[Mapping]) -> str | None:
    """Resolve `tool_choice` to "auto", "none", "required", or a tool name (a forced call).

    Raises:
        ValueError: an unknown value, a named tool that is not in `tools`, or "required"/named
            without tools.
    """
    if isinstance(tool_choice, Mapping):
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, Mapping) else None
        if tool_choice.get("type") != "function" or not isinstance(name, str):
            raise ValueError(
                "tool_choice as a dict must be {'type': 'function', 'function': {'name': ...}}"
            )
        known = [tool_function(t).get("name") for t in tools]
        if name not in known:
            raise ValueError(f"tool_choice names {name!r}, which is not in tools {known}")
        return name
    if tool_choice not in TOOL_CHOICES:
        raise ValueError(
            f"tool_choice must be one of {TOOL_CHOICES} or {{'type': 'function', "
            f"'function': {{'name': ...}}}}, got {tool_choice!r}"
        )
    if tool_choice == "required" and not tools:
        raise ValueError("tool_choice='required' needs at least one tool in tools")
    return tool_choice


def prepare_messages(messages: Sequence[Mapping]) -> list[dict]:
    """Messages ready for the template: assistant `tool_calls` given as `ToolCall`s become dicts,
    and arguments given as a JSON string (OpenAI's wire format) are parsed, so both templates
    print them as the model writes them (Qwen2.5's official template would quote a string)."""
    out = []
    for message in messages:
        message = dict(message) if isinstance(message, Mapping) else message
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        if calls:
            message["tool_calls"] = [_call_dict(call) for call in calls]
        out.append(message)
    return out


def _call_dict(call) -> Any:
    if isinstance(call, ToolCall):
        return call.to_message()
    if not isinstance(call, Mapping):
        return call
    call = dict(call)
    function = call.get("function")
    target = dict(function) if isinstance(function, Mapping) else call
    arguments = target.get("arguments")
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict):
            target["arguments"] = parsed
    if isinstance(function, Mapping):
        call["function"] = target
    return call


class ToolStream:
    """Wraps a chat stream of raw text pieces: yields text deltas and `ToolCall`s.

    Args:
        pieces: the raw reply stream; its `.result` (a GenerationResult) is read at the end.
        thinking: the reply starts inside a thinking block.
        split: `split_thinking`-like function applied to the parsed text at the end.

    After the loop, `result` is the inner result with `text` (answer without calls),
    `thinking`, `tool_calls` and `tool_call_errors` set.
    """

    def __init__(self, pieces, *, thinking: bool, split):
        self._pieces = pieces
        self._split = split
        self._parser = ToolCallStream(thinking=thinking)
        self._events = self._run()
        self.result = None

    def __iter__(self):
        return self

    def __next__(self) -> str | ToolCall:
        return next(self._events)

    def _run(self):
        for piece in self._pieces:
            yield from self._parser.feed(piece)
        yield from self._parser.close()
        result = self._pieces.result
        parsed = self._parser.result
        parts = self._split(parsed.text)
        result.thinking, result.text = parts.thinking, parts.answer
        result.tool_calls = parsed.tool_calls
        result.tool_call_errors = parsed.tool_call_errors
        self.result = result
