"""Driving the static two-graph pipeline (NPU artifacts): fixed chunk, fixed KV capacity.

The artifact holds a prefill graph of `chunk` tokens and a 1-token decode graph over one KV cache
of `capacity` slots per layer (docs/contracts.md, "Static decoder graphs"). The graphs return
only the new tokens' keys and values; this module owns the cache and writes them in. A prompt is
fed chunk by chunk from its first uncached token; the last, shorter chunk is *left*-padded so its
last real token sits in the graph's last slot, whose logits the graph returns. Pads attend only to
themselves, are never written to the cache, and take position 0. Generated tokens go through the
decode graph.

A full cache is a hard limit, not a sliding window: feeding a token at slot `capacity` raises
`KVCacheFull`. `Generator` sizes every request to stay inside it (a prompt that does not fit
raises `PromptTooLong` or is truncated on request, and generation stops with finish_reason
"length" when the cache is full), so the error only reaches callers that drive this class
directly.

Sessions run on the QNN provider when onnxruntime-qnn is installed (the artifact's compiled
EPContext graphs when it has them, which skips the HTP compile), else on CPU over the same QDQ
graphs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

import edgepipe.runtime.qnn as qnn
from edgepipe.runtime.engines.kv import lazy_zeros
from edgepipe.runtime.errors import (
    ArtifactError,
    GeneratorError,
    KVCacheFull,
    ProviderUnavailable,
)
from edgepipe.runtime.options import QUIET
from edgepipe.runtime.options import session_options as new_session_options
from edgepipe.runtime.providers import CPU_PROVIDER, QNN_PROVIDER, install_package


@dataclass
class StaticCache:
    """The KV cache of one sequence: `[1, kv_heads, capacity, head_dim]` per layer and kind.

    Attributes:
        keys, values: per-layer float32 buffers (fed as the graphs' past inputs).
        length: slots holding real tokens (positions 0..length-1).
    """

    keys: list[np.ndarray]
    values: list[np.ndarray]
    length: int = 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.keys) + sum(a.nbytes for a in self.values)


@dataclass
class _GraphIO:
    session: object
    seq: int
    past: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)


class StaticPipeline:
    """A prefill + decode session pair over a fixed-capacity cache (batch 1 per cache).

    Args:
        prefill, decode: onnxruntime sessions of the two graphs.
        num_layers: decoder layers (KV inputs are `past_key_values.{i}.key|value`).
        pad_token_id: the id fed in padding slots.

    Raises:
        ArtifactError: the sessions do not have the static graphs' inputs.
    """

    def __init__(self, prefill, decode, *, num_layers: int, pad_token_id: int, where="artifact"):
        self.graphs = [self._describe(s, num_layers, where) for s in (prefill, decode)]
        self.prefill_graph, self.decode_graph = self.graphs
        shape = next(i.shape for i in prefill.get_inputs() if i.name == "past_key_values.0.key")
        self.kv_heads, self.capacity, self.head_dim = int(shape[1]), int(shape[2]), int(shape[3])
        self.chunk = self.prefill_graph.seq
        self.num_layers = num_layers
        self.pad_token_id = pad_token_id
        if self.decode_graph.seq != 1:
            raise ArtifactError(where, f"decode graph takes {self.decode_graph.seq} tokens, not 1")

    @staticmethod
    def _describe(session, num_layers: int, where) -> _GraphIO:
        inputs = {i.name: i for i in session.get_inputs()}
        past = [f"past_key_values.{i}.{k}" for i in range(num_layers) for k in ("key", "value")]
        missing = [
            n for n in ("input_ids", "position_ids", "attention_mask", *past) if n not in inputs
        ]
        if missing:
            raise ArtifactError(where, f"static graph has no input(s) {missing[:4]}")
        seq = inputs["input_ids"].shape[1]
        if not isinstance(seq, int):
            raise ArtifactError(where, f"static graph has a dynamic sequence length {seq!r}")
        present = [n.replace("past_key_values.", "present.") for n in past]
        return _GraphIO(session, seq, past, present)

    def new_cache(self) -> StaticCache:
        """A zeroed cache (`lazy_zeros`: untouched slots cost no resident memory)."""
        shape = (1, self.kv_heads, self.capacity, self.head_dim)
        return StaticCache(
            [lazy_zeros(shape, np.float32) for _ in range(self.num_layers)],
            [lazy_zeros(shape, np.float32) for _ in range(self.num_layers)],
        )

    def prefill(self, cache: StaticCache, ids, start: int | None = None) -> np.ndarray:
        """Feed `ids` after the first `start` cached slots (default `cache.length`); return the
        next-token logits `[vocab]` of the last id.

        Raises:
            KVCacheFull: the ids do not fit in the cache.
        """
        ids = [int(t) for t in ids]
        if not ids:
            raise ValueError("prefill needs at least one token")
        cache.length = cache.length if start is None else start
        self._check_room(cache.length, len(ids))  # before any chunk writes into the cache
        logits = None
        for begin in range(0, len(ids), self.chunk):
            logits = self.run(self.prefill_graph, cache, ids[begin : begin + self.chunk])
        return logits

    def step(self, cache: StaticCache, token: int) -> np.ndarray:
        """Feed one token through the decode graph; return its next-token logits `[vocab]`."""
        return self.run(self.decode_graph, cache, [int(token)])

    def feeds(self, graph: _GraphIO, cache: StaticCache, ids: list[int]) -> dict[str, np.ndarray]:
        """The inputs of one call: `ids` (at most `graph.seq`, left-padded) after the cache."""
        seq, start, n = graph.seq, cache.length, len(ids)
        if not 0 < n <= seq:
            raise ValueError(f"one call of a {seq}-token graph feeds 1 to {seq} ids, not {n}")
        self._check_room(start, n)
        pad = seq - n
        input_ids = np.full((1, seq), self.pad_token_id, np.int64)
        input_ids[0, pad:] = ids
        positions = np.zeros((1, seq), np.int64)
        positions[0, pad:] = np.arange(start, start + n)
        mask = np.zeros((1, 1, seq, self.capacity + seq), np.float32)
        mask[0, 0, :, :start] = 1.0
        rows = np.arange(seq)
        # Causal inside the chunk; pad rows (all before the real ones) see only themselves.
        causal = (rows[None, :] <= rows[:, None]) & (rows[None, :] >= pad)
        causal[rows[:pad], rows[:pad]] = True
        mask[0, 0, :pad, :start] = 0.0
        mask[0, 0, :, self.capacity :] = causal
        feeds = {"input_ids": input_ids, "position_ids": positions, "attention_mask": mask}
        for i in range(self.num_layers):
            feeds[graph.past[2 * i]] = cache.keys[i]
            feeds[graph.past[2 * i + 1]] = cache.values[i]
        return feeds

    def _check_room(self, start: int, n: int) -> None:
        if start + n > self.capacity:
            raise KVCacheFull(
                f"the KV cache is full: {start} of {self.capacity} slots used and {n} more "
                f"token(s) to feed; this static artifact was built with kv_capacity "
                f"{self.capacity} (the profile's kv_capacity): start a new sequence or rebuild "
                "with a larger one"
            )

    def run(self, graph: _GraphIO, cache: StaticCache, ids: list[int]) -> np.ndarray:
        """One call of `graph` (the prefill or decode graph) on at most `graph.seq` ids: their
        keys and values go into `cache`; returns the last id's next-token logits `[vocab]`."""
        feeds = self.feeds(graph, cache, ids)
        names = ["logits", *graph.present]
        outputs = graph.session.run(names, feeds)
        start, n, pad = cache.length, len(ids), graph.seq - len(ids)
        for i in range(self.num_layers):
            cache.keys[i][:, :, start : start + n] = outputs[1 + 2 * i][:, :, pad:]
            cache.values[i][:, :, start : start + n] = outputs[2 + 2 * i][:, :, pad:]
        cache.length = start + n
        return np.asarray(outputs[0][0, -1], dtype=np.float32)


def _sessions(artifact, provider, session_options, threads, session_config, provider_options):
    """(prefill, decode) sessions and the provider they run on; see `StaticEngine.open`."""
    import onnxruntime as ort

    wanted = provider or artifact.provider
    if wanted == QNN_PROVIDER and not qnn.qnn_available():
        if provider is not None:
            raise ProviderUnavailable(
                f"execution provider {QNN_PROVIDER} is not installed; install it with: "
                f"pip install {install_package(QNN_PROVIDER)}"
            )
        wanted = CPU_PROVIDER  # the same QDQ graphs run on CPU
    stages = ("prefill", "decode")
    missing = [s for s in stages if s not in artifact.pipeline]
    if missing:
        raise ArtifactError(
            artifact.path / "genai_config.json", f"decoder.pipeline has no {missing} graph"
        )

    def fresh_options():
        quiet = QUIET if wanted == QNN_PROVIDER else None
        return new_session_options(threads, session_config, log_severity_level=quiet)

    sessions, used = [], {}
    for stage in stages:
        path = artifact.pipeline[stage]
        try:
            if wanted == QNN_PROVIDER:
                # Compiled EPContext graphs skip the HTP compile. Each session gets its own
                # options: the plug-in provider is attached to the options object.
                path = artifact.ep_context.get(stage, path)
                options = (
                    artifact.provider_options if provider_options is None else provider_options
                )
                sessions.append(
                    qnn.qnn_session(
                        path, dict(options), session_options=fresh_options(), cpu_fallback=True
                    )
                )
            else:
                so = session_options if session_options is not None else fresh_options()
                sessions.append(
                    ort.InferenceSession(str(path), sess_options=so, providers=[wanted])
                )
        except GeneratorError:
            raise
        except Exception as exc:  # onnxruntime raises several unrelated types for bad files
            raise ArtifactError(path, f"onnxruntime could not load it on {wanted}: {exc}") from exc
        used[stage] = path
    return sessions, wanted, used


class StaticEngine:
    """Opens `Generator` requests on a static artifact (see `edgepipe.runtime.engines.Engine`).

    Attributes:
        pipeline: the `StaticPipeline`.
        provider: the provider the sessions run on.
        files: stage -> the graph file each session loaded (EPContext graphs on QNN when built).
        capacity: KV positions a request may use (kv_capacity, or a smaller `max_length`).
        continues_prefill: always True: the graphs take an explicit mask over the cache, so any
            call continues after the cached slots.
        prefill_chunk: the prefill graph's fixed chunk.
    """

    continues_prefill = True

    def __init__(self, pipeline: StaticPipeline, provider: str, max_length=None, files=None):
        self.pipeline, self.provider = pipeline, provider
        self.prefill_chunk = pipeline.chunk
        self.files = dict(files or {})
        self.capacity = (
            pipeline.capacity if max_length is None else min(max_length, pipeline.capacity)
        )

    @classmethod
    def open(
        cls,
        artifact,
        *,
        provider: str | None = None,
        session_options=None,
        intra_op_num_threads: int | None = None,
        session_config=None,
        provider_options=None,
        max_length: int | None = None,
        prefill_chunk: int | None = None,
    ) -> StaticEngine:
        """Sessions over the artifact's two graphs: on QNN when the artifact targets it and
        onnxruntime-qnn is installed (its EPContext graphs when compiled), else on CPU.

        `prefill_chunk` is accepted for the common engine interface and not used: the prefill
        graph's chunk was fixed when it was built.

        Raises:
            ProviderUnavailable: `provider` was asked for explicitly and is not installed.
            ArtifactError: a graph is missing or does not load.
        """
        (prefill, decode), used, files = _sessions(
            artifact,
            provider,
            session_options,
            intra_op_num_threads,
            session_config,
            provider_options,
        )
        pipeline = StaticPipeline(
            prefill,
            decode,
            num_layers=artifact.num_layers,
            pad_token_id=artifact.pad_token_id,
            where=artifact.path,
        )
        return cls(pipeline, used, max_length, files)

    def begin(self, prompts, max_new_tokens: int, cache_store) -> StaticRequest:
        """A request for `prompts`: a cache per row, or `cache_store`'s static cache."""
        return StaticRequest(self, prompts, cache_store)


class StaticRequest:
    """One generate call: a cache per row (the graphs take batch 1), prefill and steps."""

    def __init__(self, engine: StaticEngine, prompts, cache_store):
        self.engine, self.prompts = engine, [list(ids) for ids in prompts]
        self.capacity = engine.capacity
        self.reuse = 0
        self.prefill_calls = 0
        self.cache = None
        if cache_store is not None and len(prompts) == 1:
            cache, reuse = cache_store.take_cache(self.prompts[0])
            if isinstance(cache, StaticCache):
                self.cache, self.reuse = cache, reuse
        if self.cache is not None:
            self.caches = [self.cache]
        else:
            self.caches = [engine.pipeline.new_cache() for _ in prompts]
            self.cache = self.caches[0]
        self.nbytes = sum(c.nbytes for c in self.caches)

    def prefill(self) -> np.ndarray:
        """Feed each row into its own cache; return the rows' logits `[batch, vocab]`."""
        pipeline = self.engine.pipeline
        rows = []
        for cache, ids in zip(self.caches, self.prompts, strict=True):
            start = self.reuse if cache is self.cache else 0
            rows.append(pipeline.prefill(cache, ids[start:], start=start))
            self.prefill_calls += -(-(len(ids) - start) // pipeline.chunk)  # one per chunk
        return np.stack(rows)

    def step(self, feed: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Feed one token per row through the decode graph (`lengths` is the caches' own)."""
        pipeline = self.engine.pipeline
        return np.stack(
            [pipeline.step(cache, int(t)) for cache, t in zip(self.caches, feed[:, 0], strict=True)]
        )
