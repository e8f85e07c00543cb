"""Decoding parameters and the token sampler (greedy, temperature, top-k, top-p, min-p).

The logits pipeline follows transformers' order so the same parameters mean the same thing:
repetition penalty, then temperature, top-k, top-p, min-p, then a draw from the renormalised
distribution. Everything is numpy on one row of float32 logits at a time; with a 151,936-token
vocabulary a full sort costs milliseconds, so top-k (when set) first narrows the candidates with
`argpartition` and the rest works on those few.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields, replace

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens.

    Attributes:
        max_new_tokens: tokens to generate at most (>= 1).
        do_sample: draw from the distribution; False means greedy (argmax).
        temperature: > 0; divides the logits before sampling (0 means greedy).
        top_k: keep the k most likely tokens (0 = off).
        top_p: keep the smallest set of tokens whose probability reaches top_p (1.0 = off).
        min_p: drop tokens less likely than min_p times the most likely one (0.0 = off).
        repetition_penalty: >= 1 discourages tokens already in the prompt or output
            (transformers' definition; 1.0 = off).
        seed: seeds numpy's Generator; the same seed gives the same output.
        stop_token_ids: generation ends after any of these (None = the artifact's eos ids).
        stop_strings: generation ends when the text contains one; the text is cut before it.
    """

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] | None = None
    stop_strings: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    def validate(self) -> SamplingParams:
        """Check every field; return self.

        Raises:
            ValueError: naming the parameter and its allowed range.
        """
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not isinstance(self.do_sample, (bool, np.bool_)):
            raise ValueError(f"do_sample must be True or False, got {self.do_sample!r}")
        _check_float("temperature", self.temperature, 0.0, math.inf, low_open=False)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        _check_float("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _check_float("min_p", self.min_p, 0.0, 1.0, low_open=False)
        _check_float("repetition_penalty", self.repetition_penalty, 0.0, math.inf, low_open=True)
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0
        ):
            raise ValueError(f"seed must be an int >= 0 or None, got {self.seed!r}")
        if self.stop_token_ids is not None and not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids
        ):
            raise ValueError(f"stop_token_ids must be ints >= 0, got {self.stop_token_ids!r}")
        if not all(isinstance(s, str) and s for s in self.stop_strings):
            raise ValueError(f"stop_strings must be non-empty strings, got {self.stop_strings!r}")
        return self


