"""`edgepipe build` for dynamic graphs (cpu, directml, cpu-arm64 ...): one `model.onnx` whose
KV cache grows with the sequence, run by onnxruntime-genai and `edgepipe.runtime`.

* **export**: `edgepipe.stages.export.dynamic` writes the graph, quantizing the weights as they
  stream through (GPTQ reads the calibration text). A quantized build also exports the
  unquantized graph, the reference its quality is measured against; a float16 build first
  exports a float32 graph for the fp16 guard (`Fp16Stage`). Every export is cached.
* **optimize**: `edgepipe.stages.optimize`, kept only when the logits stay the same.
* **validate**: the profile's op/dtype check, then `edgepipe.stages.validate.dynamic` against
  transformers (when installed) or the unquantized export.
* **package**: `edgepipe.build.shared.package_build`.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import shutil
from dataclasses import replace
from pathlib import Path

from edgepipe.build.cache import ENTRY_FILE, StageCache
from edgepipe.build.plan import BuildPlan
from edgepipe.build.shared import (
    MAX_EVAL_TOKENS,
    BuildResult,
    Report,
    StageProgress,
    applicable_thresholds,
    calibration_hash,
    calibration_ids,
    evaluation_ids,
    export_key,
    export_step,
    float16_bytes,
    model_facts,
    model_precision,
    package_build,
    summary_line,
)
from edgepipe.errors import BuildFailed

# The modules whose code decides the export's bytes; everything they import from edgepipe
# counts too (found by `edgepipe.build.cache.export_modules`).
EXPORT_ROOTS = ("edgepipe.stages.export.dynamic", "edgepipe.arch.presets", "edgepipe.stages.lora")
# Not part of a dynamic artifact: the source's config.json rides along in the export folder
# for the build's own use (`model_facts`), and the cache entry's index.
NOT_IN_ARTIFACT = (ENTRY_FILE, "config.json")
# `precision.target_kl` measures each group's sensitivity on this many calibration tokens: the
# ranking it needs settles long before the evaluation text's 256 (tiny-trained: same order).
SENSITIVITY_TOKENS = 128


def supported_here(plan: BuildPlan) -> str | None:
    """Why this build cannot be made here (None: it can).

    A provider that cannot run here (DirectML) is still built: the validate stage checks its
    graph statically and runs it on CPU (`edgepipe.stages.validate.graph_check`).
    """
    return None


def _export(
    plan: BuildPlan,
    quant,
    cache: StageCache,
    out: Path,
    report: Report,
    *,
    dtype: str | None = None,
    guard=None,
) -> tuple[Path, bool]:
    """The export folder for `quant` (None = unquantized): from the cache, or exported now.

    Args:
        dtype: activation dtype (default: the profile's; the fp16 guard's reference is fp32).
        guard: the `edgepipe.stages.export.fp16guard.Fp16Guard` of a float16 export.

    Returns:
        (folder, came_from_cache).
    """
    import numpy as np

    from edgepipe.stages.export.dynamic import build_decoder

    dtype = dtype or plan.activation_dtype
    calibrated = quant is not None and quant.needs_calibration
    inputs = export_key(
        plan,
        quant,
        EXPORT_ROOTS,
        activation_dtype=dtype,
        layout=plan.decoder_switches(),
        fp16_guard=guard.to_dict() if guard is not None and guard.active else None,
        # gptq reads calibration text: its content is part of what the export depends on.
        calibration=calibration_hash(plan) if calibrated else None,
        all_logits=False,
    )

    def export(model_dir: Path, folder: Path) -> None:
        report("exporting" + (" and quantizing" if quant is not None else ""))
        extra = {}
        if calibrated:
            ids = calibration_ids(plan, *model_facts(plan, model_dir))
            extra["calibration_ids"] = np.asarray(ids, dtype=np.int64)
        build_decoder(
            model_dir,
            folder,
            weights=plan.source.weights(model_dir),
            activation_dtype=dtype,
            quant=quant,
            all_logits=False,
            progress=lambda step, done, total: report(f"{step} {done}/{total}"),
            fp16_guard=guard,
            **plan.decoder_switches(),
            **extra,
        )

    return export_step(plan, cache, inputs, out, export, report)


class Fp16Stage:
    """The fp16 guard of a float16 build (`edgepipe.stages.export.fp16guard`): the unquantized
    float32 export, its activation maxima on the calibration text (the evaluation text when the
    recipe has none), and the `Fp16Guard` the profile's policy makes of them.

    Args:
        plan: the build.
        cache: the stage cache.
        work: the build's work folder.
        report: progress lines.
    """

    def __init__(self, plan: BuildPlan, cache: StageCache, work: Path, report: Report):
        from edgepipe.stages.export.fp16guard import activation_maxima, plan_guard

        self.policy = plan.profile.decoder.fp16_guard
        self.fp32_dir, _ = _export(plan, None, cache, work / "fp32", report, dtype="float32")
        facts = model_facts(plan, self.fp32_dir)
        if plan.recipe.calibration is not None:
            self.ids = calibration_ids(plan, *facts, limit=MAX_EVAL_TOKENS)
        else:
            self.ids = evaluation_ids(plan, *facts)
        report("measuring fp32 activation maxima")
        self.fp32_maxima = activation_maxima(self.fp32_dir / "model.onnx", self.ids)
        self.guard = plan_guard(self.fp32_maxima, self.policy)

    def record(self, fp16_dir: Path) -> dict:
        """The manifest record: maxima of the (guarded) unquantized float16 graph next to the
        float32 ones, on the same tokens."""
        from edgepipe.stages.export.fp16guard import activation_maxima, guard_casts, guard_report

        fp16_maxima = activation_maxima(fp16_dir / "model.onnx", self.ids)
        casts = guard_casts(fp16_dir / "model.onnx")
        return guard_report(self.fp32_maxima, fp16_maxima, self.guard, self.policy, casts)


def _meet_target_kl(
    plan: BuildPlan, cache: StageCache, work: Path, report: Report, reference_dir: Path, guard
) -> tuple[BuildPlan, dict]:
    """`precision.target_kl` (`edgepipe.build.target_kl`): the plan whose evaluation KL against
    the unquantized export meets the target, and the manifest's record of how it was chosen.

    Candidate plans measured on the evaluation text go through the stage cache (the chosen one
    is the build's export); the one-group sensitivity exports are scratch, removed once run.
    """
    from edgepipe.build.target_kl import choose_precision
    from edgepipe.stages.validate.metrics import compare_logits
    from edgepipe.stages.validate.runner import DecoderRunner

    facts = model_facts(plan, reference_dir)
    texts = {"evaluation": evaluation_ids(plan, *facts)}
    texts["calibration"] = (
        calibration_ids(plan, *facts, limit=SENSITIVITY_TOKENS)
        if plan.recipe.calibration is not None
        else texts["evaluation"][:SENSITIVITY_TOKENS]
    )
    reference = DecoderRunner(reference_dir / "model.onnx")
    expected = {text: reference.teacher_forced(ids) for text, ids in texts.items()}
    scratch = StageCache(cache.root, enabled=False)
    count = itertools.count()

    def measure(resolved, text: str) -> dict:
        trial = replace(plan, resolved=resolved)
        keep = text == "evaluation"
        out = work / f"target-kl-{next(count)}"
        folder, _ = _export(trial, trial.quant_plan(), cache if keep else scratch, out, report,
                            guard=guard)  # fmt: skip
        logits = DecoderRunner(folder / "model.onnx").teacher_forced(texts[text])
        shutil.rmtree(out, ignore_errors=True)  # a cached entry lives on in the cache
        return compare_logits(logits, expected[text], texts[text])

    config = json.loads((reference_dir / "config.json").read_text(encoding="utf-8"))
    float_weights = "fp32" if plan.activation_dtype == "float32" else "fp16"
    chosen, record = choose_precision(
        plan.resolved, config, measure, float_weights=float_weights, report=report
    )
    return replace(plan, resolved=chosen), record


def _plan_exports(plan: BuildPlan, quant, cache: StageCache, work: Path, report: Report, guard):
    """A quantized build's unquantized reference export, and the plan `precision.target_kl`
    chooses against it.

    Returns:
        (plan, its QuantPlan, the reference folder or None, the `target_kl` record or None).
    """
    if quant is None:
        return plan, quant, None, None
    reference_dir, _ = _export(plan, None, cache, work / "reference", report, guard=guard)
    if plan.resolved.target_kl is None:
        return plan, quant, reference_dir, None
    plan, target = _meet_target_kl(plan, cache, work, report, reference_dir, guard)
    return plan, plan.quant_plan(), reference_dir, target


def _transformers_reference(plan: BuildPlan, work: Path, report: Report) -> Path | None:
    """The source folder for a transformers reference (with an adapter: a merged copy, so the
    reference is the fine-tune), or None without torch + transformers
    (`pip install 'edgepipe[build]'`): validation then compares with the unquantized export."""
    if any(importlib.util.find_spec(m) is None for m in ("transformers", "torch")):
        return None
    return plan.source.reference_dir(work, report)


def _validate(
    plan, artifact, export_dir, reference_dir, fp16, quant, work, stages
) -> tuple[dict, dict]:
    """The validate stage: the profile's op/dtype check, then the logits against the reference.

    Returns:
        (validation report, provider-check record).

    Raises:
        BuildFailed: the op/dtype check failed.
    """
    from edgepipe.stages.validate.dynamic import validate_model
    from edgepipe.stages.validate.graph_check import check_graph, provider_status

    graph_checks = check_graph(artifact / "model.onnx", plan.profile)
    if not graph_checks["passed"]:
        failures = "; ".join(graph_checks["failures"])
        raise BuildFailed(f"{plan.name}: static check failed: " + failures)
    validation = validate_model(
        artifact / "model.onnx",
        evaluation_ids(plan, *model_facts(plan, export_dir)),
        provider=plan.profile.provider,
        provider_options=plan.profile.session_provider_options(),
        reference_dir=_transformers_reference(plan, work, stages.sub("validate")),
        reference_model=(reference_dir or export_dir) / "model.onnx",
        fp32_model=fp16.fp32_dir / "model.onnx" if fp16 is not None else None,
        thresholds=applicable_thresholds(plan),
        quality=quant is not None,
        progress=stages.sub("validate"),
    )
    validation["static_checks"] = graph_checks
    provider = provider_status(plan.profile, validation["provider"])
    validation["provider_run"], validation["provider_note"] = (
        provider["provider_run"],
        provider["note"],
    )
    return validation, provider


def _record_validation(
    plan: BuildPlan, result: BuildResult, validation: dict, export_dir: Path
) -> None:
    """Put the validation report and quality into `result`; raise BuildFailed if it failed."""
    result.validation = validation
    result.quality = validation["quality"]
    if not validation["passed"]:
        # Say where a reused export lives: a stale entry is then one `--no-cache` away.
        origin = f" (export reused from the stage cache: {export_dir})" if result.cached else ""
        raise BuildFailed(
            f"{plan.name}: validation failed against the {validation['reference']} reference: "
            + "; ".join(validation["failures"])
            + origin
        )


def _check_weights(plan: BuildPlan, artifact: Path, export_dir: Path, resolved) -> dict:
    """The artifact's weights against the precision the manifest will record, each stored
    once (`edgepipe.stages.validate.precision_check.check_artifact_weights`).

    Raises:
        BuildFailed: they disagree.
    """
    from edgepipe.arch.families import read_config
    from edgepipe.stages.validate.precision_check import check_artifact_weights

    cfg = read_config(export_dir)
    try:
        return check_artifact_weights(artifact / "model.onnx", resolved, cfg, plan.activation_dtype)
    except BuildFailed as exc:
        raise BuildFailed(f"{plan.name}: {exc}") from exc


def build_into(
    plan: BuildPlan,
    cache: StageCache,
    tmp: Path,
    result: BuildResult,
    stages: StageProgress,
    start: float,
) -> None:
    """Run every stage of a dynamic build inside `tmp`, leaving the artifact in `tmp/artifact`.

    Args:
        plan: the build.
        cache: the stage cache.
        tmp: the build's temp folder (work files and the artifact).
        result: filled in as the stages run (`cached`, `validation`, `quality`, `size_bytes`).
        stages: stage timing and progress.
        start: when the build started (`time.perf_counter()`), for the manifest's wall time.

    Raises:
        BuildFailed: a check or a threshold failed.
    """
    from edgepipe.stages.optimize import optimize_model
    from edgepipe.stages.package import decoder_record

    work = tmp / "work"
    work.mkdir()
    stages("source", plan.source.kind)
    quant = plan.quant_plan()
    stages("export")
    report = stages.sub("export")
    fp16 = Fp16Stage(plan, cache, work, report) if plan.activation_dtype == "float16" else None
    guard = fp16.guard if fp16 is not None else None
    plan, quant, reference_dir, target = _plan_exports(plan, quant, cache, work, report, guard)
    export_dir, result.cached = _export(plan, quant, cache, work / "export", report, guard=guard)

    stages("optimize")
    artifact = tmp / "artifact"
    optimization = optimize_model(
        export_dir,
        artifact,
        provider=plan.profile.provider,
        level=plan.profile.optimization_level,
        tolerance=1e-3 if plan.activation_dtype == "float32" else 2e-2,
        exclude=NOT_IN_ARTIFACT,
        progress=stages.sub("optimize"),
    )

    stages("validate")
    validation, provider = _validate(
        plan, artifact, export_dir, reference_dir, fp16, quant, work, stages
    )
    fp16_record = fp16.record(reference_dir or export_dir) if fp16 is not None else None
    if target is not None:
        validation["quality"]["groups"] = target["groups"]
    _record_validation(plan, result, validation, export_dir)
    resolved = model_precision(plan, export_dir)
    validation["precision_check"] = _check_weights(plan, artifact, export_dir, resolved)

    stages("package")
    family, _ = model_facts(plan, export_dir)
    manifest = package_build(
        plan,
        artifact,
        family,
        result,
        start,
        {
            "validation": validation,
            "quality": result.quality,
            "optimization": optimization,
            "provider_check": provider,
            "fp16_guard": fp16_record,
            "target_kl": target,
            "decoder": decoder_record(artifact / "model.onnx"),
        },
        resolved,
    )
    result.size_bytes = manifest["size_bytes"]
    fp16_bytes = float16_bytes(reference_dir or export_dir, plan.activation_dtype)
    result.summary = summary_line(plan, result, fp16_bytes)
