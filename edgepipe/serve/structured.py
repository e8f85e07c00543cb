"""Tool calling and structured output of a chat request: OpenAI's fields to the runtime's.

`tools`, `tool_choice`, `parallel_tool_calls` and `response_format` are checked here, before
anything is rendered or generated, and turned into what the runtime takes: the tool list the
chat template renders, the resolved choice (`tools.check_tool_choice`), and the keywords of one
constraint (`constrain.constraint_for`: `json_schema=` or `json_object=True`; a required or
named `tool_choice` is a forced `<tool_call>` grammar). Compiling the constraint is the last
check: a schema llguidance cannot use is a 400 naming `response_format` (or `tools`, for a
tool's `parameters`), and a server without llguidance answers 501 naming the extra to install.

Decisions where OpenAI leaves room:
* `parallel_tool_calls: false` truncates: the reply ends at its first complete call (the
  handler stops the row there, nothing more is generated). A forced call's grammar allows the
  same first call either way, so nothing is lost by not constraining it to one.
* The legacy `functions` / `function_call` are refused with a 400 that says which `tools` /
  `tool_choice` to send instead: their reply shape (`message.function_call`, finish reason
  `function_call`) is a second protocol to keep right for clients that no longer send it.
* `response_format` together with callable tools (`tool_choice` "auto", "required" or named)
  is refused: the runtime constrains a reply to one grammar, either JSON or calls. With
  `tool_choice: "none"` the tools are rendered and the reply is constrained JSON.
* `strict` is accepted either way: a constrained reply always follows its schema.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from edgepipe.runtime.constrain import constraint_for
from edgepipe.runtime.errors import ConstraintUnavailable, InvalidConstraint
from edgepipe.runtime.tools import check_tool_choice, check_tools
from edgepipe.serve.errors import APIError, bad_request, unsupported
from edgepipe.serve.schemas import ChatRequest

# OpenAI's rule for a response_format schema name.
SCHEMA_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
RESPONSE_FORMATS = ("text", "json_object", "json_schema")


@dataclass(frozen=True)
class Structured:
    """What a chat request asks beyond free text.

    Attributes:
        tools: the checked tool definitions the template renders ([] without tools).
        choice: None (no tools), "auto", "none", "required" or the name of a forced tool.
        parallel: whether a reply may hold several calls (`parallel_tool_calls`).
        constraint_params: `json_schema=` / `json_object=` for `constraint_for` ({}: none).
    """

    tools: list[dict] = field(default_factory=list)
    choice: str | None = None
    parallel: bool = True
    constraint_params: dict = field(default_factory=dict)

    @property
    def parses_calls(self) -> bool:
        """Whether `<tool_call>` blocks in the reply become `tool_calls`."""
        return self.choice not in (None, "none")

    @property
    def forced(self) -> bool:
        """Whether the reply must be tool calls (a required or named `tool_choice`)."""
        return self.choice not in (None, "none", "auto")


def structured_request(req: ChatRequest) -> Structured:
    """Check a chat request's tool and response-format fields.

    Raises:
        APIError: 400 naming the field for anything malformed or not served.
    """
    refuse_legacy_functions(req)
    tools = check_openai_tools(req.tools)
    choice = None
    if tools or req.tool_choice not in (None, "none", "auto"):
        asked = "auto" if req.tool_choice is None else req.tool_choice
        try:
            choice = check_tool_choice(asked, tools)
        except ValueError as exc:
            raise bad_request(f"Invalid 'tool_choice': {exc}", param="tool_choice") from None
    params = response_format_params(req.response_format)
    if params and choice not in (None, "none"):
        raise unsupported(
            "response_format",
            "'response_format' cannot be combined with callable tools yet (the reply is "
            "constrained to JSON or to tool calls, not either): send tool_choice 'none' to "
            "keep the tools in the prompt, or leave response_format out",
        )
    parallel = req.parallel_tool_calls is not False
    return Structured(tools=tools, choice=choice, parallel=parallel, constraint_params=params)


def refuse_legacy_functions(req: ChatRequest) -> None:
    """400 for OpenAI's deprecated `functions` / `function_call` (see the module docstring)."""
    if req.functions:
        raise unsupported(
            "functions",
            "'functions' is deprecated and not served: send 'tools': [{\"type\": \"function\", "
            '"function": <each function>}] instead',
        )
    if req.function_call not in (None, "none", "auto"):
        raise unsupported(
            "function_call",
            "'function_call' is deprecated and not served: send 'tool_choice': {\"type\": "
            '"function", "function": {"name": ...}} (or "required") with \'tools\' instead',
        )


def check_openai_tools(tools) -> list[dict]:
    """OpenAI's `tools`: each `{"type": "function", "function": {"name", ...}}`.

    Raises:
        APIError: 400 naming the tool and what is wrong.
    """
    if not tools:
        return []
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function" or not isinstance(tool.get("function"), dict):
            raise bad_request(
                f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., "
                f"'parameters': {{...}}}}}}; got type {kind!r}",
                param=f"tools.{i}",
            )
    try:
        return check_tools(tools)
    except ValueError as exc:
        raise bad_request(f"Invalid 'tools': {exc}", param="tools") from None


def response_format_params(response_format) -> dict:
    """The constraint keywords of `response_format` ({} for none or `{"type": "text"}`).

    Raises:
        APIError: 400 for an unknown type or a `json_schema` without a proper name or schema.
    """
    if response_format is None:
        return {}
    kind = response_format.get("type")
    if kind not in RESPONSE_FORMATS:
        raise bad_request(
            f"Invalid 'response_format.type': {kind!r}; expected one of {RESPONSE_FORMATS}",
            param="response_format.type",
        )
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"json_object": True}
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise bad_request(
            "response_format of type 'json_schema' needs 'json_schema': {'name': ..., "
            "'schema': {...}}",
            param="response_format.json_schema",
        )
    name = spec.get("name")
    if not isinstance(name, str) or not SCHEMA_NAME.fullmatch(name):
        raise bad_request(
            "response_format.json_schema.name must be 1-64 letters, digits, '_' or '-'",
            param="response_format.json_schema.name",
        )
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise bad_request(
            "response_format.json_schema.schema must be a JSON schema object",
            param="response_format.json_schema.schema",
        )
    return {"json_schema": schema}


def compile_constraint(structured: Structured, gen) -> Callable | None:
    """The per-row constraint factory of the request (None when free), checked and compiled.

    Compiling a new schema takes milliseconds; the first constraint of a tokenizer also builds
    llguidance's view of the vocabulary (~2 s for Qwen's, once per process): callers run this
    off the event loop.

    Raises:
        APIError: 400 naming `response_format` (or `tools`) for a schema llguidance refuses;
            501 when llguidance is not installed.
    """
    param = "response_format" if structured.constraint_params else "tools"
    try:
        return constraint_for(
            dict(structured.constraint_params),
            gen.tokenizer,
            gen.artifact,
            structured.tools,
            structured.choice,
        )
    except InvalidConstraint as exc:
        raise bad_request(f"Invalid '{param}': {exc}", param=param) from None
    except ConstraintUnavailable as exc:
        field_name = param if structured.constraint_params else "tool_choice"
        raise APIError(
            501,
            f"This server cannot honour '{field_name}': {exc}",
            type="server_error",
            param=field_name,
            code="constrained_decoding_unavailable",
        ) from None