def _check_float(name: str, value, low: float, high: float, *, low_open: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        upper = "inf)" if high == math.inf else f"{high}]"
        raise ValueError(f"{name} must be a number in {bracket}{low}, {upper}, got {value!r}")


PARAM_NAMES = frozenset(f.name for f in fields(SamplingParams))

# generation_config.json keys (transformers' GenerationConfig) the runtime takes defaults from.
_GENERATION_CONFIG_KEYS = (
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "max_new_tokens",
)


def params_from_generation_config(config: dict) -> SamplingParams:
    """Default parameters from an artifact's `generation_config.json` (unknown keys ignored)."""
    values = {k: config[k] for k in _GENERATION_CONFIG_KEYS if config.get(k) is not None}
    if "top_k" in values:
        values["top_k"] = int(values["top_k"])
    if "temperature" in values:
        values["temperature"] = float(values["temperature"])
    return SamplingParams(**values)


def merge_params(defaults: SamplingParams, **overrides) -> SamplingParams:
    """Apply keyword overrides (None means "keep the default") and validate.

    Raises:
        ValueError: an unknown parameter name or an invalid value.
    """
    unknown = sorted(set(overrides) - PARAM_NAMES)
    if unknown:
        raise ValueError(
            f"unknown generation parameter(s) {unknown}; allowed: {sorted(PARAM_NAMES)}"
        )
    changes = {k: v for k, v in overrides.items() if v is not None}
    for key in ("stop_token_ids", "stop_strings"):
        if key in changes:
            value = changes[key]
            if not isinstance(value, (int, str, Iterable)):
                raise ValueError(f"{key} must be a value or a list of them, got {value!r}")
            changes[key] = (value,) if isinstance(value, (int, str)) else tuple(value)
    return replace(defaults, **changes).validate()


def apply_repetition_penalty(logits: np.ndarray, seen: Iterable[int], penalty: float) -> None:
    """transformers' repetition penalty, in place: positive logits / p, negative logits * p."""
    if penalty == 1.0:
        return
    ids = np.fromiter(set(seen), dtype=np.int64)
    if ids.size == 0:
        return
    values = logits[ids]
    logits[ids] = np.where(values > 0, values / penalty, values * penalty)


# top-p without top-k (or min-p) first tries the NARROW most likely tokens: the nucleus is
# nearly always among them, and sorting 1,024 scores instead of 151,936 is most of the cost.
NARROW = 1024


def filtered_distribution(
    logits: np.ndarray,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """The candidates and their probabilities after temperature, top-k, top-p and min-p.

    Candidates are chosen on the raw logits (dividing by a temperature > 0 keeps the order), so
    only they are converted to float64 and sorted.

    Args:
        logits: one row, shape [vocab].

    Returns:
        (token ids, probabilities summing to 1), most likely first.
    """
    row = np.asarray(logits)
    size = row.size
    temperature = max(temperature, 1e-8)
    narrowed = False
    if 0 < top_k < size:
        candidates = np.argpartition(row, size - top_k)[size - top_k :]
    elif min_p > 0.0:
        # Only tokens near the best can pass min_p; a slightly lower floor than the exact test
        # (applied below on float64) keeps boundary tokens for it to decide.
        best = float(row.max())
        floor = best + temperature * math.log(min_p) - 1e-3 * (abs(best) + 1.0)
        candidates = np.flatnonzero(row >= floor)
        narrowed = candidates.size < size
    elif top_p < 1.0 and size > NARROW:
        candidates = np.argpartition(row, size - NARROW)[size - NARROW :]
        narrowed = True
    else:
        candidates = np.arange(size)
    ids, values, weights = _sorted_weights(row, candidates, temperature)
    total = weights.sum()
    if narrowed:
        # Probabilities over the whole vocabulary (top-p without top-k renormalises nothing);
        # when the narrowed set holds less than top_p of the mass, sort all tokens instead.
        total = np.exp(row.astype(np.float64) / temperature - values[0]).sum()
        if min_p == 0.0 and weights.sum() < top_p * total:
            ids, values, weights = _sorted_weights(row, np.arange(size), temperature)
    probs = weights / total
    keep = probs.size
    if top_p < 1.0:
        # Keep tokens until the mass *before* a token reaches top_p (so at least one stays).
        before = np.cumsum(probs) - probs
        keep = int(np.count_nonzero(before < top_p))
    if min_p > 0.0:
        keep = min(keep, max(1, int(np.count_nonzero(probs >= min_p * probs[0]))))
    ids, probs = ids[:keep], probs[:keep]
    return ids, probs / probs.sum()


def _sorted_weights(row: np.ndarray, candidates: np.ndarray, temperature: float):
    """(ids, scores / temperature, exp(that - best)) of `candidates`, most likely first."""
    scores = row[candidates].astype(np.float64) / temperature
    order = np.argsort(-scores, kind="stable")
    ids, values = candidates[order], scores[order]
    return ids, values, np.exp(values - values[0])


class Sampler:
    """Picks the next token of each row from its logits, with one seeded numpy Generator."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def pick(self, logits: np.ndarray, seen: Sequence[int] | Callable[[], Iterable[int]]) -> int:
        """Choose the next token from one row of logits.

        Args:
            logits: shape [vocab] (any float dtype; copied to float32).
            seen: token ids so far (prompt + output), for the repetition penalty; or a function
                returning them, called only when the penalty is on (saves an O(context) list
                per token otherwise).
        """
        p = self.params
        if p.greedy and p.repetition_penalty == 1.0:
            return int(np.argmax(logits))  # no copy of the 151,936 logits for plain greedy
        row = np.array(logits, dtype=np.float32)
        if p.repetition_penalty != 1.0:
            apply_repetition_penalty(row, seen() if callable(seen) else seen, p.repetition_penalty)
        if p.greedy:
            return int(np.argmax(row))
        ids, probs = filtered_distribution(
            row, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p
        )
        return int(ids[self.rng.choice(ids.size, p=probs)])
