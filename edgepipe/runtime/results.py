"""What a generate call returns: per-call metrics, one row's result, and a text stream."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field


@dataclass
class Metrics:
    """Timings and sizes of one generate call (all rows of a batch together).

    Attributes:
        prompt_tokens: prompt tokens fed to the model (a prefix reused from a chat session or
            the generator's prefix cache excluded).
        generated_tokens: tokens generated, all rows.
        time_to_first_token_s: from the start of prefill to the first sampled token.
        prefill_tokens_per_s: prompt_tokens / prefill time.
        decode_tokens_per_s: tokens generated after the first (per row) / decode time.
        total_s: wall time of the call.
        kv_bytes: bytes of KV cache allocated.
        kv_capacity: KV positions per row allocated.
        prefill_calls: model calls that fed the prompt (1 for one prompt or a batch of equal
            lengths fed at once; more for chunks, rows of different lengths, static graphs).
        verify_calls, drafted_tokens, accepted_tokens: speculative decoding's multi-token calls,
            the tokens it drafted and those the model confirmed (0 without speculation).
        prefix_reused_tokens: prompt positions taken from the generator's prefix cache instead
            of prefilled (`Generator(prefix_cache_bytes=)`; 0 on a miss, for batches, or off).
    """

    prompt_tokens: int = 0
    generated_tokens: int = 0
    time_to_first_token_s: float = 0.0
    prefill_tokens_per_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    total_s: float = 0.0
    kv_bytes: int = 0
    kv_capacity: int = 0
    prefill_calls: int = 0
    verify_calls: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    prefix_reused_tokens: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationResult:
    """One row's output.

    Attributes:
        text: generated text (special tokens skipped; cut before a stop string). For `chat()`
            with thinking, the answer only.
        token_ids: generated ids (a stop token that ended generation included).
        finish_reason: "stop" (stop token, or a constraint's text complete), "stop_string", or
            "length" (max_new_tokens or the KV/context limit).
        metrics: timings of the call (shared by the rows of a batch).
        prompt_token_ids: the prompt as fed (after any left truncation).
        thinking: Qwen3 thinking text from `chat()`, None when there was none.
        tool_calls: the calls parsed from a `chat(tools=...)` reply (`tools.ToolCall`).
        tool_call_errors: malformed `<tool_call>` blocks, left in `text`.
    """

    text: str
    token_ids: list[int]
    finish_reason: str
    metrics: Metrics
    prompt_token_ids: list[int] = field(default_factory=list)
    thinking: str | None = None
    tool_calls: list = field(default_factory=list)
    tool_call_errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["metrics"] = self.metrics.to_dict()
        return out


class Stream:
    """Iterator over streamed text pieces; `result` holds the GenerationResult once done.

    Args:
        pieces: the text pieces; when it is a generator, the value it returns becomes `result`.
    """

    def __init__(self, pieces: Iterator[str]):
        self._pieces = pieces
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        try:
            return next(self._pieces)
        except StopIteration as stop:
            if stop.value is not None:
                self.result = stop.value
            raise
