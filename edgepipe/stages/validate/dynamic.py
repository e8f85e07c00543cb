"""The validate stage: run the artifact, compare it with a reference, apply the thresholds.

The artifact runs on the profile's execution provider when this onnxruntime has it, else on CPU
(recorded, so a report never claims a provider it did not use). The reference is the source
model in transformers when transformers and torch are importable, else the unquantized export
of the same model. Both see the recipe's evaluation text, teacher-forced: the artifact token by
token through its KV cache (its prefill logits are last-position only by default), which also
exercises the decode path the runtime uses.

Thresholds are named `max_<metric>` or `min_<metric>` after the metrics of `compare_logits`
(`max_kl`, `min_top1_agreement`, `max_perplexity_ratio`, ...), so a recipe can bound any
metric the report has.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from edgepipe.errors import InvalidInput

CPU = "CPUExecutionProvider"

_ORT_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


class DecoderRunner:
    """Runs a dynamic-variant decoder (`docs/contracts.md`) with plain `session.run`.

    Args:
        model_path: the `.onnx` file.
        provider: execution provider; CPU is always appended as fallback.
        provider_options: options for `provider`.
        session_options: an `onnxruntime.SessionOptions`, or None for defaults.
    """

    def __init__(
        self,
        model_path: str | Path,
        provider: str = CPU,
        provider_options: Mapping | None = None,
        session_options=None,
    ):
        import onnxruntime as ort

        providers = [(provider, dict(provider_options or {}))]
        if provider != CPU:
            providers.append((CPU, {}))
        self.session = ort.InferenceSession(
            str(model_path), sess_options=session_options, providers=providers
        )
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.past_names = sorted(
            (n for n in self.inputs if n.startswith("past_key_values.")), key=_layer_order
        )
        # present.{i}.key feeds past_key_values.{i}.key on the next step.
        self.present_for = {p: "present." + p[len("past_key_values.") :] for p in self.past_names}

    def _empty_past(self) -> dict[str, np.ndarray]:
        feeds = {}
        for name in self.past_names:
            meta = self.inputs[name]
            dtype = _ORT_TO_NUMPY.get(meta.type, np.float32)
            # Shape [batch, kv_heads, past, head_dim]: the graph has kv_heads/head_dim fixed.
            kv_heads, head_dim = meta.shape[1], meta.shape[3]
            if not isinstance(kv_heads, int) or not isinstance(head_dim, int):
                raise InvalidInput(f"{name}: expected fixed kv_heads and head_dim dims")
            feeds[name] = np.zeros((1, kv_heads, 0, head_dim), dtype=dtype)
        return feeds

    def step(self, ids: list[int], past: dict, total: int) -> tuple[np.ndarray, dict]:
        """Run `ids` after `total - len(ids)` cached positions; returns (logits, new past)."""
        feeds = {"input_ids": np.asarray([ids], dtype=np.int64)}
        feeds["attention_mask"] = np.ones((1, total), dtype=np.int64)
        if "position_ids" in self.inputs:
            start = total - len(ids)
            feeds["position_ids"] = np.arange(start, total, dtype=np.int64)[None, :]
        feeds.update(past)
        outputs = dict(zip(self.output_names, self.session.run(None, feeds), strict=True))
        new_past = {p: outputs[self.present_for[p]] for p in self.past_names}
        return outputs["logits"].astype(np.float32), new_past

    def teacher_forced(
        self, ids: list[int], progress: Callable[[str], None] | None = None
    ) -> np.ndarray:
        """Next-token logits after every prefix of `ids`: shape `[len(ids), vocab]`.

        Args:
            ids: the token ids.
            progress: called with "t/T tokens" every 32 tokens.
        """
        shape = next(o.shape for o in self.session.get_outputs() if o.name == "logits")
        if shape[1] != 1:  # maybe an all-logits export: then one run answers
            logits, _ = self.step(ids, self._empty_past(), len(ids))
            if logits.shape[1] == len(ids):
                return logits[0]
        rows = []
        past = self._empty_past()
        for t, token in enumerate(ids):
            logits, past = self.step([token], past, t + 1)
            rows.append(logits[0, -1])
            if progress is not None and (t + 1) % 32 == 0:
                progress(f"{t + 1}/{len(ids)} tokens")
        return np.stack(rows)

    def greedy(self, ids: list[int], new_tokens: int) -> list[int]:
        """Greedy continuation of `ids` (`new_tokens` ids)."""
        logits, past = self.step(ids, self._empty_past(), len(ids))
        out = []
        total = len(ids)
        for _ in range(new_tokens):
            token = int(np.argmax(logits[0, -1]))
            out.append(token)
            total += 1
            logits, past = self.step([token], past, total)
        return out


def _layer_order(name: str) -> tuple[int, str]:
    parts = name.split(".")
    return (int(parts[1]) if parts[1].isdigit() else 0, parts[-1])


ROW_CHUNK = 16


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare_logits(logits: np.ndarray, reference: np.ndarray, ids: list[int]) -> dict:
    """Quality metrics of `logits` against `reference` (both `[T, vocab]`, teacher-forced on
    `ids`).

    Returns:
        `logit_abs_diff` (max), `cosine` (of the flattened logits), `kl` (mean KL(reference ||
        artifact) of the next-token distributions, nats/token), `top1_agreement` (fraction in
        [0, 1]), `perplexity` and `reference_perplexity` (over the T-1 predicted tokens),
        `perplexity_ratio`, `tokens`. The names match the recipe's `max_<metric>` /
        `min_<metric>` thresholds.
    """
    vocab = min(logits.shape[-1], reference.shape[-1])
    rows_total = logits.shape[0]
    # Row chunks: float64 copies of a [256, 151936] block would cost ~300 MB each.
    kl_sum = agree = nll_sum = ref_nll_sum = dot = norm_a = norm_b = 0.0
    max_diff = 0.0
    for start in range(0, rows_total, ROW_CHUNK):
        stop = min(start + ROW_CHUNK, rows_total)
        a = logits[start:stop, :vocab].astype(np.float64)
        b = reference[start:stop, :vocab].astype(np.float64)
        diff = float(np.max(np.abs(a - b)))
        max_diff = diff if math.isnan(diff) or diff > max_diff else max_diff  # NaN sticks
        dot += float(np.sum(a * b))
        norm_a += float(np.sum(a * a))
        norm_b += float(np.sum(b * b))
        art, ref = _log_softmax(a), _log_softmax(b)
        kl_sum += float(np.sum(np.exp(ref) * (ref - art)))
        agree += float(np.sum(np.argmax(art, -1) == np.argmax(ref, -1)))
        # Row t predicts ids[t + 1]; the last row has no target.
        last = min(stop, len(ids) - 1)
        if last > start:
            rows = np.arange(last - start)
            targets = np.asarray(ids[start + 1 : last + 1])
            nll_sum -= float(np.sum(art[rows, targets]))
            ref_nll_sum -= float(np.sum(ref[rows, targets]))
    kl, top1 = kl_sum / rows_total, agree / rows_total
    predicted = len(ids) - 1
    nll = nll_sum / predicted if predicted > 0 else float("nan")
    ref_nll = ref_nll_sum / predicted if predicted > 0 else float("nan")
    denom = float(np.sqrt(norm_a) * np.sqrt(norm_b))
    # A random-weight model has a perplexity near the vocabulary size, or beyond float range
    # for a wild one: inf is the honest value there, not an error; the ratio stays finite.
    with np.errstate(over="ignore"):
        ppl, ref_ppl = float(np.exp(nll)), float(np.exp(ref_nll))
        ratio = float(np.exp(nll - ref_nll))
    return {
        "tokens": len(ids),
        "logit_abs_diff": max_diff,
        "cosine": dot / denom if denom else 1.0,
        "kl": max(kl, 0.0),  # rounding can give -1e-12 for identical models
        "top1_agreement": top1,
        "perplexity": ppl,
        "reference_perplexity": ref_ppl,
        "perplexity_ratio": ratio,
    }


def greedy_agreement(a: list[int], b: list[int]) -> float:
    """Fraction of the greedy sequence that agrees before the first difference."""
    n = min(len(a), len(b))
    same = next((i for i in range(n) if a[i] != b[i]), n)
    return same / n if n else 1.0


def transformers_logits(model_dir: Path, ids: list[int]) -> np.ndarray | None:
    """Teacher-forced fp32 logits of the source model in transformers, or None when
    transformers/torch are not importable (the caller falls back to the unquantized export)."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32
    ).eval()
    with torch.no_grad():
        out = model(torch.tensor([ids], dtype=torch.long)).logits[0]
    return out.float().numpy()


