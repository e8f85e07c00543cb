"""The engines `Generator` runs a decoder through: one per graph variant, one interface.

`Generator` owns sampling, stop handling, streaming, chat and metrics; an engine owns the
sessions, the KV cache and the model calls of its graph variant, so that code is the same for
both: `dynamic` (one decoder with contrib ops, `engines/dynamic.py`) and `static` (NPU prefill +
decode graphs with a fixed cache, `engines/static.py`). The engines satisfy the protocols below
structurally and import nothing from this module.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from edgepipe.runtime.engines.dynamic import DynamicEngine
from edgepipe.runtime.engines.static import StaticEngine
from edgepipe.runtime.errors import GeneratorError


class CacheStore(Protocol):
    """Lends a KV cache to a request and keeps it afterwards (a `ChatSession`)."""

    def take_cache(self, prompt_ids: list[int]) -> tuple[object | None, int]:
        """(cache, reusable prefix length) for a new prompt; (None, 0) when none is reusable."""

    def keep_cache(self, cache: object, ids: list[int]) -> None:
        """Remember the cache and the ids whose keys and values it holds."""


class Request(Protocol):
    """One generate call on an engine.

    Attributes:
        capacity: KV positions per row the request may use.
        nbytes: bytes of KV cache allocated for it.
        reuse: prompt positions taken from the cache store's cache (not fed again).
        cache: the cache of row 0, for the cache store to keep.
        prefill_calls: model calls made by `prefill()`.
    """

    capacity: int
    nbytes: int
    reuse: int
    cache: object
    prefill_calls: int

    def prefill(self) -> np.ndarray:
        """Feed the prompts; return each row's next-token logits `[batch, vocab]`."""

    def step(self, feed: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Feed one token per row (`feed` `[batch, 1]`, `lengths` counting it); return logits."""


class Engine(Protocol):
    """Opens requests on the sessions of one artifact.

    Attributes:
        provider: the execution provider the sessions run on.
        continues_prefill: whether a call may append several tokens after cached ones.
        prefill_chunk: prompt tokens per prefill call, or None for all at once.
    """

    provider: str
    continues_prefill: bool
    prefill_chunk: int | None

    def begin(
        self, prompts: list[list[int]], max_new_tokens: int, cache_store: CacheStore | None
    ) -> Request:
        """A request for `prompts` (the cache store's cache when it has a reusable one)."""


# graph_variant (genai_config / manifest) -> the engine that runs it.
ENGINES: dict[str, type] = {"dynamic": DynamicEngine, "static": StaticEngine}
GRAPH_VARIANTS = tuple(ENGINES)


def open_engine(artifact, **options) -> Engine:
    """The engine of `artifact.graph_variant`, opened with `options` (see `DynamicEngine.open`).

    Raises:
        GeneratorError: the artifact's graph variant has no engine.
    """
    engine = ENGINES.get(artifact.graph_variant)
    if engine is None:
        raise GeneratorError(
            f"{artifact.path}: graph_variant {artifact.graph_variant!r} is not supported by "
            f"edgepipe.runtime (it runs {', '.join(GRAPH_VARIANTS)})"
        )
    return engine.open(artifact, **options)
