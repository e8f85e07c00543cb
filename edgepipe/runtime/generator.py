"""The generator: an artifact folder in, tokens, text and metrics out (the public API).

The model calls go through an engine (`edgepipe.runtime.engines`: `DynamicEngine` for the
decoder with contrib ops, `StaticEngine` for static NPU artifacts, whose fixed-shape graphs need
their own cache and padding), so sampling, stop handling, streaming, chat and metrics are the
same code for both graph variants.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from edgepipe.runtime.artifact import Artifact, load_artifact
from edgepipe.runtime.chat import ChatTemplate, split_thinking
from edgepipe.runtime.detokenize import IncrementalDetokenizer, StopStringFilter, TokenBytes
from edgepipe.runtime.engines import CacheStore, Engine, open_engine
from edgepipe.runtime.engines.kv import position_limit
from edgepipe.runtime.errors import ArtifactError, PromptTooLong
from edgepipe.runtime.inputs import check_ids, check_text
from edgepipe.runtime.rows import Row, Thinking
from edgepipe.runtime.sampling import (
    Sampler,
    SamplingParams,
    merge_params,
    params_from_generation_config,
)

TRUNCATE_MODES = ("error", "left")


@dataclass
class Metrics:
    """Timings and sizes of one generate call (all rows of a batch together).

    Attributes:
        prompt_tokens: prompt tokens fed to the model (a chat session's reused prefix excluded).
        generated_tokens: tokens generated, all rows.
        time_to_first_token_s: from the start of prefill to the first sampled token.
        prefill_tokens_per_s: prompt_tokens / prefill time.
        decode_tokens_per_s: tokens generated after the first (per row) / decode time.
        total_s: wall time of the call.
        kv_bytes: bytes of KV cache allocated.
        kv_capacity: KV positions per row allocated.
        prefill_calls: model calls that fed the prompt (1 for one prompt or a batch of equal
            lengths fed at once; more for chunks, rows of different lengths, static graphs).
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

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationResult:
    """One row's output.

    Attributes:
        text: generated text (special tokens skipped; cut before a stop string). For `chat()`
            with thinking, the answer only.
        token_ids: generated ids (a stop token that ended generation included).
        finish_reason: "stop" (stop token), "stop_string", or "length" (max_new_tokens or the
            KV/context limit).
        metrics: timings of the call (shared by the rows of a batch).
        prompt_token_ids: the prompt as fed (after any left truncation).
        thinking: Qwen3 thinking text from `chat()`, None when there was none.
    """

    text: str
    token_ids: list[int]
    finish_reason: str
    metrics: Metrics
    prompt_token_ids: list[int] = field(default_factory=list)
    thinking: str | None = None

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


class Generator:
    """Runs an edgepipe artifact with onnxruntime.

    Args:
        artifact_dir: the artifact (or bare export) folder.
        provider: execution provider; default the artifact's `profile.provider` (CPU for a bare
            export folder).
        verify: check every sha256 in `manifest.json` (default on). Each file is hashed once
            and remembered in the user cache until its size, mtime or inode changes, so only
            the first load of an artifact pays for reading every byte; a corrupt download then
            fails here instead of printing garbage, which is why an app gets it by default.
            A folder without a manifest still loads: `artifact.verification` says it is
            unverifiable (the CLI prints that as a warning).
        verify_checksums: the former name of `verify` (None: use `verify`).
        max_length: cap on KV positions per row (prompt + generated); default the context window.
            Memory is always sized per request; this only bounds it.
        session_options: an `onnxruntime.SessionOptions` to use as is.
        intra_op_num_threads: threads for onnxruntime (ignored when session_options is given).
        session_config: onnxruntime session config entries over `SESSION_CONFIG` (ignored
            when session_options is given), e.g. `{"session.intra_op.allow_spinning": "1"}`.
        provider_options: override the profile's provider options.
        prefill_chunk: feed long prompts this many tokens at a time (None: all at once); bounds
            prefill memory, same tokens. Not used on providers that prefill in one call
            (`edgepipe.runtime.providers.ONE_CALL_PREFILL`: DirectML), nor by static artifacts
            (their prefill graph has a fixed chunk).

    Attributes:
        artifact: the loaded `Artifact`.
        tokenizer: the `tokenizers.Tokenizer`.
        defaults: sampling defaults from the artifact's generation_config.json.
        provider: the execution provider the model runs on.
        continues_prefill: whether a call may append several tokens after cached ones (chunked
            prefill, a chat turn continuing the previous turn's cache).

    Raises:
        ArtifactError: a file is missing, corrupt, or fails its checksum (named in the message).
        ProviderUnavailable: the provider is not installed (the message has the pip package).
        GeneratorError: the artifact's graph variant is not one the runtime runs.
    """

    def __init__(
        self,
        artifact_dir,
        provider: str | None = None,
        *,
        verify: bool = True,
        verify_checksums: bool | None = None,
        max_length: int | None = None,
        session_options=None,
        intra_op_num_threads: int | None = None,
        session_config: Mapping[str, str] | None = None,
        provider_options: Mapping | None = None,
        prefill_chunk: int | None = 512,
    ):
        import tokenizers

        verify = verify if verify_checksums is None else verify_checksums
        if not isinstance(verify, bool):
            raise ValueError(f"verify must be True or False, got {verify!r}")
        self.artifact: Artifact = load_artifact(artifact_dir, verify=verify)
        art = self.artifact
        if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
            raise ValueError(f"max_length must be an int >= 2 or None, got {max_length!r}")
        self.max_length = max_length
        if prefill_chunk is not None and (not isinstance(prefill_chunk, int) or prefill_chunk < 1):
            raise ValueError(f"prefill_chunk must be an int >= 1 or None, got {prefill_chunk!r}")

        try:
            self.tokenizer = tokenizers.Tokenizer.from_file(str(art.tokenizer_path))
        except Exception as exc:  # tokenizers raises a bare Exception for any parse error
            raise ArtifactError(art.tokenizer_path, f"not a tokenizer file ({exc})") from None
        try:
            self._token_bytes = TokenBytes(self.tokenizer)
        except (ValueError, KeyError):
            self._token_bytes = None
        self.defaults: SamplingParams = params_from_generation_config(art.generation_config)
        # No lock: every call owns its KV buffers and IOBinding, and onnxruntime's Run is
        # thread-safe, so concurrent calls (threads, or interleaved streams) do not interfere.
        self._template: ChatTemplate | None = None
        self._engine: Engine = open_engine(
            art,
            provider=provider,
            session_options=session_options,
            intra_op_num_threads=intra_op_num_threads,
            session_config=session_config,
            provider_options=provider_options,
            max_length=max_length,
            prefill_chunk=prefill_chunk,
        )
        self.provider: str = self._engine.provider
        self.continues_prefill: bool = self._engine.continues_prefill

    @property
    def engine(self) -> Engine:
        """The engine running the model (`DynamicEngine` or `StaticEngine`), read-only."""
        return self._engine

    @property
    def prefill_chunk(self) -> int | None:
        """Prompt tokens per prefill call in effect (None: the whole prompt in one call)."""
        return self._engine.prefill_chunk

    @property
    def session(self):
        """The onnxruntime session over the decoder (dynamic artifacts only)."""
        return self._engine.session

    @property
    def kv_dtype(self):
        """numpy dtype of the decoder's KV cache (dynamic artifacts only)."""
        return self._engine.kv_dtype

    # Tokens ------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no special tokens added)."""
        return self.tokenizer.encode(check_text(text), add_special_tokens=False).ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `token_ids`."""
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    @property
    def context_length(self) -> int:
        return self.artifact.context_length

    @property
    def limit(self) -> int:
        """KV positions a row may use: the context window, or `max_length` when smaller."""
        return position_limit(self.context_length, self.max_length)

    # Public generation API -----------------------------------------------------------------------

    def generate(self, prompt, *, truncate: str = "error", **params):
        """Generate from one prompt or a batch.

        Args:
            prompt: text, a list of token ids, or a list of either (a batch).
            truncate: "error" (a prompt that does not fit raises `PromptTooLong`) or "left"
                (drop the oldest tokens).
            **params: `SamplingParams` fields (max_new_tokens, do_sample, temperature, top_k,
                top_p, min_p, repetition_penalty, seed, stop_token_ids, stop_strings); unset
                ones come from the artifact's generation_config.json.

        Returns:
            A `GenerationResult`, or a list of them for a batch.
        """
        batch, single = self._prompts(prompt)
        rows = self._run(batch, params, truncate=truncate)
        return rows[0] if single else rows

    def stream(self, prompt, *, truncate: str = "error", **params) -> Stream:
        """Generate from one prompt, yielding text pieces as they are decoded.

        The pieces never split a multi-byte character and never include a stop string; after
        the loop, `.result` holds the `GenerationResult`.
        """
        batch, single = self._prompts(prompt)
        if not single:
            raise ValueError("stream() takes one prompt; use generate() for batches")
        return self._stream(batch, params, truncate=truncate)

    def render_chat(
        self,
        messages: Sequence[Mapping],
        *,
        enable_thinking: bool | None = None,
        add_generation_prompt: bool = True,
    ) -> str:
        """The prompt text for `messages`, rendered with the artifact's chat template."""
        return self.chat_template.render(
            messages, add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking
        )

    @property
    def chat_template(self) -> ChatTemplate:
        if self._template is None:
            source = self.artifact.chat_template()
            if source is None:
                raise ArtifactError(
                    self.artifact.path / "chat_template.jinja",
                    "missing (and tokenizer_config.json has no chat_template); chat() needs it",
                )
            self._template = ChatTemplate(source)
        return self._template

    def chat(
        self,
        messages: Sequence[Mapping],
        *,
        enable_thinking: bool | None = None,
        thinking_budget: int | None = None,
        truncate: str = "error",
        **params,
    ) -> GenerationResult:
        """Answer a conversation.

        Args:
            messages: `{"role": "system"|"user"|"assistant"|"tool", "content": str}` dicts.
            enable_thinking: Qwen3 thinking on/off (None: the template's default, on).
            thinking_budget: at most this many thinking tokens; then `</think>\\n\\n` is
                inserted and the model answers.
            truncate, **params: as for `generate()`.

        Returns:
            A result whose `text` is the answer and `thinking` the thinking text (or None).
        """
        stream = self.chat_stream(
            messages,
            enable_thinking=enable_thinking,
            thinking_budget=thinking_budget,
            truncate=truncate,
            **params,
        )
        for _ in stream:
            pass
        return stream.result

    def chat_stream(
        self,
        messages: Sequence[Mapping],
        *,
        enable_thinking: bool | None = None,
        thinking_budget: int | None = None,
        truncate: str = "error",
        cache_store: CacheStore | None = None,
        **params,
    ) -> Stream:
        """Like `chat()`, streaming the raw reply (thinking tags included) as it is decoded.

        Args:
            messages, enable_thinking, thinking_budget, truncate, **params: as for `chat()`.
            cache_store: lends its KV cache to the call and keeps the cache afterwards, so the
                next turn prefills only what is new (`ChatSession` passes itself); None: a
                fresh cache.
        """
        prompt = self.render_chat(messages, enable_thinking=enable_thinking)
        ids = self.encode(prompt)
        thinking = self._thinking_plan(prompt, enable_thinking, thinking_budget)
        started = thinking.started if thinking else self._opens_thinking(prompt)
        return self._stream(
            [ids],
            params,
            truncate=truncate,
            thinking=thinking,
            cache_store=cache_store,
            split=lambda text: split_thinking(text, started=started),
        )

    async def agenerate(self, prompt, **kwargs):
        """`generate()` in a worker thread, for apps with an event loop."""
        import asyncio  # here, not at module level: it costs ~40 ms of import time

        return await asyncio.to_thread(self.generate, prompt, **kwargs)

    async def achat(self, messages, **kwargs) -> GenerationResult:
        """`chat()` in a worker thread."""
        import asyncio

        return await asyncio.to_thread(self.chat, messages, **kwargs)

    async def astream(self, prompt, **kwargs) -> AsyncIterator[str]:
        """`stream()` as an async iterator; the blocking decode runs in a worker thread."""
        import asyncio

        stream = self.stream(prompt, **kwargs)
        done = object()
        while True:
            piece = await asyncio.to_thread(next, stream, done)
            if piece is done:
                return
            yield piece

    # Internals -----------------------------------------------------------------------------------

    def _prompts(self, prompt) -> tuple[list[list[int]], bool]:
        if isinstance(prompt, str):
            return [self.encode(prompt)], True
        if isinstance(prompt, np.ndarray):
            prompt = prompt.tolist()
        if not isinstance(prompt, Sequence) or len(prompt) == 0:
            raise ValueError("prompt must be a string, a non-empty list of token ids, or a batch")
        vocab = self.artifact.vocab_size
        if all(isinstance(t, (int, np.integer)) for t in prompt):
            return [check_ids(prompt, vocab)], True
        batch = []
        for i, item in enumerate(prompt):
            if isinstance(item, str):
                batch.append(self.encode(item))
            elif isinstance(item, Sequence) and all(isinstance(t, (int, np.integer)) for t in item):
                batch.append(check_ids(item, vocab, f"prompt[{i}]"))
            else:
                raise ValueError(f"prompt[{i}] must be a string or a list of token ids")
        return batch, False

    def _opens_thinking(self, prompt: str) -> bool:
        """Whether the rendered prompt leaves the model inside an open thinking block."""
        tail = prompt.rsplit("<|im_start|>assistant", 1)[-1]
        return tail.rstrip().endswith("<think>")

    def _thinking_plan(self, prompt: str, enable_thinking, budget) -> Thinking | None:
        if budget is None:
            return None
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
            raise ValueError(f"thinking_budget must be an int >= 0 or None, got {budget!r}")
        if enable_thinking is False:
            return None
        open_id = self.tokenizer.token_to_id("<think>")
        close_id = self.tokenizer.token_to_id("</think>")
        if close_id is None:
            raise ValueError("thinking_budget needs a tokenizer with a </think> token (Qwen3)")
        return Thinking(
            budget=budget,
            started=self._opens_thinking(prompt),
            open_id=open_id,
            close_id=close_id,
            close_ids=self.encode("</think>\n\n"),
        )

    def _stream(self, batch, params, *, truncate, thinking=None, cache_store=None, split=None):
        def pieces() -> Iterator[str]:
            results = yield from self._run_iter(
                batch, params, truncate=truncate, thinking=thinking, cache_store=cache_store
            )
            result = results[0]
            if split is not None:
                parts = split(result.text)
                result.thinking, result.text = parts.thinking, parts.answer
            return result

        return Stream(pieces())

    def _run(self, batch, params, *, truncate, thinking=None, cache_store=None):
        iterator = self._run_iter(
            batch, params, truncate=truncate, thinking=thinking, cache_store=cache_store
        )
        while True:
            try:
                next(iterator)
            except StopIteration as stop:
                return stop.value

    def _fit(self, ids: list[int], max_new: int, truncate: str) -> list[int]:
        limit = self.limit
        if len(ids) == 0:
            raise ValueError("prompt is empty: give at least one token")
        if len(ids) < limit:
            return ids
        if truncate == "left":
            keep = max(1, limit - max_new)
            return ids[-keep:]
        where = "the model's context" if self.limit == self.context_length else "max_length"
        raise PromptTooLong(
            f"prompt has {len(ids)} tokens but {where} allows {limit - 1} plus at least one "
            f"generated token; shorten it, pass truncate='left', or raise max_length"
        )

    def _run_iter(self, batch, params, *, truncate, thinking=None, cache_store=None):
        """Generator: yields text pieces of row 0; returns the list of GenerationResults."""
        if truncate not in TRUNCATE_MODES:
            raise ValueError(f"truncate must be one of {TRUNCATE_MODES}, got {truncate!r}")
        p = merge_params(self.defaults, **params)
        stop_ids = set(
            self.artifact.eos_token_ids if p.stop_token_ids is None else p.stop_token_ids
        )
        batch = [self._fit(list(ids), p.max_new_tokens, truncate) for ids in batch]
        rows = [
            Row(
                prompt=ids,
                detok=IncrementalDetokenizer(self.tokenizer, self._token_bytes),
                stops=StopStringFilter(p.stop_strings),
                thinking=bool(thinking and thinking.started),
            )
            for ids in batch
        ]
        sampler = Sampler(p)
        return (yield from self._decode_loop(rows, p, sampler, stop_ids, thinking, cache_store))

    def _decode_loop(self, rows, p, sampler, stop_ids, thinking, cache_store):
        t_start = time.perf_counter()
        batch = len(rows)
        lengths = np.array([len(r.prompt) for r in rows], dtype=np.int64)
        request = self._engine.begin([r.prompt for r in rows], p.max_new_tokens, cache_store)
        # Every row stops at the cache's capacity: a generated token needs a slot for the next.
        max_steps = min(p.max_new_tokens, request.capacity - int(lengths.max()) + 1)
        logits = request.prefill()
        prompt_tokens = int(lengths.sum()) - request.reuse
        t_first = None
        for step in range(max_steps):
            for i, row in enumerate(rows):
                if row.done:
                    continue
                token = row.next_token(logits[i], sampler, thinking)
                piece = row.accept(token, stop_ids, last=step + 1 == max_steps)
                if i == 0 and piece:
                    yield piece
            if t_first is None:
                t_first = time.perf_counter()
            if all(r.done for r in rows) or step + 1 == max_steps:
                break
            feed = np.array(
                [[r.out[-1] if not r.done else self.artifact.pad_token_id] for r in rows],
                dtype=np.int64,
            )
            lengths = lengths + 1
            logits = request.step(feed, lengths)
        t_end = time.perf_counter()
        if t_first is None:
            t_first = t_end
        if cache_store is not None and batch == 1:
            # The last sampled token was never fed: the cache holds prompt + out[:-1].
            cache_store.keep_cache(request.cache, rows[0].prompt + rows[0].out[:-1])

        generated = sum(len(r.out) for r in rows)
        decode_tokens = generated - sum(1 for r in rows if r.out)
        prefill_s = max(t_first - t_start, 1e-9)
        decode_s = max(t_end - t_first, 1e-9)
        metrics = Metrics(
            prompt_tokens=prompt_tokens,
            generated_tokens=generated,
            time_to_first_token_s=t_first - t_start,
            prefill_tokens_per_s=prompt_tokens / prefill_s,
            decode_tokens_per_s=decode_tokens / decode_s if decode_tokens else 0.0,
            total_s=t_end - t_start,
            kv_bytes=request.nbytes,
            kv_capacity=request.capacity,
            prefill_calls=request.prefill_calls,
        )
        return [
            GenerationResult(
                text="".join(r.pieces),
                token_ids=r.out,
                finish_reason=r.finish_reason,
                metrics=metrics,
                prompt_token_ids=r.prompt,
            )
            for r in rows
        ]
