"""The generator: an artifact folder in, tokens, text and metrics out (the public API).

The model calls go through an engine (`edgepipe.runtime.engines`: `DynamicEngine` for the
decoder with contrib ops, `StaticEngine` for static NPU artifacts, whose fixed-shape graphs need
their own cache and padding), so sampling, stop handling, streaming, chat and metrics are the
same code for both graph variants.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from functools import partial

import numpy as np

from edgepipe.runtime.artifact import Artifact, load_artifact
from edgepipe.runtime.chat import ChatTemplate, opens_thinking, split_thinking
from edgepipe.runtime.constrain import constraint_for
from edgepipe.runtime.detokenize import IncrementalDetokenizer, StopStringFilter, token_bytes_for
from edgepipe.runtime.engines import CacheStore, Engine, open_engine
from edgepipe.runtime.engines.kv import position_limit
from edgepipe.runtime.errors import ArtifactError, PromptTooLong
from edgepipe.runtime.inputs import check_ids, check_text
from edgepipe.runtime.options import DEFAULT_SPINNING, SPIN_KEY, spin_entries, spinning_config
from edgepipe.runtime.prefix import PrefixCache, PrefixLease, PrefixStats, open_prefix_cache
from edgepipe.runtime.providers import CPU_PROVIDER
from edgepipe.runtime.results import GenerationResult, Metrics, Stream
from edgepipe.runtime.rows import Row, thinking_plan
from edgepipe.runtime.sampling import (
    Sampler,
    SamplingParams,
    merge_params,
    params_from_generation_config,
)
from edgepipe.runtime.speculative import NgramDrafter, check_request
from edgepipe.runtime.speculative import decode as speculative_decode
from edgepipe.runtime.spin import SpinWatch, watching
from edgepipe.runtime.tools import ToolStream, check_tool_choice, check_tools, prepare_messages

TRUNCATE_MODES = ("error", "left")


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
        spinning: intra-op thread spinning, "auto" (a bounded spin while the machine has a
            core for every thread), "on" or "off"; None: `DEFAULT_SPINNING` ("auto"). Applied
            under `session_config` (its entries win); ignored when session_options is given.
        prefill_chunk: feed long prompts this many tokens at a time (None: all at once); bounds
            prefill memory, same tokens. Not used on providers that prefill in one call
            (`edgepipe.runtime.providers.ONE_CALL_PREFILL`: DirectML), nor by static artifacts
            (their prefill graph has a fixed chunk).
        prefix_cache_bytes: memory for the KV of earlier calls' prompts and outputs, so a
            prompt that starts like one of them (a shared system prompt or document) prefills
            only the rest (`edgepipe.runtime.prefix`); least recently used first out, 0 turns
            it off. None: `prefix.PREFIX_CACHE_BYTES` (256 MiB) on dynamic artifacts, off on static
            ones (an explicit size there raises `GeneratorError`) and on one-call-prefill
            providers. Entries cost their positions' KV (`2 x layers x kv_heads x head_dim x
            dtype bytes` each: Qwen3-0.6B fp32 224 KiB, Qwen2.5-0.5B 24 KiB); a call that
            filled its cache gives it up without a copy. Batches neither read nor fill it.

    Attributes:
        artifact: the loaded `Artifact`.
        tokenizer: the `tokenizers.Tokenizer`.
        token_bytes: the vocabulary's byte table for streaming text (`detokenize.TokenBytes`;
            None for a tokenizer that is not byte-level), shared with `batch.SlotBatch`.
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
        spinning: str | None = None,
        prefix_cache_bytes: int | None = None,
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
        self.token_bytes = token_bytes_for(self.tokenizer)
        self.defaults: SamplingParams = params_from_generation_config(art.generation_config)
        # No lock: every call owns its KV buffers and IOBinding, and onnxruntime's Run is
        # thread-safe, so concurrent calls (threads, or interleaved streams) do not interfere.
        self._template: ChatTemplate | None = None
        self._spin_watch: SpinWatch | None = None
        if session_options is None:
            mode = spinning or DEFAULT_SPINNING
            spin = spinning_config(mode, intra_op_num_threads)
            if mode == "auto" and SPIN_KEY not in (session_config or {}):
                self._spin_watch = SpinWatch(intra_op_num_threads, spin[SPIN_KEY] == "1")
            session_config = {**spin, **(session_config or {})}
        self._open = partial(
            open_engine,
            art,
            provider=provider,
            session_options=session_options,
            intra_op_num_threads=intra_op_num_threads,
            provider_options=provider_options,
            max_length=max_length,
            prefill_chunk=prefill_chunk,
        )
        self._session_config = session_config
        self._engine: Engine = self._open(session_config=session_config)
        self.provider: str = self._engine.provider
        if self.provider != CPU_PROVIDER:  # re-opening a DirectML / QNN session buys nothing
            self._spin_watch = None
        self.continues_prefill: bool = self._engine.continues_prefill
        self._prefix = open_prefix_cache(
            prefix_cache_bytes, art.graph_variant, continues_prefill=self.continues_prefill
        )

    @property
    def engine(self) -> Engine:
        """The engine running the model (`DynamicEngine` or `StaticEngine`), read-only."""
        return self._engine

    @property
    def prefix_cache(self) -> PrefixCache | None:
        """The cache of earlier calls' prefixes (`nbytes`, `stats`, `clear()`); None when off."""
        return self._prefix

    @property
    def prefix_stats(self) -> PrefixStats | None:
        """Lookups, hits, reused tokens and hit rate of the prefix cache; None when off."""
        return None if self._prefix is None else self._prefix.stats

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
                ones come from the artifact's generation_config.json. Or one constraint
                (`edgepipe.runtime.constrain`, needs `pip install 'edgepipe[constrained]'`):
                `json_schema=` (dict or JSON text), `json_object=True`, `regex=` or
                `choices=[...]`; it is checked before generation starts. Also
                `speculative="ngram"`: prompt-lookup speculative decoding (greedy, one prompt;
                see `edgepipe.runtime.speculative`).

        Returns:
            A `GenerationResult`, or a list of them for a batch.
        """
        batch, single = self._prompts(prompt)
        constraint = constraint_for(params, self.tokenizer, self.artifact)
        rows = self._run(batch, params, truncate=truncate, constraint=constraint)
        return rows[0] if single else rows

    def stream(self, prompt, *, truncate: str = "error", **params) -> Stream:
        """Generate from one prompt, yielding text pieces as they are decoded.

        The pieces never split a multi-byte character and never include a stop string; after
        the loop, `.result` holds the `GenerationResult`.
        """
        batch, single = self._prompts(prompt)
        if not single:
            raise ValueError("stream() takes one prompt; use generate() for batches")
        constraint = constraint_for(params, self.tokenizer, self.artifact)
        return self._stream(batch, params, truncate=truncate, constraint=constraint)

    def render_chat(
        self,
        messages: Sequence[Mapping],
        *,
        enable_thinking: bool | None = None,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping] | None = None,
    ) -> str:
        """The prompt text for `messages` (and `tools`), rendered with the artifact's template."""
        return self.chat_template.render(
            prepare_messages(messages),
            add_generation_prompt=add_generation_prompt,
            enable_thinking=enable_thinking,
            tools=check_tools(tools),
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
        tools: Sequence[Mapping] | None = None,
        tool_choice="auto",
        **params,
    ) -> GenerationResult:
        """Answer a conversation.

        Args:
            messages: `{"role": "system"|"user"|"assistant"|"tool", "content": str}` dicts;
                assistant messages may carry `tool_calls`, `tool` messages are their results.
            enable_thinking: Qwen3 thinking on/off (None: the template's default, on; off when
                the reply is constrained).
            thinking_budget: at most this many thinking tokens; then `</think>\\n\\n` is
                inserted and the model answers.
            tools: function definitions (OpenAI's shape), rendered by the chat template.
            tool_choice: "auto" (calls are parsed into `result.tool_calls`), "none" (tools are
                still rendered, as OpenAI does, but nothing is parsed: the reply is text),
                "required" (the reply is forced to be one or more valid calls) or
                `{"type": "function", "function": {"name": ...}}` (one call of that tool);
                forced calls' arguments satisfy the tool's `parameters` schema.
            truncate, **params: as for `generate()` (constraints included).

        Returns:
            A result whose `text` is the answer, `thinking` the thinking text (or None) and
            `tool_calls` the parsed calls.
        """
        stream = self.chat_stream(
            messages,
            enable_thinking=enable_thinking,
            thinking_budget=thinking_budget,
            truncate=truncate,
            tools=tools,
            tool_choice=tool_choice,
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
        tools: Sequence[Mapping] | None = None,
        tool_choice="auto",
        **params,
    ) -> Stream | ToolStream:
        """Like `chat()`, streaming the raw reply (thinking tags included) as it is decoded.

        With tools (and tool_choice not "none") it yields text deltas and complete
        `tools.ToolCall`s instead, never `<tool_call>` markup.

        Args:
            messages, enable_thinking, thinking_budget, truncate, tools, tool_choice, **params:
                as for `chat()`.
            cache_store: lends its KV cache to the call and keeps the cache afterwards, so the
                next turn prefills only what is new (`ChatSession` passes itself); None: a
                fresh cache.
        """
        tools = check_tools(tools)
        choice = check_tool_choice(tool_choice, tools) if tools else None
        constraint = constraint_for(params, self.tokenizer, self.artifact, tools, choice)
        if constraint is not None and self.chat_template.supports_thinking:
            if enable_thinking:
                raise ValueError("a constrained reply cannot think: pass enable_thinking=False")
            enable_thinking = False
        prompt = self.render_chat(messages, enable_thinking=enable_thinking, tools=tools)
        ids = self.encode(prompt)
        thinking = thinking_plan(self.tokenizer, prompt, enable_thinking, thinking_budget)
        started = thinking.started if thinking else opens_thinking(prompt)

        def split(text: str):
            return split_thinking(text, started=started)

        stream = self._stream(
            [ids],
            params,
            truncate=truncate,
            thinking=thinking,
            cache_store=cache_store,
            split=split,
            constraint=constraint,
        )
        if choice is None or choice == "none":
            return stream
        return ToolStream(stream, thinking=started, split=split)

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

    def _stream(self, batch, params, *, split=None, **options):
        """A `Stream` of row 0; `options` as for `_run_iter`; `split` separates thinking."""

        def pieces() -> Iterator[str]:
            results = yield from self._run_iter(batch, params, **options)
            result = results[0]
            if split is not None:
                parts = split(result.text)
                result.thinking, result.text = parts.thinking, parts.answer
            return result

        return Stream(pieces())

    def _run(self, batch, params, **options):
        iterator = self._run_iter(batch, params, **options)
        while True:
            try:
                next(iterator)
            except StopIteration as stop:
                return stop.value

    @property
    def spin_watch(self) -> SpinWatch | None:
        """What re-decides "auto" spinning between calls (None for an explicit mode)."""
        return self._spin_watch

    def _respin(self) -> None:
        """Re-open the session when "auto" spinning should change (`spin.SpinWatch`). A call
        still running on the old session keeps it until it ends."""
        spin = None if self._spin_watch is None else self._spin_watch.check()
        if spin is not None:
            self._session_config = {**self._session_config, **spin_entries(spin)}
            self._engine = self._open(session_config=self._session_config)

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

    def _run_iter(
        self, batch, params, *, truncate, thinking=None, cache_store=None, constraint=None
    ):
        """Generator: yields text pieces of row 0; returns the list of GenerationResults.

        `constraint`: a factory of per-row `constrain.LogitsConstraint`s, or None.
        """
        if truncate not in TRUNCATE_MODES:
            raise ValueError(f"truncate must be one of {TRUNCATE_MODES}, got {truncate!r}")
        self._respin()
        params = dict(params)
        speculative = params.pop("speculative", None)
        p = merge_params(self.defaults, **params)
        check_request(
            speculative,
            greedy=p.greedy,
            batch=len(batch),
            engine=self._engine,
            constrained=constraint is not None,
        )
        stop_ids = set(
            self.artifact.eos_token_ids if p.stop_token_ids is None else p.stop_token_ids
        )
        batch = [self._fit(list(ids), p.max_new_tokens, truncate) for ids in batch]
        rows = [
            Row(
                prompt=ids,
                detok=IncrementalDetokenizer(self.tokenizer, self.token_bytes),
                stops=StopStringFilter(p.stop_strings),
                thinking=bool(thinking and thinking.started),
                constraint=constraint() if constraint is not None else None,
            )
            for ids in batch
        ]
        sampler = Sampler(p)
        drafter = NgramDrafter(rows[0].prompt) if speculative else None
        lease = None
        if self._prefix is not None and len(rows) == 1:
            lease = PrefixLease(self._prefix, self._engine, p.max_new_tokens, cache_store)
        store = cache_store if lease is None else lease
        loop = self._decode_loop(rows, p, sampler, stop_ids, thinking, store, drafter)
        with watching(self._spin_watch):
            results = yield from loop
        if lease is not None:
            results[0].metrics.prefix_reused_tokens = lease.reused
        return results

    def _plain_steps(self, rows, request, logits, lengths, max_steps, sampler, stop_ids, thinking):
        """The lock-step loop over the rows; yields row 0's pieces, returns t_first."""
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
        return t_first

    def _decode_loop(self, rows, p, sampler, stop_ids, thinking, cache_store, drafter=None):
        t_start = time.perf_counter()
        batch = len(rows)
        lengths = np.array([len(r.prompt) for r in rows], dtype=np.int64)
        request = self._engine.begin([r.prompt for r in rows], p.max_new_tokens, cache_store)
        # Every row stops at the cache's capacity: a generated token needs a slot for the next.
        max_steps = min(p.max_new_tokens, request.capacity - int(lengths.max()) + 1)
        logits = request.prefill()
        prompt_tokens = int(lengths.sum()) - request.reuse
        if drafter is None:
            steps = self._plain_steps(
                rows, request, logits, lengths, max_steps, sampler, stop_ids, thinking
            )
        else:
            steps = speculative_decode(
                rows[0], request, logits[0], sampler=sampler, stop_ids=stop_ids,
                thinking=thinking, max_steps=max_steps, drafter=drafter,
            )  # fmt: skip
        t_first = yield from steps
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
        if drafter is not None:
            stats = drafter.stats
            metrics.verify_calls, metrics.drafted_tokens = stats.verify_calls, stats.drafted
            metrics.accepted_tokens = stats.accepted
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
