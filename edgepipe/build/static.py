"""`edgepipe build` for static (NPU) profiles such as qnn-htp, on a machine without the NPU.

The stages of `edgepipe.build.dynamic`, with static parts:

* **export**: `edgepipe.stages.export.static` writes the prefill + decode graphs twice: with
  quantized weights (DequantizeLinear over int8/int4 codes) and in fp32 (the reference). Both
  cached.
* **export (QDQ)**: `edgepipe.stages.quantize.qdq.calibrate_and_quantize` runs the recipe's
  calibration text through the graphs and adds the activation QDQ pairs (16-bit for w8a16 /
  w4a16). Cached by the calibration text too.
* **optimize**: nothing is rewritten: the QNN provider compiles the QDQ graphs itself, and
  onnxruntime's CPU-side fusions would remove QDQ pairs the HTP needs.
* **validate**: `edgepipe.stages.validate.static` compiles both graphs on the simulated HTP with CPU
  fallback disabled (writing the EPContext graphs), compares logits with the fp32 graphs, and
  reloads the EPContext graphs.
* **package**: as for dynamic artifacts, plus the manifest's `static` section (chunk, capacity,
  graphs, weight and activation quantization, EPContext graphs).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

from edgepipe.build.cache import ENTRY_FILE, StageCache
from edgepipe.build.plan import BuildPlan
from edgepipe.build.shared import (
    BuildResult,
    Report,
    StageProgress,
    applicable_thresholds,
    cached_step,
    calibration_hash,
    calibration_ids,
    evaluation_ids,
    export_key,
    export_step,
    model_facts,
    model_precision,
    package_build,
)
from edgepipe.errors import BuildFailed
from edgepipe.stages.export.static import DECODE_FILE, PREFILL_FILE

FILES = (PREFILL_FILE, DECODE_FILE)
# The modules whose code decides the static export's and the QDQ stage's bytes (and what they
# import from edgepipe, found by `edgepipe.build.cache.export_modules`).
STATIC_EXPORT_ROOTS = (
    "edgepipe.stages.export.static",
    "edgepipe.stages.quantize.qdq",
    "edgepipe.arch.presets",
    "edgepipe.runtime.engines.static",
)
GRAPH_EXTENSIONS = (".onnx", ".data")
QNN = "QNNExecutionProvider"
# Why the optimize stage leaves static graphs alone (the manifest's optimization record).
NOT_OPTIMIZED = (
    "static QDQ graphs are compiled by the QNN provider (EPContext graphs); "
    "onnxruntime's CPU-side fusions would remove QDQ pairs the HTP needs"
)


def supported_here(plan: BuildPlan) -> str | None:
    """Why a static build cannot be made on this machine (None when it can)."""
    profile = plan.profile
    if profile.provider != QNN:
        return (
            f"profile {profile.name}: static graphs are built and verified for "
            f"{QNN} only, not {profile.provider}"
        )
    if profile.qnn is None or profile.qnn.backend_type != "htp":
        return f"profile {profile.name}: qnn.backend_type must be htp for a static build"
    if importlib.util.find_spec("onnxruntime_qnn") is None:
        return (
            f"profile {profile.name}: verifying the graphs on the simulated HTP needs "
            "onnxruntime-qnn; install it with: pip install onnxruntime-qnn"
        )
    return None


def _export_inputs(plan: BuildPlan, quant) -> dict:
    return export_key(
        plan,
        quant,
        STATIC_EXPORT_ROOTS,
        chunk=plan.profile.prefill_chunk,
        kv_capacity=plan.profile.kv_capacity,
    )


def _export(plan: BuildPlan, quant, cache: StageCache, work: Path, name: str, report: Report):
    """The static export folder for `quant` (None = fp32), from the cache or exported now."""
    from edgepipe.stages.export.static import build_static_decoder

    def export(model_dir: Path, out: Path) -> None:
        report(f"{name}: exporting the prefill and decode graphs")
        build_static_decoder(
            model_dir,
            out,
            chunk=plan.profile.prefill_chunk,
            kv_capacity=plan.profile.kv_capacity,
            quant=quant,
            progress=lambda step, done, total: report(f"{name}: {step} {done}/{total}"),
        )

    inputs = _export_inputs(plan, quant)
    return export_step(plan, cache, inputs, work / name, export, report, label=name)


def _qdq(plan: BuildPlan, quant, export_dir: Path, cache: StageCache, work: Path, report):
    """The calibrated QDQ graphs and their record (cached by the export key and the
    calibration text)."""
    from edgepipe.stages.quantize.qdq import calibrate_and_quantize

    activation = plan.profile.qnn.activation_quantization
    inputs = {
        **_export_inputs(plan, quant),
        "calibration": calibration_hash(plan),
        "calibration_tokens": plan.recipe.calibration.max_tokens,
        "activation_type": activation,
    }

    def produce(out: Path) -> None:
        config = json.loads((export_dir / "config.json").read_text(encoding="utf-8"))
        record = calibrate_and_quantize(
            export_dir,
            out,
            calibration_ids(plan, *model_facts(plan, export_dir)),
            files=FILES,
            num_layers=int(config["num_hidden_layers"]),
            pad_token_id=_pad_id(export_dir),
            activation_type=activation,
            progress=report,
        )
        (out / "qdq.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

    folder, _ = cached_step(cache, "qdq", inputs, work / "qdq", produce, report, "QDQ graphs")
    return folder, json.loads((folder / "qdq.json").read_text(encoding="utf-8"))


def _pad_id(folder: Path) -> int:
    genai = json.loads((folder / "genai_config.json").read_text(encoding="utf-8"))
    return int(genai["model"]["pad_token_id"])


def _assemble(export_dir: Path, qdq_dir: Path, artifact: Path) -> None:
    """The artifact folder: the QDQ graphs and their shared data, plus the export's other files."""
    artifact.mkdir(parents=True)
    for path in sorted(qdq_dir.iterdir()):
        if path.suffix in GRAPH_EXTENSIONS:
            shutil.copy2(path, artifact / path.name)
    for path in sorted(export_dir.iterdir()):
        if path.is_file() and path.suffix not in GRAPH_EXTENSIONS and path.name != ENTRY_FILE:
            shutil.copy2(path, artifact / path.name)


