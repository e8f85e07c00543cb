"""Request bodies of the OpenAI endpoints, validated with pydantic, and their sampling fields.

Fields OpenAI defines that edgepipe does not implement are declared anyway, so that a request
using them gets a clear 400 naming the field instead of being silently ignored: `n` other than
1, `logprobs`, `logit_bias`, `presence_penalty`/`frequency_penalty` other than 0 (use Qwen's
`repetition_penalty`). Fields nobody defines are ignored, as llama-server and vLLM do.

edgepipe's own fields: `top_k`, `min_p`, `repetition_penalty` (Qwen's recommended settings),
`thinking_budget` (chat) and `speculative` ("ngram": prompt-lookup speculative decoding of a
greedy request, checked in serve/prompts.py; null or absent: the server's `--speculative`).

`tools`, `tool_choice`, `parallel_tool_calls` and `response_format` (json_object, json_schema)
are served; their contents are checked by serve/structured.py, which also refuses the legacy
`functions` / `function_call` (send `tools` / `tool_choice`) and `response_format` together
with callable tools.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgepipe.serve.errors import bad_request, unsupported


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Common(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="ignore")

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # Qwen's recommended settings use these; llama-server and vLLM accept them too.
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    # edgepipe's: prompt-lookup speculative decoding of a greedy request (docs/serve.md).
    speculative: Literal["ngram"] | None = None


class ChatRequest(_Common):
    """`POST /v1/chat/completions`."""

    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # Qwen3 thinking tokens per request at most (then </think> is forced); edgepipe's name,
    # also read from chat_template_kwargs.thinking_budget.
    thinking_budget: int | None = Field(default=None, ge=0)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Common):
    """`POST /v1/completions`."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None


def parse(model: type[BaseModel], body: Any) -> BaseModel:
    """Validate `body` against `model`.

    Raises:
        APIError: 400 naming the first invalid field.
    """
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise bad_request(f"Invalid value for '{where}': {first['msg']}", param=where) from None


def refuse_unsupported(req: _Common) -> None:
    """Raise a 400 for any OpenAI field set to something the server does not implement.

    Raises:
        APIError: 400 naming the field and, where there is one, the alternative.
    """
    if req.stream_options is not None and not req.stream:
        raise bad_request(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled",
            param="stream_options",
        )
    if req.n not in (None, 1):
        raise unsupported("n", "Only n=1 is supported: send one request per completion")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name) not in (None, 0, 0.0):
            raise unsupported(
                name,
                f"'{name}' is not supported; use 'repetition_penalty' (Qwen's recommended "
                "penalty, e.g. 1.05) instead",
            )
    if req.logit_bias:
        raise unsupported("logit_bias")
    if isinstance(req, ChatRequest) and (req.logprobs or req.top_logprobs):
        raise unsupported("logprobs")
    if isinstance(req, CompletionRequest):
        if req.echo:
            raise unsupported("echo")
        if req.suffix:
            raise unsupported("suffix")
        if req.best_of not in (None, 1):
            raise unsupported("best_of", "Only best_of=1 is supported")
        if req.logprobs is not None:
            raise unsupported("logprobs")


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    """OpenAI's `stop` (a string or up to 4 strings) as a tuple.

    Raises:
        APIError: 400 for more than 4 or empty strings.
    """
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else list(stop)
    if len(items) > 4 or not all(items):
        raise bad_request("'stop' takes up to 4 non-empty strings", param="stop")
    return tuple(items)


def sampling_overrides(req: _Common, max_tokens: int) -> dict:
    """`SamplingParams` overrides for `req` (None keeps the artifact's generation defaults).

    OpenAI's `temperature: 0` is greedy; any other temperature samples. Without a temperature
    the artifact's `generation_config.json` decides, as with `Generator`.
    """
    overrides = {
        "max_new_tokens": max_tokens,
        "top_p": req.top_p,
        "top_k": None if req.top_k is None else max(req.top_k, 0),  # -1 = off (vLLM)
        "min_p": req.min_p,
        "repetition_penalty": req.repetition_penalty,
        # OpenAI takes any 64-bit seed; numpy's generator wants one >= 0.
        "seed": None if req.seed is None else req.seed % 2**64,
        "stop_strings": stop_strings(req.stop),
    }
    if req.temperature is not None:
        overrides["do_sample"] = req.temperature > 0
        if req.temperature > 0:
            overrides["temperature"] = req.temperature
    return overrides


def include_usage(req: _Common) -> bool:
    """Whether a stream ends with a usage chunk."""
    return bool(req.stream and req.stream_options and req.stream_options.include_usage)


Kind = Literal["chat", "completion"]
