"""The validate stage: run the artifact, compare it with a reference, apply the thresholds.

The artifact runs on the profile's execution provider when this onnxruntime has it, else on CPU
(recorded, so a report never claims a provider it did not use). The reference is the source
model in transformers when transformers and torch are importable, else the unquantized export
of the same model. Both see the recipe's evaluation text, teacher-forced: the artifact token by
token through its KV cache (its prefill logits are last-position only by default), which also
exercises the decode path the runtime uses.

Thresholds are named `max_<metric>` or `min_<metric>` after the metrics of
`edgepipe.stages.validate.metrics.compare_logits` (`max_kl`, `min_top1_agreement`,
`max_perplexity_ratio`, ...), so a recipe can bound any metric the report has.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from edgepipe.errors import InvalidInput
from edgepipe.stages.validate.metrics import check_thresholds, compare_logits, quality_report
from edgepipe.stages.validate.reference import transformers_logits
from edgepipe.stages.validate.runner import CPU, DecoderRunner

# Greedy agreement: a prompt of this many evaluation tokens, continued `greedy_tokens` steps.
GREEDY_PROMPT_TOKENS = 16
# The float16 drift metrics the report carries (`fp16_<metric>`).
FP16_DRIFT = ("kl", "top1_agreement", "logit_abs_diff")


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
            the quality baseline of quantized builds.
        fp32_model: float16 builds: the unquantized float32 export. It is the reference when
            transformers is missing, and the baseline of the `fp16_kl`, `fp16_top1_agreement`
            and `fp16_logit_abs_diff` metrics: how far `reference_model` (the unquantized
            float16 export) drifts from float32.
        thresholds: `max_<metric>` / `min_<metric>` bounds (already filtered to those that
            apply to this build).
        quality: measure the quality block against `reference_model` (quantized builds: what
            quantization costs); otherwise it is measured against the validation reference.
        greedy_tokens: length of the greedy-agreement continuation.
        progress: called with a short status line.

    Returns:
        The report: `provider` (used), `requested_provider`, `reference` (`transformers`,
        `unquantized-fp32-export` or `unquantized-export`), the metrics of `compare_logits`,
        the `fp16_*` drift metrics (with `fp32_model`), `quality` (the block of
        `metrics.quality_report`), `thresholds`, `failures` and `passed`.

    Raises:
        InvalidInput: there is no reference (no transformers and no unquantized export).
    """
    import onnxruntime as ort

    say = progress or (lambda message: None)
    used = provider if provider in ort.get_available_providers() else CPU
    say(f"running on {used}")
    runner = DecoderRunner(model_path, used, provider_options if used == provider else None)
    logits = runner.teacher_forced(ids, progress)
    reference, kind, ref_runner = _first_reference(ids, reference_dir, fp32_model, say)
    # The unquantized export runs only when it is the reference, the quality baseline or the
    # float16 graph whose drift from float32 is measured.
    needed = reference is None or quality or fp32_model is not None
    export = DecoderRunner(reference_model, CPU) if needed and reference_model else None
    export_logits = export.teacher_forced(ids) if export is not None else None
    if reference is None:
        if export is None:
            raise InvalidInput("validate: no reference (no transformers, no unquantized export)")
        reference, kind, ref_runner = export_logits, "unquantized-export", export

    report = {"requested_provider": provider, "provider": used, "reference": kind}
    report.update(compare_logits(logits, reference, ids))
    if fp32_model is not None and export_logits is not None:
        drift = compare_logits(export_logits, reference, ids)
        report.update({f"fp16_{k}": drift[k] for k in FP16_DRIFT})
    say("quality report")
    if quality and export is not None:
        baseline = (export_logits, "unquantized-export", export)
    else:
        baseline = (reference, kind, ref_runner)
    report["quality"] = _quality(runner, logits, ids, used, baseline, greedy_tokens)
    report["thresholds"] = dict(thresholds or {})
    report["failures"] = check_thresholds(report, thresholds or {})
    report["passed"] = not report["failures"]
    return report


def _first_reference(ids, reference_dir, fp32_model, say):
    """(logits, kind, runner or None) of the transformers or float32-export reference, or
    (None, None, None) when neither is available."""
    if reference_dir is not None:
        say("transformers reference")
        logits = transformers_logits(reference_dir, ids)
        if logits is not None:
            return logits, "transformers", None
    if fp32_model is not None:
        fp32 = DecoderRunner(fp32_model, CPU)
        return fp32.teacher_forced(ids), "unquantized-fp32-export", fp32
    return None, None, None


def _quality(runner, logits, ids, provider, baseline, greedy_tokens) -> dict:
    """The quality block against `baseline` = (logits, kind, runner or None); greedy agreement
    needs a runner (a transformers reference gives none: its greedy keys are None)."""
    ref_logits, kind, ref_runner = baseline
    greedy = None
    if ref_runner is not None:
        prompt = ids[: min(len(ids), GREEDY_PROMPT_TOKENS)]
        greedy = (runner.greedy(prompt, greedy_tokens), ref_runner.greedy(prompt, greedy_tokens))
    return quality_report(logits, ref_logits, ids, reference=kind, provider=provider, greedy=greedy)