def _quality_report(runner, ref_runner, ids: list[int], known: dict, greedy_tokens: int = 16):
    """`edgepipe.stages.validate.metrics.quality_report` of the artifact against the unquantized export: KL,
    top-1 agreement, both perplexities, and greedy agreement from the first 16 tokens."""
    from edgepipe.stages.validate.metrics import quality_report

    def memo(run: DecoderRunner, seen: dict):
        def logits_fn(window) -> np.ndarray:
            key = tuple(int(i) for i in window)
            if key not in seen:
                seen[key] = run.teacher_forced(list(key))
            return seen[key]

        return logits_fn

    reference_fn, candidate_fn = memo(ref_runner, {}), memo(runner, known)
    prompt = ids[: min(len(ids), 16)]
    try:
        # Greedy agreement is measured below with the KV cache: quality_report's own greedy
        # loop re-runs the whole prefix per token, which costs a step per position squared.
        report = quality_report(
            reference_fn,
            candidate_fn,
            np.asarray(ids, dtype=np.int64),
            window=max(2, len(ids)),
        ).to_dict()
    except OverflowError:
        # quality_report's perplexity uses math.exp, which overflows for a wild random model
        # (mean NLL > 709 nats); our metrics saturate to inf there instead.
        report = compare_logits(candidate_fn(ids), reference_fn(ids), ids)
    ours = np.asarray(runner.greedy(prompt, greedy_tokens))
    theirs = np.asarray(ref_runner.greedy(prompt, greedy_tokens))
    # Same definitions as edgepipe.stages.validate.metrics: share of equal positions, share of equal sequences.
    report["greedy_agreement"] = float(np.mean(ours == theirs))
    report["greedy_exact"] = float(np.array_equal(ours, theirs))
    report["greedy_steps"], report["greedy_prompts"] = greedy_tokens, 1
    return {**report, "reference": "unquantized-export"}


