"""Chat prompts: rendering the artifact's chat template and splitting Qwen3 thinking.

The template is rendered with jinja2's `ImmutableSandboxedEnvironment`: a template shipped inside
an artifact is data from wherever the artifact came from, and the sandbox stops it from reaching
Python internals. `raise_exception` is provided as transformers does, so a template's refusal
surfaces as `TemplateRefused` (a `GeneratorError` and a `ValueError`) with its message, and so is
transformers' `tojson` filter (jinja2's own sorts keys and escapes HTML, which would change how
tools and call arguments are rendered).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from edgepipe.runtime.errors import TemplateRefused
from edgepipe.runtime.tools import check_tools, tojson

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

ROLES = ("system", "user", "assistant", "tool")


def _raise(message: str):
    raise TemplateRefused(message)


class ChatTemplate:
    """A compiled chat template.

    Args:
        source: the jinja text (an artifact's `chat_template.jinja`).
    """

    def __init__(self, source: str):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        # Same environment settings as transformers' apply_chat_template, so any template
        # renders here exactly as it does there.
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = _raise
        env.filters["tojson"] = tojson
        self.source = source
        self._template = env.from_string(source)
        # Qwen3 templates know `enable_thinking`; Qwen2.5 ones ignore it.
        self.supports_thinking = "enable_thinking" in source

    def render(
        self,
        messages: Sequence[Mapping],
        *,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        tools: Sequence[Mapping] | None = None,
    ) -> str:
        """Render `messages` (each with `role` and `content`) to the prompt text.

        An assistant message that carries `tool_calls` may have no content (None). `tools`
        (function definitions) are passed to the template when given.

        Raises:
            ValueError: a message without a known role or string content.
            TemplateRefused: the template refused the messages (also a `ValueError`).
        """
        checked = []
        for i, message in enumerate(messages):
            role = message.get("role") if isinstance(message, Mapping) else None
            if role not in ROLES:
                raise ValueError(f"messages[{i}].role must be one of {ROLES}, got {role!r}")
            content = message.get("content")
            calls = message.get("tool_calls")
            if calls is not None and not (
                isinstance(calls, Sequence)
                and not isinstance(calls, str)
                and all(isinstance(c, Mapping) for c in calls)
            ):
                raise ValueError(f"messages[{i}].tool_calls must be a list of call dicts")
            if not isinstance(content, str) and not (content is None and calls):
                raise ValueError(f"messages[{i}].content must be a string")
            checked.append(dict(message))
        variables = {"messages": checked, "add_generation_prompt": add_generation_prompt}
        if tools:
            variables["tools"] = check_tools(tools)
        if enable_thinking is not None:
            variables["enable_thinking"] = enable_thinking
        try:
            return self._template.render(**variables)
        except (TypeError, KeyError, AttributeError) as exc:
            # Data of the right outer shape the template still cannot print (a call without a
            # function name, a non-JSON argument value): refuse it, naming the cause.
            raise TemplateRefused(f"the chat template cannot render these messages: {exc}") from exc


def opens_thinking(prompt: str) -> bool:
    """Whether a rendered prompt leaves the model inside an open thinking block (a Qwen3
    template that ends its generation prompt with `<think>`)."""
    tail = prompt.rsplit("<|im_start|>assistant", 1)[-1]
    return tail.rstrip().endswith(THINK_OPEN)


@dataclass(frozen=True)
class ThinkingSplit:
    """An assistant reply split into its thinking and its answer."""

    thinking: str | None
    answer: str


def split_thinking(text: str, *, started: bool = False) -> ThinkingSplit:
    """Separate `<think>...</think>` from the answer of a generated reply.

    Args:
        text: the generated text (special tokens skipped; `<think>` is not special in Qwen3).
        started: the prompt already opened the thinking block (the model starts inside it).

    Returns:
        `thinking` None when the reply has no thinking block; an unclosed block (generation ran
        out of tokens while thinking) is all thinking and an empty answer.
    """
    body = text
    stripped = body.lstrip()
    if stripped.startswith(THINK_OPEN):
        body = stripped[len(THINK_OPEN) :]
        started = True
    if not started:
        return ThinkingSplit(None, text)
    if THINK_CLOSE not in body:
        return ThinkingSplit(body.strip("\n"), "")
    thinking, answer = body.split(THINK_CLOSE, 1)
    return ThinkingSplit(thinking.strip("\n"), answer.lstrip("\n"))
