"""The dynamic engine: one onnxruntime session over the decoder with contrib ops, via IOBinding.

The KV cache (`kv.py`) is one buffer per layer bound as both past and present, sized for the
request. Batches use *right* padding: onnxruntime's CPU `GroupQueryAttention` takes each row's
length from `seqlens_k` (= attention_mask sum - 1) and places row b's tokens at positions
0..len_b-1, with rotary positions counted from 0; it does not skip leading pads, so left padding
shifts the short rows' positions and attention (measured: left-padded rows differ from the same
prompt alone, right-padded rows match it bit for bit). Prompts of different lengths are
prefilled row by row, each into its own row of the batch buffer (the graph returns only the last
position's logits, which a right-padded row would not have); decoding then runs the whole batch
in one call per token.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from edgepipe.runtime.dtypes import ORT_NUMPY_DTYPES
from edgepipe.runtime.engines.kv import KVCache, plan_capacity, position_limit
from edgepipe.runtime.errors import ArtifactError, ProviderUnavailable
from edgepipe.runtime.options import QUIET
from edgepipe.runtime.options import session_options as new_session_options
from edgepipe.runtime.providers import CPU_PROVIDER, ONE_CALL_PREFILL, install_package

# The decoder input that says how many trailing positions get logits (an overridable
# initializer holding 1; docs/contracts.md, edgepipe.stages.export.layers.logits).
LOGITS_TO_KEEP = "logits_to_keep"


class DynamicEngine:
    """Runs requests on a dynamic artifact's decoder (see `edgepipe.runtime.engines.Engine`).

    Args:
        artifact: the loaded artifact.
        session: an onnxruntime session over `artifact.model_path`.
        provider: the provider the session runs on.
        max_length: cap on KV positions per row, or None (the context window).
        prefill_chunk: feed long prompts this many tokens at a time (None: all at once).

    Attributes:
        session: the onnxruntime session.
        provider: the provider the session runs on.
        kv_dtype: numpy dtype of the decoder's KV inputs (float32 or float16).
        continues_prefill: whether a call may append several tokens after cached ones (chunked
            prefill, a chat turn continuing the previous turn's cache); False on
            `ONE_CALL_PREFILL` providers.
        prefill_chunk: the chunk in effect (None on providers that prefill in one call).
        limit: KV positions a row may use.
        keeps_logits: the decoder has the overridable `logits_to_keep` input (fed on every call).
        verifies: a call can return the logits of all its new positions (speculative verify).

    Raises:
        ArtifactError: the decoder lacks the inputs the artifact's genai config names.
    """

    def __init__(
        self,
        artifact,
        session,
        provider: str,
        *,
        max_length: int | None = None,
        prefill_chunk: int | None = None,
    ):
        self.artifact, self.session, self.provider = artifact, session, provider
        self.max_length = max_length
        self.limit = position_limit(artifact.context_length, max_length)
        self.continues_prefill = provider not in ONE_CALL_PREFILL
        self.prefill_chunk = prefill_chunk if self.continues_prefill else None
        names, outs = artifact.input_names, artifact.output_names
        self.input_ids_name = names.get("input_ids", "input_ids")
        self.mask_name = names.get("attention_mask", "attention_mask")
        self.position_ids_name = names.get("position_ids", "position_ids")
        self.logits_name = outs.get("logits", "logits")
        past_k = names.get("past_key_names", "past_key_values.%d.key")
        past_v = names.get("past_value_names", "past_key_values.%d.value")
        pres_k = outs.get("present_key_names", "present.%d.key")
        pres_v = outs.get("present_value_names", "present.%d.value")
        layers = range(artifact.num_layers)
        # (past key, past value, present key, present value) input/output names per layer.
        self.kv_names = [(past_k % i, past_v % i, pres_k % i, pres_v % i) for i in layers]
        inputs = {i.name: i for i in session.get_inputs()}
        wanted = (self.input_ids_name, self.mask_name, self.kv_names[0][0])
        missing = [n for n in wanted if n not in inputs]
        if missing:
            raise ArtifactError(artifact.model_path, f"decoder has no input(s) {missing}")
        self.uses_position_ids = self.position_ids_name in inputs
        # A verify step needs the logits of all its new positions: a decoder with the
        # overridable `logits_to_keep` input returns the last N when fed N, one exported with
        # all_logits returns every position; an older shipped decoder returns only the last
        # (docs/contracts.md; see edgepipe.runtime.speculative).
        overridable = {i.name for i in session.get_overridable_initializers()}
        self.keeps_logits = LOGITS_TO_KEEP in overridable
        logits_dims = {o.name: o.shape for o in session.get_outputs()}.get(self.logits_name)
        all_positions = bool(logits_dims) and logits_dims[1] != 1
        self.verifies = self.keeps_logits or all_positions
        self._keep: dict[int, object] = {}  # logits_to_keep value -> its OrtValue, made once
        self.kv_dtype = ORT_NUMPY_DTYPES.get(inputs[self.kv_names[0][0]].type, np.float32)

    @classmethod
    def open(
        cls,
        artifact,
        *,
        provider: str | None = None,
        session_options=None,
        intra_op_num_threads: int | None = None,
        session_config: Mapping[str, str] | None = None,
        provider_options: Mapping | None = None,
        max_length: int | None = None,
        prefill_chunk: int | None = None,
    ) -> DynamicEngine:
        """A session over the artifact's decoder on `provider` (default the artifact's), with CPU
        as fallback for nodes the provider does not take.

        Raises:
            ProviderUnavailable: the provider is not installed (the message has the pip package).
            ArtifactError: the decoder does not load or lacks the expected inputs.
        """
        import onnxruntime as ort

        used = provider or artifact.provider
        available = ort.get_available_providers()
        if used not in available:
            # The manifest's profile.package names the build's package for its own provider.
            package = artifact.package if provider is None else install_package(used)
            package = package or install_package(used) or "the onnxruntime build"
            raise ProviderUnavailable(
                f"execution provider {used} is not available in this onnxruntime "
                f"(available: {available}); install it with: pip install {package}"
            )
        if session_options is None:
            # onnxruntime warns on every load of a graph with an overridable initializer
            # ("Initializer logits_to_keep appears in graph inputs ... Move it out of graph
            # inputs"): advice that does not apply here, so such decoders load quietly.
            quiet = QUIET if LOGITS_TO_KEEP in artifact.overridable_inputs else None
            session_options = new_session_options(
                intra_op_num_threads, session_config, log_severity_level=quiet
            )
        options = dict(artifact.provider_options if provider_options is None else provider_options)
        providers = [(used, options)]
        if used != CPU_PROVIDER:
            providers.append((CPU_PROVIDER, {}))
        try:
            session = ort.InferenceSession(
                str(artifact.model_path), sess_options=session_options, providers=providers
            )
        except Exception as exc:  # onnxruntime raises several unrelated types for bad files
            raise ArtifactError(
                artifact.model_path, f"onnxruntime could not load it: {exc}"
            ) from exc
        return cls(artifact, session, used, max_length=max_length, prefill_chunk=prefill_chunk)

    def begin(self, prompts: list[list[int]], max_new_tokens: int, cache_store) -> DynamicRequest:
        """A request for `prompts`: its KV cache, from `cache_store` when it has a reusable one."""
        return DynamicRequest(self, prompts, max_new_tokens, cache_store)

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        """A zeroed KV cache of the decoder's geometry and dtype."""
        art = self.artifact
        return KVCache(
            art.num_layers,
            art.num_kv_heads,
            art.head_dim,
            batch=batch,
            capacity=capacity,
            dtype=self.kv_dtype,
        )

    def bind(self, kv):
        """An IOBinding with the KV buffers bound as past and present, reused across steps.

        The buffers do not change between the steps of a request, so only input_ids, the mask
        and the logits are rebound each step. Measured with a 28-layer, hidden-128 int4 model
        (Python overhead dominates), 1 thread, 10 alternating rounds of 256 tokens: 2.02 vs
        2.40 ms per decoded token with a new binding per step, i.e. ~0.4 ms (2-3%) per token at
        the Qwen3-0.6B shape's 28 layers.

        Args:
            kv: (key OrtValues, value OrtValues), as `KVCache.ortvalues()` returns.
        """
        io = self.session.io_binding()
        # Logits first: get_outputs() lists outputs in the order of their first binding, and
        # rebinding a name keeps its place, so the logits stay at index 0.
        io.bind_output(self.logits_name)
        keys, values = kv
        for (past_k, past_v, pres_k, pres_v), k, v in zip(self.kv_names, keys, values, strict=True):
            io.bind_ortvalue_input(past_k, k)
            io.bind_ortvalue_input(past_v, v)
            io.bind_ortvalue_output(pres_k, k)
            io.bind_ortvalue_output(pres_v, v)
        return io

    def run(self, input_ids: np.ndarray, lengths: np.ndarray, kv, binding=None) -> np.ndarray:
        """One decoder call; returns last-position logits [batch, vocab] as float32.

        Args:
            input_ids: [batch, new tokens] ids fed after the cached positions.
            lengths: per row, the positions that count after this call (cached + new).
            kv: (key OrtValues, value OrtValues) bound as past and present.
            binding: a `bind(kv)` binding to reuse (made here when None).
        """
        io = self.bind(kv) if binding is None else binding
        logits = self._call(input_ids, lengths, io, keep=1)
        return np.asarray(logits[:, -1, :], dtype=np.float32)

    def verify(self, input_ids: np.ndarray, lengths: np.ndarray, binding) -> np.ndarray:
        """A call that returns the logits of every fed position, [batch, new, vocab] float32
        (decoders that `verifies`)."""
        new = input_ids.shape[1]
        logits = self._call(input_ids, lengths, binding, keep=new)
        return np.asarray(logits[:, -new:, :], dtype=np.float32)

    def _call(self, input_ids, lengths, io, keep: int) -> np.ndarray:
        """Run the bound decoder; logits [batch, rows, vocab] (rows: 1, `keep` or all fed)."""
        if self.keeps_logits:
            # Bound on every call: the binding is reused across steps, so a verify step's
            # count would otherwise stay bound for the next plain step.
            io.bind_ortvalue_input(LOGITS_TO_KEEP, self._keep_value(keep))
        width = int(lengths.max())
        mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
        io.bind_cpu_input(self.input_ids_name, np.ascontiguousarray(input_ids))
        io.bind_cpu_input(self.mask_name, mask)
        if self.uses_position_ids:
            seq = input_ids.shape[1]
            positions = lengths[:, None] - seq + np.arange(seq)[None, :]
            io.bind_cpu_input(self.position_ids_name, np.maximum(positions, 0).astype(np.int64))
        io.bind_output(self.logits_name)  # a fresh buffer: the previous step's logits stay valid
        self.session.run_with_iobinding(io)
        logits = io.get_outputs()[0].numpy()
        # A logits_to_keep decoder returns [batch * kept, 1, vocab] (batch-major; see
        # edgepipe.stages.export.layers.logits): back to [batch, kept, vocab].
        return logits.reshape(input_ids.shape[0], -1, logits.shape[-1])

    def _keep_value(self, keep: int):
        """The int64 OrtValue of `keep` (made once per value: drafts are at most a few long)."""
        value = self._keep.get(keep)
        if value is None:
            import onnxruntime as ort

            value = ort.OrtValue.ortvalue_from_numpy(np.array(keep, dtype=np.int64))
            self._keep[keep] = value
        return value


