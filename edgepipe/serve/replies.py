"""A chat reply's text as OpenAI's message parts: `reasoning_content`, `content`, `tool_calls`.

The model writes one stream of text: Qwen3 thinking (`<think>...</think>`), answer text and
`<tool_call>` blocks. `chat_message` splits a whole reply; `StreamedReply` splits it as it
arrives, into the deltas of streamed chunks. Both parse calls with the runtime's parser
(`tools.ToolCallStream`, which holds back anything that could still become `<tool_call>`, so
markup never reaches `content`), and a block that is not a well-formed call stays in `content`
as written: a small model's broken call is information for the client, never an error.

Calls are sent as OpenAI does: `{"id": "call_...", "type": "function", "function": {"name",
"arguments": "<JSON text>"}}`; a streamed call comes as a first delta with its `index`, `id`,
`type`, `function.name` and empty `arguments`, then one delta with the whole `arguments` (a
call is parsed when its block closes). With `parallel_tool_calls: false` only the first call is
kept, and the caller stops generating once `complete` says the reply is whole.
"""

from __future__ import annotations

from edgepipe.runtime.chat import split_thinking
from edgepipe.runtime.tools import ToolCall, ToolCallStream, parse_tool_calls, tojson
from edgepipe.serve.reasoning import ReasoningSplitter
from edgepipe.serve.structured import Structured


def openai_tool_call(call: ToolCall) -> dict:
    """One entry of `message.tool_calls`, the arguments as JSON text."""
    arguments = tojson(call.arguments)
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": arguments},
    }


def chat_message(text: str, *, reasoning: bool, started: bool, structured: Structured) -> dict:
    """The assistant `message` of a whole reply.

    Args:
        text: the generated text.
        reasoning: split Qwen3 thinking into `reasoning_content`.
        started: the prompt opened the thinking block.
        structured: the request's tool settings (calls are parsed unless there are no tools or
            `tool_choice` is "none").

    Returns:
        `{"role", "content", "refusal"}`, plus `reasoning_content` when the reply thought and
        `tool_calls` when it called tools (`content` is then None unless text came with them).
    """
    calls: list[ToolCall] = []
    if structured.parses_calls:
        parsed = parse_tool_calls(text, thinking=started)
        text = parsed.text
        calls = parsed.tool_calls if structured.parallel else parsed.tool_calls[:1]
    message: dict = {"role": "assistant", "content": text, "refusal": None}
    if reasoning:
        parts = split_thinking(text, started=started)
        message["content"] = parts.answer
        if parts.thinking is not None:
            message["reasoning_content"] = parts.thinking
    if calls:
        message["tool_calls"] = [openai_tool_call(call) for call in calls]
        message["content"] = message["content"] or None
    return message


class StreamedReply:
    """Turns a chat reply's text pieces into the deltas of streamed chunks, in reply order.

    Args:
        started: the prompt opened the thinking block.
        reasoning: split Qwen3 thinking into `reasoning_content`.
        structured: the request's tool settings.
    """

    def __init__(self, *, started: bool, reasoning: bool, structured: Structured):
        self._split = ReasoningSplitter(started=started, enabled=reasoning)
        self._calls = ToolCallStream() if structured.parses_calls else None
        self._parallel = structured.parallel
        self.tool_calls: list[ToolCall] = []

    @property
    def complete(self) -> bool:
        """Whether the reply is whole before the model stopped: its one call (parallel off)."""
        return not self._parallel and bool(self.tool_calls)

    def push(self, piece: str) -> list[dict]:
        """The deltas `piece` completes (text that could still be markup is held back)."""
        reasoning, content = self._split.push(piece)
        return self._route(reasoning, content, final=False)

    def close(self) -> list[dict]:
        """The deltas still held back at the end of the reply."""
        reasoning, content = self._split.flush()
        return self._route(reasoning, content, final=True)

    def _route(self, reasoning: str, content: str, *, final: bool) -> list[dict]:
        if self._calls is None:
            events: list[str | ToolCall] = [content] if content else []
        else:
            events = self._calls.feed(content) if content else []
            if final:
                events += self._calls.close()
        deltas: list[dict] = []
        pending = {"reasoning_content": reasoning} if reasoning else {}
        for event in events:
            if self.complete:
                break  # parallel_tool_calls false: nothing after the first call
            if isinstance(event, str):
                pending["content"] = pending.get("content", "") + event
                continue
            if pending:
                deltas.append(pending)
                pending = {}
            deltas += self._call_deltas(event)
        if pending:
            deltas.append(pending)
        return deltas

    def _call_deltas(self, call: ToolCall) -> list[dict]:
        index = len(self.tool_calls)
        self.tool_calls.append(call)
        entry = openai_tool_call(call)
        head = {"index": index, **entry, "function": {**entry["function"], "arguments": ""}}
        body = {"index": index, "function": {"arguments": entry["function"]["arguments"]}}
        return [{"tool_calls": [head]}, {"tool_calls": [body]}]
