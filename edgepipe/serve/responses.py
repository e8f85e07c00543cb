"""OpenAI response bodies and the streamed chunks, built from a job's emissions.

Streaming follows OpenAI's chat format exactly: every chunk has the same `id`; the first carries
`delta.role`; text goes in `delta.content` (Qwen3 thinking in `delta.reasoning_content`, as
vLLM, llama-server and DeepSeek send it); the choice's last chunk carries `finish_reason`
(with the last text when the final step produced some, else an empty delta, as OpenAI sends);
with `stream_options.include_usage` every chunk has `"usage": null` and one more chunk with
`choices: []` carries the usage; then `data: [DONE]`.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from edgepipe.serve.replies import chat_message
from edgepipe.serve.structured import Structured

# The runtime's "stop_string" is OpenAI's "stop" (a stop sequence was generated); "tool_calls"
# is the server's own, for a reply whose calls were parsed.
FINISH_REASONS = {"stop": "stop", "stop_string": "stop", "length": "length"}
TOOL_CALLS = "tool_calls"


@dataclass
class Outcome:
    """What a request produced, for its response, usage and log line."""

    kind: str  # "chat" | "completion"
    model: str
    prompt_tokens: int
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    cached_tokens: int = 0
    completion_tokens: int = 0
    text: str = ""
    finish_reason: str | None = None

    def __post_init__(self):
        if not self.id:
            prefix = "chatcmpl" if self.kind == "chat" else "cmpl"
            self.id = f"{prefix}-{uuid.uuid4().hex}"

    @property
    def object(self) -> str:
        return "chat.completion" if self.kind == "chat" else "text_completion"

    def usage(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }

    def head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}


def full_response(
    out: Outcome, *, reasoning: bool, started: bool, structured: Structured | None = None
) -> dict:
    """The non-streaming body; `out.finish_reason` becomes "tool_calls" when tools were called."""
    if out.kind == "completion":
        reason = FINISH_REASONS.get(out.finish_reason or "", out.finish_reason)
        choice = {"index": 0, "text": out.text, "logprobs": None, "finish_reason": reason}
        return {**out.head("text_completion"), "choices": [choice], "usage": out.usage()}
    message = chat_message(
        out.text, reasoning=reasoning, started=started, structured=structured or Structured()
    )
    if message.get("tool_calls"):
        out.finish_reason = TOOL_CALLS
    reason = FINISH_REASONS.get(out.finish_reason or "", out.finish_reason)
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": reason}
    return {**out.head("chat.completion"), "choices": [choice], "usage": out.usage()}


class ChunkWriter:
    """Turns emissions into SSE `data:` lines for one streamed response.

    Args:
        out: the outcome being filled.
        usage: whether the stream carries usage (`stream_options.include_usage`).
    """

    def __init__(self, out: Outcome, *, usage: bool):
        self.out, self.with_usage = out, usage
        self.obj = "chat.completion.chunk" if out.kind == "chat" else "text_completion"

    def _chunk(self, choice: dict) -> str:
        body = {**self.out.head(self.obj), "choices": [choice]}
        if self.with_usage:
            body["usage"] = None
        return sse(body)

    def first(self) -> str:
        """The role chunk (chat only; completions have no roles)."""
        if self.out.kind != "chat":
            return ""
        delta = {"role": "assistant", "content": "", "refusal": None}
        return self._chunk({"index": 0, "delta": delta, "logprobs": None, "finish_reason": None})

    def text(self, content: str, reasoning: str = "", finish: str | None = None) -> str:
        """A chunk with new text (and the finish reason on the last one); "" when empty."""
        reason = FINISH_REASONS.get(finish, finish) if finish else None
        if not content and not reasoning and reason is None:
            return ""
        if self.out.kind == "completion":
            choice = {"index": 0, "text": content, "logprobs": None, "finish_reason": reason}
            return self._chunk(choice)
        delta = {}
        if reasoning:
            delta["reasoning_content"] = reasoning
        if content:
            delta["content"] = content
        return self._chunk({"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason})

    def deltas(self, deltas: list[dict], finish: str | None = None) -> str:
        """Chunks for `StreamedReply` deltas, the finish reason on the last; "" when none.

        The finish reason rides on the last text delta, or comes in an empty delta after tool
        calls (as OpenAI sends it).
        """
        if self.out.kind == "completion":
            return self.text("".join(d.get("content", "") for d in deltas), finish=finish)
        reason = FINISH_REASONS.get(finish, finish) if finish else None
        if reason is not None and (not deltas or "tool_calls" in deltas[-1]):
            deltas = [*deltas, {}]
        return "".join(
            self._chunk(
                {
                    "index": 0,
                    "delta": delta,
                    "logprobs": None,
                    "finish_reason": reason if i == len(deltas) - 1 else None,
                }
            )
            for i, delta in enumerate(deltas)
        )

    def end(self) -> str:
        """The usage chunk (when asked for) and `[DONE]`."""
        tail = ""
        if self.with_usage:
            tail = sse({**self.out.head(self.obj), "choices": [], "usage": self.out.usage()})
        return tail + "data: [DONE]\n\n"


def sse(body: dict) -> str:
    """One server-sent event carrying `body` as JSON."""
    return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"
