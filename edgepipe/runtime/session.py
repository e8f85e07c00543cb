"""A multi-turn chat that keeps its KV cache between turns.

Each turn re-renders the whole conversation with the chat template and tokenizes it. The cache
holds the ids of the previous turn's prompt and reply (minus the last sampled token, which was
never fed); the new prompt usually starts with most of them, so only the ids after the longest
common prefix are prefilled. Stale positions past that prefix are simply overwritten: the
attention mask (`seqlens_k`) decides which positions count. Re-tokenized text can differ from
the generated ids, and Qwen3's template drops old thinking, so the prefix is computed, not
assumed.
"""

from __future__ import annotations

from collections.abc import Iterator

from edgepipe.runtime.generator import Generator
from edgepipe.runtime.results import GenerationResult, Stream


class ChatSession:
    """A conversation with history, reusing the KV cache across turns.

    Args:
        generator: the `Generator` to run.
        system: an optional system prompt.
        enable_thinking: Qwen3 thinking on/off for every turn (None: template default).
        thinking_budget: thinking tokens per turn at most (None: unlimited).
        **params: generation parameters for every turn (see `Generator.generate`).
    """

    def __init__(
        self,
        generator: Generator,
        *,
        system: str | None = None,
        enable_thinking: bool | None = None,
        thinking_budget: int | None = None,
        **params,
    ):
        self.generator = generator
        self.system = system
        self.enable_thinking = enable_thinking
        self.thinking_budget = thinking_budget
        self.params = params
        self.messages: list[dict] = []
        # The engine's cache (a KVCache, or a StaticCache on static artifacts); opaque here.
        self._cache: object | None = None
        self._cached_ids: list[int] = []
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (keeps the system prompt) and free the cache."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self._cache, self._cached_ids = None, []

    def send(self, text: str, **params) -> GenerationResult:
        """Add a user turn and return the assistant's reply (also appended to `messages`)."""
        stream = self.send_stream(text, **params)
        for _ in stream:
            pass
        return stream.result

    def send_stream(self, text: str, **params) -> Stream:
        """Like `send()`, streaming the raw reply text; `.result` is set at the end."""
        self.messages.append({"role": "user", "content": text})
        inner = self.generator.chat_stream(
            self.messages,
            enable_thinking=self.enable_thinking,
            thinking_budget=self.thinking_budget,
            cache_store=self,
            **{**self.params, **params},
        )

        def pieces() -> Iterator[str]:
            try:
                yield from inner
            except BaseException:
                self.messages.pop()  # the turn failed: keep history consistent
                raise
            self.messages.append({"role": "assistant", "content": inner.result.text})
            return inner.result  # becomes the returned stream's `result`

        return Stream(pieces())

    def drop_oldest_turn(self) -> bool:
        """Forget the oldest user turn and its replies (the system prompt stays).

        What a chat does when its history outgrows the context (`edgepipe chat` calls it on
        `PromptTooLong`); the cache keeps whatever prefix still matches.

        Returns:
            False when there was no earlier turn to drop.
        """
        first = 1 if self.messages and self.messages[0]["role"] == "system" else 0
        users = [i for i, m in enumerate(self.messages) if i >= first and m["role"] == "user"]
        if not users:
            return False
        end = users[1] if len(users) > 1 else len(self.messages)
        del self.messages[first:end]
        return True

    @property
    def cached_tokens(self) -> int:
        """Token positions the cache holds from earlier turns."""
        return len(self._cached_ids)

    def take_cache(self, prompt_ids: list[int]) -> tuple[object | None, int]:
        """(cache, reusable prefix length) for a new prompt; (None, 0) when nothing is reusable."""
        if self._cache is None:
            return None, 0
        common = 0
        for a, b in zip(self._cached_ids, prompt_ids, strict=False):
            if a != b:
                break
            common += 1
        # At least one prompt token must be fed to get logits for the next one.
        reuse = min(common, len(prompt_ids) - 1)
        if reuse <= 0:
            return None, 0
        # Positions from `reuse` on are about to be overwritten: forget them now, so a turn that
        # fails half-way cannot leave ids that no longer match the cache.
        del self._cached_ids[reuse:]
        return self._cache, reuse

    def keep_cache(self, cache: object, ids: list[int]) -> None:
        """Remember the cache and the ids whose keys and values it holds."""
        self._cache, self._cached_ids = cache, list(ids)