def _validate(
    plan: BuildPlan, artifact: Path, export_dir: Path, reference_dir: Path, stages
) -> tuple[dict, dict]:
    """The validate stage: the profile's op/dtype check of both graphs, then the simulated HTP
    against the fp32 graphs.

    Returns:
        (validation report, provider-check record).

    Raises:
        BuildFailed: the op/dtype check failed.
    """
    from edgepipe.stages.validate.graph_check import check_graph, provider_status
    from edgepipe.stages.validate.static import validate_static

    # The profile's op set and dtypes first: cheap, and names an op the HTP compile would
    # only report as a failed partition.
    checks = {name: check_graph(artifact / name, plan.profile) for name in FILES}
    failures = [f"{name}: {f}" for name, c in checks.items() for f in c["failures"]]
    if failures:
        raise BuildFailed(f"{plan.name}: static check failed: " + "; ".join(failures))
    config = json.loads((export_dir / "config.json").read_text(encoding="utf-8"))
    validation = validate_static(
        artifact,
        reference_dir,
        evaluation_ids(plan, *model_facts(plan, export_dir)),
        files=FILES,
        num_layers=int(config["num_hidden_layers"]),
        pad_token_id=_pad_id(export_dir),
        provider_options=plan.profile.session_provider_options(),
        thresholds=applicable_thresholds(plan),
        progress=stages.sub("validate"),
    )
    validation["static_checks"] = {"passed": True, "graphs": checks}
    # Validation compiled every node for the HTP with CPU fallback disabled: the provider ran.
    provider = provider_status(plan.profile, QNN, simulated_backend=plan.profile.qnn.backend_type)
    validation["provider_run"] = provider["provider_run"]
    validation["provider_note"] = provider["note"]
    return validation, provider


def _static_section(plan: BuildPlan, quant, qdq_record: dict, validation: dict) -> dict:
    """The manifest's `static` section (see docs/contracts.md)."""
    qnn = plan.profile.qnn
    return {
        "chunk": plan.profile.prefill_chunk,
        "kv_capacity": plan.profile.kv_capacity,
        "graphs": dict(zip(("prefill", "decode"), FILES, strict=True)),
        "weights": {
            "body": quant.weights.label,
            "embedding": f"int{quant.embedding.bits}/tensor",
            "lm_head": quant.lm_head.label,
        },
        "activations": qdq_record,
        "ep_context": {
            "graphs": validation["ep_context"]["graphs"],
            "binaries": validation["ep_context"]["binaries"],
            "backend_type": qnn.backend_type,
            "soc_model": qnn.soc_model,
            "htp_arch": qnn.htp_arch,
            "weight_sharing": "onnx (one model.onnx.data); one context binary per graph",
        },
    }


def build_into(
    plan: BuildPlan,
    cache: StageCache,
    tmp: Path,
    result: BuildResult,
    stages: StageProgress,
    start: float,
) -> None:
    """Run every stage of a static build inside `tmp`, leaving the artifact in `tmp/artifact`
    (the same stages and result fields as `edgepipe.build.dynamic.build_into`).

    Raises:
        BuildFailed: a check or a threshold failed.
    """
    from edgepipe.stages.quantize.qdq import StaticQuant

    work = tmp / "work"
    work.mkdir()
    stages("source", plan.source.kind)
    quant = StaticQuant.from_resolved(plan.resolved)
    stages("export")
    report = stages.sub("export")
    export_dir, result.cached = _export(plan, quant, cache, work, "export", report)
    reference_dir, _ = _export(plan, None, cache, work, "reference", report)
    qdq_dir, qdq_record = _qdq(plan, quant, export_dir, cache, work, report)

    stages("optimize")
    artifact = tmp / "artifact"
    _assemble(export_dir, qdq_dir, artifact)
    optimization = {
        "level": plan.profile.optimization_level,
        "provider": plan.profile.provider,
        "applied": False,
        "reason": NOT_OPTIMIZED,
    }

    stages("validate")
    validation, provider = _validate(plan, artifact, export_dir, reference_dir, stages)
    result.validation = validation
    result.quality = validation["quality"]
    if not validation["passed"]:
        raise BuildFailed(
            f"{plan.name}: validation failed on the simulated HTP against the fp32 reference: "
            + "; ".join(validation["failures"])
        )

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
        },
        model_precision(plan, export_dir),
        static=_static_section(plan, quant, qdq_record, validation),
    )
    result.size_bytes = manifest["size_bytes"]