class DynamicRequest:
    """One generate call's KV cache and model calls (see `edgepipe.runtime.engines.Request`).

    The cache is sized for the request, or taken from `cache_store` (a chat session) and grown
    when its reusable prefix can be continued.
    """

    def __init__(self, engine: DynamicEngine, prompts, max_new_tokens: int, cache_store):
        self.engine, self.prompts = engine, prompts
        lengths = [len(ids) for ids in prompts]
        limit = engine.limit
        needed = max(lengths) + max_new_tokens
        self.reuse = 0
        self.prefill_calls = 0
        cache = None
        if cache_store is not None and len(prompts) == 1 and engine.continues_prefill:
            cache, self.reuse = cache_store.take_cache(prompts[0])
            if cache is not None:
                cache.ensure(min(needed, limit), used=self.reuse, limit=limit)
        if cache is None:
            capacity = plan_capacity(
                needed,
                context_length=engine.artifact.context_length,
                max_length=engine.max_length,
            )
            cache = engine.new_cache(len(prompts), capacity)
        self.cache = cache
        self.capacity, self.nbytes = cache.capacity, cache.nbytes
        self._kv = self._io = None

    def prefill(self) -> np.ndarray:
        """Equal lengths in one call, otherwise row by row into row views of the cache."""
        prompts = self.prompts
        if len(prompts) == 1 or len({len(ids) for ids in prompts}) == 1:
            ids = np.array(prompts, dtype=np.int64)
            return self._feed(ids, self.reuse, self.cache.ortvalues())
        parts = [
            self._feed(np.array([ids], dtype=np.int64), 0, self.cache.ortvalues(i))
            for i, ids in enumerate(prompts)
        ]
        return np.concatenate(parts, axis=0)

    def _feed(self, ids: np.ndarray, start: int, kv) -> np.ndarray:
        """Feed `ids[:, start:]` (positions before `start` are cached) in chunks.

        Chunks of `prefill_chunk` tokens bound the prefill activations (attention scores grow
        with chunk x total length) without changing the result: GQA continues from the cache
        exactly as if the prompt came in one call.
        """
        engine = self.engine
        total = ids.shape[1]
        chunk = engine.prefill_chunk or total
        logits = None
        io = engine.bind(kv)
        for begin in range(start, total, chunk):
            end = min(begin + chunk, total)
            lengths = np.full(ids.shape[0], end, dtype=np.int64)
            logits = engine.run(ids[:, begin:end], lengths, kv, io)
            self.prefill_calls += 1
        return logits

    def step(self, feed: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Feed one token per row (`feed` [batch, 1]); `lengths` counts it."""
        if self._kv is None:  # one binding of the whole batch's KV for every decode step
            self._kv = self.cache.ortvalues()
            self._io = self.engine.bind(self._kv)
        return self.engine.run(feed, lengths, self._kv, self._io)

    def verify(self, feed: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Feed several tokens per row (`feed` [batch, n]); logits of all n, [batch, n, vocab].

        Positions written past what the caller later counts in `lengths` are not cleared:
        attention reads only the first `lengths` positions and the next call overwrites them,
        so rejecting drafted tokens is a shorter `lengths`, not a copy.
        """
        if self._kv is None:
            self._kv = self.cache.ortvalues()
            self._io = self.engine.bind(self._kv)
        return self.engine.verify(feed, lengths, self._io)
