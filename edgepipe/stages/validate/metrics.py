"""The one definition of every quality metric edgepipe reports, and of the manifest's `quality`.

Every metric compares a candidate's next-token logits with a reference's, teacher-forced on
the same token ids (row t is the distribution after `ids[: t + 1]`):

* `kl`: mean over rows of KL(reference || candidate), nats per token;
* `top1_agreement`: share of rows where both argmaxes are equal;
* `perplexity` / `reference_perplexity`: exp of the mean negative log-likelihood of the actual
  next tokens (row t scores `ids[t + 1]`; a last row without a next token is not scored), and
  `perplexity_ratio` = candidate / reference;
* `cosine` of the flattened logits and `logit_abs_diff`, their largest absolute difference;
* from greedy continuations of one prompt: `greedy_agreement`, the share of positions where both
  chose the same token, and `greedy_exact`, 1.0 when the two sequences are identical.

Recipes bound any of them with `max_<metric>` / `min_<metric>` thresholds (`check_thresholds`).
Everything is computed in float64 on log-softmax values over row chunks, so float16 logits, a
151936-token vocabulary and a wild random model (mean NLL beyond float range: perplexity inf)
are all fine.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from edgepipe.errors import InvalidInput

# Rows converted to float64 at once: a [16, 151936] float64 block is ~19 MB per temporary.
ROW_CHUNK = 16

#: The keys of `compare_logits`, in report order.
METRIC_KEYS = (
    "tokens",
    "kl",
    "top1_agreement",
    "perplexity",
    "reference_perplexity",
    "perplexity_ratio",
    "cosine",
    "logit_abs_diff",
)
#: The keys of `greedy_agreement`.
GREEDY_KEYS = ("greedy_agreement", "greedy_exact", "greedy_steps")
#: The manifest's `quality` block, the same for every build variant (docs/contracts.md).
#: `groups`: per weight group errors (`edgepipe.build.target_kl`: each group's KL when it alone
#: is quantized), None when not measured.
QUALITY_KEYS = ("reference", "provider", *METRIC_KEYS, *GREEDY_KEYS, "groups")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax over the last axis, in float64."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def perplexity(mean_nll: float) -> float:
    """exp(mean NLL), inf past float range (a wild random model) instead of an OverflowError."""
    with np.errstate(over="ignore"):
        return float(np.exp(np.float64(mean_nll)))


def compare_logits(logits: np.ndarray, reference: np.ndarray, ids: Sequence[int]) -> dict:
    """Quality metrics of `logits` against `reference`, both `[rows, vocab]` teacher-forced
    on `ids`.

    Args:
        logits: the candidate's next-token logits, one row per position.
        reference: the reference's, the same rows. A longer vocabulary on either side (padded
            embedding tables) is cut to the shorter one.
        ids: the token ids; row t's next token is `ids[t + 1]` (rows beyond `len(ids) - 1`
            have none and are not scored for perplexity).

    Returns:
        The `METRIC_KEYS` (see the module docstring); `tokens` is `len(ids)`. A NaN in the
        logits gives NaN metrics, never a small difference.

    Raises:
        InvalidInput: the two logits do not have the same number of rows.
    """
    if logits.ndim != 2 or reference.ndim != 2 or logits.shape[0] != reference.shape[0]:
        raise InvalidInput(
            f"logits: candidate {logits.shape} and reference {reference.shape} must both be "
            "[positions, vocab] over the same positions"
        )
    vocab = min(logits.shape[-1], reference.shape[-1])
    rows_total = logits.shape[0]
    kl_sum = agree = nll_sum = ref_nll_sum = dot = norm_a = norm_b = max_diff = 0.0
    for start in range(0, rows_total, ROW_CHUNK):
        stop = min(start + ROW_CHUNK, rows_total)
        a = logits[start:stop, :vocab].astype(np.float64)
        b = reference[start:stop, :vocab].astype(np.float64)
        diff = float(np.max(np.abs(a - b)))
        max_diff = diff if math.isnan(diff) or diff > max_diff else max_diff  # NaN sticks
        dot += float(np.sum(a * b))
        norm_a += float(np.sum(a * a))
        norm_b += float(np.sum(b * b))
        cand, ref = log_softmax(a), log_softmax(b)
        kl_sum += float(np.sum(np.exp(ref) * (ref - cand)))
        agree += float(np.sum(np.argmax(cand, -1) == np.argmax(ref, -1)))
        last = min(stop, len(ids) - 1)
        if last > start:
            rows = np.arange(last - start)
            targets = np.asarray(ids[start + 1 : last + 1])
            nll_sum -= float(np.sum(cand[rows, targets]))
            ref_nll_sum -= float(np.sum(ref[rows, targets]))
    scored = min(rows_total, len(ids) - 1)
    nll = nll_sum / scored if scored > 0 else float("nan")
    ref_nll = ref_nll_sum / scored if scored > 0 else float("nan")
    denom = float(np.sqrt(norm_a) * np.sqrt(norm_b))
    kl = kl_sum / rows_total
    return {
        "tokens": len(ids),
        "kl": max(kl, 0.0) if not math.isnan(kl) else kl,  # rounding gives -1e-17 for equals
        "top1_agreement": agree / rows_total,
        "perplexity": perplexity(nll),
        "reference_perplexity": perplexity(ref_nll),
        # From the NLL difference: finite even where both perplexities are inf.
        "perplexity_ratio": perplexity(nll - ref_nll),
        "cosine": dot / denom if denom else 1.0,
        "logit_abs_diff": max_diff,
    }


def greedy_agreement(candidate: Sequence[int], reference: Sequence[int]) -> dict:
    """How far two greedy continuations of the same prompt agree.

    Args:
        candidate: the candidate's greedy token ids.
        reference: the reference's.

    Returns:
        `greedy_agreement`: share of positions (over the shorter sequence) where both chose the
        same token (`[1, 2, 9, 4]` vs `[1, 2, 3, 4]` gives 0.75); `greedy_exact`: 1.0 when the
        sequences are identical, else 0.0; `greedy_steps`: the positions compared.
    """
    steps = min(len(candidate), len(reference))
    same = sum(int(a) == int(b) for a, b in zip(candidate[:steps], reference[:steps], strict=True))
    identical = [int(t) for t in candidate] == [int(t) for t in reference]
    return {
        "greedy_agreement": same / steps if steps else 1.0,
        "greedy_exact": float(identical),
        "greedy_steps": steps,
    }


def quality_report(
    logits: np.ndarray,
    reference_logits: np.ndarray,
    ids: Sequence[int],
    *,
    reference: str,
    provider: str,
    greedy: tuple[Sequence[int], Sequence[int]] | None = None,
    groups: list[dict] | None = None,
) -> dict:
    """The manifest's `quality` block: `QUALITY_KEYS`, the same for every build variant.

    Args:
        logits: the artifact's teacher-forced logits `[rows, vocab]` on `ids`.
        reference_logits: the reference's, the same rows.
        ids: the evaluation token ids.
        reference: what the reference is (`unquantized-export`, `transformers`, ...).
        provider: where the artifact's logits were computed.
        greedy: (candidate, reference) greedy continuations of one prompt, or None when not
            measured (then the greedy keys are None).
        groups: per weight group errors, or None when not measured.

    Returns:
        The block, keys in `QUALITY_KEYS` order.
    """
    report = {"reference": reference, "provider": provider}
    report.update(compare_logits(logits, reference_logits, ids))
    if greedy is None:
        report.update(dict.fromkeys(GREEDY_KEYS))
    else:
        report.update(greedy_agreement(*greedy))
    report["groups"] = groups
    return report


# What a recipe can change when a quantization gate fails, cheapest first. On a small tied
# model the 4-bit token table (shared with the head) holds most of the int4 error (issue 18:
# KL 0.039 -> 0.011 with an 8-bit table), so an 8-bit table comes first, then the automatic
# search, then a relaxed gate.
_QUALITY_FIXES = (
    "precision.lm_head: int8 (an 8-bit token table shared by embedding and head)",
    "precision.target_kl: {target} (the build promotes the costliest weight groups to int8)",
)
_QUALITY_METRICS = ("kl", "top1_agreement", "perplexity_ratio")


def _relaxed(value: float, kind: str) -> str:
    """A bound the measured `value` passes with a little margin, in two significant digits."""
    if kind == "max":
        bound = float(f"{value * 1.25:.2g}")
        return f"{max(bound, value):.2g}"
    return f"{math.floor(value * 0.97 * 100) / 100:.2f}"


def remedy(metric: str, kind: str, value: float, bound: float, metrics: Mapping) -> str:
    """The one-line recipe changes that would pass a failed `max_`/`min_<metric>` gate."""
    relax = f"validation.{kind}_{metric}: {_relaxed(value, kind)}"
    if metric not in _QUALITY_METRICS:
        return f"to pass: {relax}, or find what changed the graph's output"
    kl = metrics.get("kl")
    if metric == "kl":
        target = f"{bound * 0.8:.2g}"  # the search measures on the same text: keep a margin
    else:  # top-1 and perplexity follow KL; halving it is the usual first step
        target = f"{min(0.02, kl / 2):.2g}" if isinstance(kl, float) and kl > 0 else "0.02"
    fixes = [fix.format(target=target) for fix in _QUALITY_FIXES]
    return "to pass, one of: " + "; ".join([*fixes, relax])


def check_thresholds(metrics: Mapping, thresholds: Mapping) -> list[str]:
    """Failures of `metrics` against `max_<metric>` / `min_<metric>` thresholds.

    Args:
        metrics: a report holding metrics by name (`compare_logits`, a quality block, ...).
        thresholds: bounds by name; None bounds are skipped.

    Returns:
        One line per failed bound, naming the metric, its value, the bound and the recipe
        changes that would pass it (`remedy`); a NaN value always fails.

    Raises:
        InvalidInput: a threshold names no metric of the report (lists the metrics).
    """
    failures = []
    for name, bound in sorted(thresholds.items()):
        if bound is None:
            continue
        kind, _, metric = name.partition("_")
        if kind not in ("max", "min") or metric not in metrics:
            known = sorted(k for k, v in metrics.items() if isinstance(v, int | float))
            raise InvalidInput(
                f"validation.{name}: unknown threshold; use max_<metric> or min_<metric> "
                f"with a metric in {known}"
            )
        value = metrics[metric]
        ok = value <= bound if kind == "max" else value >= bound
        if not ok or (isinstance(value, float) and math.isnan(value)):
            sign = "<=" if kind == "max" else ">="
            failures.append(
                f"{metric} = {value:.6g}, required {sign} {bound} ({name}); "
                + remedy(metric, kind, value, bound, metrics)
            )
    return failures