def check_thresholds(metrics: Mapping, thresholds: Mapping) -> list[str]:
    """Failures of `metrics` against `max_<metric>` / `min_<metric>` thresholds.

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
            failures.append(f"{metric} = {value:.6g}, required {sign} {bound}")
    return failures


def validate_model(
    model_path: Path,
    ids: list[int],
    *,
    provider: str,
    provider_options: Mapping | None = None,
    reference_dir: Path | None = None,
    reference_model: Path | None = None,
    fp32_model: Path | None = None,
    thresholds: Mapping | None = None,
    quality: bool = False,
    greedy_tokens: int = 16,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Run `model_path` on the evaluation ids and compare with the reference.

    Args:
        model_path: the artifact's `model.onnx`.
        ids: evaluation token ids (the recipe's evaluation text, tokenized).
        provider: the profile's execution provider (CPU is used when it is not available).
        provider_options: its options.
        reference_dir: the source model folder, for the transformers reference.
        reference_model: the unquantized export's `model.onnx`: the fallback reference, and
            what the quality report is measured against.
        fp32_model: float16 builds: the unquantized float32 export. It is the reference when
            transformers is missing, and the baseline of the `fp16_kl`, `fp16_top1_agreement`
            and `fp16_logit_abs_diff` metrics: how far `reference_model` (the unquantized
            float16 export) drifts from float32.
        thresholds: `max_<metric>` / `min_<metric>` bounds (already filtered to those that
            apply to this build).
        quality: also compute the quality report against `reference_model` (quantized builds):
            the metrics plus `greedy_agreement`.
        greedy_tokens: length of the greedy-agreement continuation.
        progress: called with a short status line.

    Returns:
        The report: `provider` (used), `requested_provider`, `reference` (`transformers`,
        `unquantized-fp32-export` or `unquantized-export`), the metrics of `compare_logits`,
        the `fp16_*` drift metrics (with `fp32_model`), `quality` (or None), `thresholds`,
        `failures` and `passed`.
    """
    import onnxruntime as ort

    used = provider if provider in ort.get_available_providers() else CPU
    if progress:
        progress(f"running on {used}")
    runner = DecoderRunner(model_path, used, provider_options if used == provider else None)
    logits = runner.teacher_forced(ids, progress)

    reference, kind = None, None
    if reference_dir is not None:
        if progress:
            progress("transformers reference")
        reference = transformers_logits(reference_dir, ids)
        kind = "transformers" if reference is not None else None
    if reference is None and fp32_model is not None:
        reference = DecoderRunner(fp32_model, CPU).teacher_forced(ids)
        kind = "unquantized-fp32-export"
    # The unquantized export runs only when it is the reference, the quality baseline or the
    # float16 graph whose drift from float32 is measured.
    needed = reference is None or quality or fp32_model is not None
    ref_runner = DecoderRunner(reference_model, CPU) if needed and reference_model else None
    export_logits = ref_runner.teacher_forced(ids) if ref_runner is not None else None
    if reference is None:
        reference, kind = export_logits, "unquantized-export"
    if reference is None:
        raise InvalidInput("validate: no reference (no transformers, no unquantized export)")

    report = {"requested_provider": provider, "provider": used, "reference": kind}
    report.update(compare_logits(logits, reference, ids))
    if fp32_model is not None and export_logits is not None:
        drift = compare_logits(export_logits, reference, ids)
        report.update({f"fp16_{k}": drift[k] for k in ("kl", "top1_agreement", "logit_abs_diff")})
    report["quality"] = None
    if quality and ref_runner is not None:
        if progress:
            progress("quality report")
        report["quality"] = _quality_report(runner, ref_runner, ids, {tuple(ids): logits})
    report["thresholds"] = dict(thresholds or {})
    failures = check_thresholds(report, thresholds or {})
    report["failures"] = failures
    report["passed"] = not failures
    return report
