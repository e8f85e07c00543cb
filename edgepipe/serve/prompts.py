"""From a validated request to the row the scheduler runs: prompt ids, sampling, thinking,
constraint.

Chat messages are rendered with the artifact's chat template (`Generator.render_chat`, tools
included; assistant `tool_calls` with OpenAI's JSON-string arguments are parsed for the
template), with `chat_template_kwargs.enable_thinking` passed through for Qwen3. The thinking
budget is the runtime's (`rows.thinking_plan`): once a row has thought that many tokens,
`</think>` is forced and the model answers. A constrained reply (`response_format`, a required
or named `tool_choice`) does not think, as with `Generator.chat` (serve/structured.py).

Speculative decoding (`speculative`, or the server's `--speculative` for requests that do not
say) is exact only for greedy, unconstrained rows on an artifact that can verify drafts
(`runtime.speculative.check_request`). A request that asks for it otherwise gets a 400 saying
what to drop; the server-wide default never fails a request: it applies where it can.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from edgepipe.runtime.chat import opens_thinking
from edgepipe.runtime.errors import GeneratorError, TemplateRefused
from edgepipe.runtime.rows import Thinking, thinking_plan
from edgepipe.runtime.sampling import merge_params
from edgepipe.runtime.speculative import check_request
from edgepipe.serve.errors import bad_request
from edgepipe.serve.schemas import ChatRequest, CompletionRequest, sampling_overrides
from edgepipe.serve.structured import Structured, compile_constraint, structured_request

# OpenAI's default max_tokens for legacy completions; chat has none (the context decides).
COMPLETION_DEFAULT_MAX_TOKENS = 16


@dataclass
class Prepared:
    """A request ready for the scheduler.

    Attributes:
        prompt: prompt token ids.
        params: validated `SamplingParams`.
        thinking: the budget bookkeeping, or None.
        thinking_started: the prompt opened a thinking block.
        reasoning: whether to split `reasoning_content` from `content` (Qwen3 templates).
        structured: the request's tools and response format (empty for completions).
        constraint: the row's constraint factory, or None.
    """

    prompt: list[int]
    params: object
    thinking: Thinking | None
    thinking_started: bool
    reasoning: bool
    structured: Structured = field(default_factory=Structured)
    constraint: Callable | None = None
    speculative: str | None = None


def message_text(message: dict, index: int) -> dict:
    """`message` with its content as one string (OpenAI also allows a list of text parts).

    Raises:
        APIError: 400 for a content part that is not text (images, audio).
    """
    content = message.get("content")
    if content is None:
        # An assistant message that only calls tools has no content; the templates allow that.
        return dict(message) if message.get("tool_calls") else {**message, "content": ""}
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad_request(
                    f"messages[{index}].content: only text parts are supported, got {kind!r}",
                    param=f"messages.{index}.content",
                )
            texts.append(str(part.get("text", "")))
        content = "".join(texts)
    return {**message, "content": content}


def prepare_chat(req: ChatRequest, gen, config, capacity: int) -> Prepared:
    """Render and tokenize a chat request; check and compile its constraint.

    Call off the event loop: the first constraint builds llguidance's vocabulary (seconds).

    Raises:
        APIError: 400 for bad messages, tools, response formats, template refusals, limits
            exceeded; 501 for a constraint without llguidance installed.
    """
    kwargs = req.chat_template_kwargs or {}
    enable = kwargs.get("enable_thinking")
    if enable is not None and not isinstance(enable, bool):
        raise bad_request("chat_template_kwargs.enable_thinking must be a boolean")
    structured = structured_request(req)
    constrained = structured.forced or bool(structured.constraint_params)
    if constrained and gen.chat_template.supports_thinking:
        if enable:
            raise bad_request(
                "A constrained reply (response_format, or tool_choice 'required' or named) "
                "cannot think: send chat_template_kwargs.enable_thinking false",
                param="chat_template_kwargs",
            )
        enable = False
    messages = [message_text(m, i) for i, m in enumerate(req.messages)]
    try:
        text = gen.render_chat(messages, enable_thinking=enable, tools=structured.tools)
    except (TemplateRefused, ValueError) as exc:
        raise bad_request(str(exc), param="messages") from None
    ids = gen.encode(text)
    budget = req.thinking_budget
    if budget is None:
        budget = kwargs.get("thinking_budget")
    try:
        thinking = thinking_plan(gen.tokenizer, text, enable, budget)
    except ValueError as exc:
        raise bad_request(str(exc), param="thinking_budget") from None
    started = thinking.started if thinking else opens_thinking(text)
    requested = req.max_completion_tokens or req.max_tokens
    params = _params(req, gen, ids, requested, config, capacity)
    reasoning = gen.chat_template.supports_thinking or started
    constraint = compile_constraint(structured, gen)  # last: the costliest check
    speculative = speculative_mode(req, params, gen, config, constrained=constraint is not None)
    return Prepared(ids, params, thinking, started, reasoning, structured, constraint, speculative)


def prepare_completion(req: CompletionRequest, gen, config, capacity: int) -> Prepared:
    """Tokenize a completion request's prompt (text or token ids, one prompt).

    Raises:
        APIError: 400 for batches of prompts, empty prompts, limits exceeded.
    """
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise bad_request("Send one prompt per request", param="prompt")
        prompt = prompt[0]
    ids = gen.encode(prompt) if isinstance(prompt, str) else list(prompt)
    vocab = gen.artifact.vocab_size
    if any(not 0 <= t < vocab for t in ids):
        raise bad_request(f"Token ids must be in [0, {vocab})", param="prompt")
    requested = req.max_tokens or COMPLETION_DEFAULT_MAX_TOKENS
    params = _params(req, gen, ids, requested, config, capacity)
    speculative = speculative_mode(req, params, gen, config, constrained=False)
    return Prepared(ids, params, None, False, False, speculative=speculative)


def speculative_mode(req, params, gen, config, *, constrained: bool) -> str | None:
    """The request's speculative mode: its own `speculative`, else the server's default where
    the request allows it.

    Raises:
        APIError: 400 (param `speculative`) when the request asks for it but samples, is
            constrained, or the artifact cannot verify drafts.
    """
    mode = req.speculative or config.speculative
    try:
        check_request(
            mode, greedy=params.greedy, batch=1, engine=gen.engine, constrained=constrained
        )
    except (ValueError, GeneratorError) as exc:
        if req.speculative is None:
            return None  # the server's default: this request decodes without it
        if not params.greedy:
            why = (
                "'speculative' needs greedy decoding: send temperature 0, or drop 'speculative' "
                "to sample"
            )
        elif constrained:
            why = (
                "'speculative' does not combine with a constrained reply (response_format, or "
                "tool_choice 'required' or named): drop 'speculative' or the constraint"
            )
        else:
            why = f"'speculative' is not available with this model: {exc}"
        raise bad_request(why, param="speculative") from None
    return mode


def _params(req, gen, ids: list[int], requested: int | None, config, capacity: int):
    """Check the prompt and max_tokens against the limits; return merged `SamplingParams`."""
    if not ids:
        raise bad_request("The prompt is empty", param="prompt")
    limit = min(config.max_prompt_tokens or capacity - 1, capacity - 1)
    if len(ids) > limit:
        raise bad_request(
            f"The prompt has {len(ids)} tokens; this server accepts at most {limit}",
            param="messages" if isinstance(req, ChatRequest) else "prompt",
            code="context_length_exceeded",
        )
    if requested is not None and requested > config.max_tokens:
        raise bad_request(
            f"max_tokens is {requested}; this server allows at most {config.max_tokens}",
            param="max_tokens",
        )
    room = capacity - len(ids)
    if requested is not None and requested > room:
        raise bad_request(
            f"This server's context holds {capacity} tokens; the prompt has {len(ids)} and "
            f"{requested} were requested. Shorten the prompt or lower max_tokens",
            param="max_tokens",
            code="context_length_exceeded",
        )
    max_tokens = requested or min(config.max_tokens, room)
    try:
        return merge_params(gen.defaults, **sampling_overrides(req, max_tokens))
    except ValueError as exc:
        raise bad_request(str(exc)) from None
