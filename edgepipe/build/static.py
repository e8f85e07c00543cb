"""`edgepipe build` for static (NPU) profiles such as qnn-htp, on a machine without the NPU.

The stages of `edgepipe.build.run` with static parts:

* **export**: `edgepipe.stages.export.static` writes the prefill + decode graphs twice: with quantized
  weights (DequantizeLinear over int8/int4 codes) and in fp32 (the reference). Both cached.
* **export (QDQ)**: `edgepipe.stages.quantize.qdq.calibrate_and_quantize` runs the recipe's calibration text
  through the graphs and adds the activation QDQ pairs (16-bit for w8a16 / w4a16). Cached by
  the calibration text too.
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
from dataclasses import asdict
from pathlib import Path

from edgepipe.build.cache import ENTRY_FILE, StageCache, content_hash
from edgepipe.errors import BuildFailed
from edgepipe.stages.export.static import DECODE_FILE, PREFILL_FILE

FILES = (PREFILL_FILE, DECODE_FILE)
QNN = "QNNExecutionProvider"
# The modules whose code decides the static export's and the QDQ stage's bytes (and what they
# import from edgepipe, found by `edgepipe.build.run.export_modules`).
STATIC_EXPORT_ROOTS = (
    "edgepipe.stages.export.static",
    "edgepipe.stages.quantize.qdq",
    "edgepipe.arch.presets",
    "edgepipe.runtime.engines.static",
    "edgepipe.stages.lora",
)
GRAPH_EXTENSIONS = (".onnx", ".data")


def static_supported_here(profile) -> str | None:
    """Why a static profile cannot be built on this machine (None when it can)."""
    if profile.provider != "QNNExecutionProvider":
        return (
            f"profile {profile.name}: static graphs are built and verified for "
            f"QNNExecutionProvider only, not {profile.provider}"
        )
    if profile.qnn is None or profile.qnn.backend_type != "htp":
        return f"profile {profile.name}: qnn.backend_type must be htp for a static build"
    if importlib.util.find_spec("onnxruntime_qnn") is None:
        return (
            f"profile {profile.name}: verifying the graphs on the simulated HTP needs "
            "onnxruntime-qnn; install it with: pip install onnxruntime-qnn"
        )
    return None


def _static_quant(plan):
    from edgepipe.stages.quantize.qdq import StaticQuant

    return StaticQuant.from_resolved(plan.resolved)


def _export_key(plan, quant) -> dict:
    from edgepipe.build.run import build_code_hash

    return {
        "source": plan.source.identity(),
        "code": build_code_hash(STATIC_EXPORT_ROOTS),
        "graph_variant": "static",
        "chunk": plan.profile.prefill_chunk,
        "kv_capacity": plan.profile.kv_capacity,
        "quant": asdict(quant) if quant is not None else None,
    }


def _export(plan, quant, cache: StageCache, work: Path, name: str, report) -> tuple[Path, bool]:
    """The static export folder for `quant` (None = fp32), from the cache or exported now."""
    from edgepipe.stages.export.static import build_static_decoder

    key = cache.key("export", _export_key(plan, quant))
    hit = cache.lookup("export", key)
    if hit is not None:
        report(f"{name}: reused from the stage cache")
        return hit, True
    model_dir = plan.source.materialize(work, report)
    report(f"{name}: exporting the prefill and decode graphs")
    out = work / name
    build_static_decoder(
        model_dir,
        out,
        chunk=plan.profile.prefill_chunk,
        kv_capacity=plan.profile.kv_capacity,
        quant=quant,
        progress=lambda step, done, total: report(f"{name}: {step} {done}/{total}"),
        weights=plan.source.weights(model_dir),
    )
    shutil.copyfile(model_dir / "config.json", out / "config.json")
    cache.store("export", key, out)
    return out, False


def _qdq(plan, quant, export_dir: Path, cache: StageCache, work: Path, report) -> tuple[Path, dict]:
    """The calibrated QDQ graphs (cached by the export key and the calibration text)."""
    from edgepipe.build.run import _calibration_ids
    from edgepipe.stages.quantize.qdq import calibrate_and_quantize

    activation = plan.profile.qnn.activation_quantization
    key = cache.key(
        "qdq",
        {
            **_export_key(plan, quant),
            "calibration": content_hash(plan.recipe.calibration.read()),
            "calibration_tokens": plan.recipe.calibration.max_tokens,
            "activation_type": activation,
        },
    )
    hit = cache.lookup("qdq", key)
    if hit is not None:
        report("QDQ graphs reused from the stage cache")
        return hit, json.loads((hit / "qdq.json").read_text(encoding="utf-8"))
    config = json.loads((export_dir / "config.json").read_text(encoding="utf-8"))
    out = work / "qdq"
    record = calibrate_and_quantize(
        export_dir,
        out,
        _calibration_ids(plan, export_dir).tolist(),
        files=FILES,
        num_layers=int(config["num_hidden_layers"]),
        pad_token_id=_pad_id(export_dir),
        activation_type=activation,
        progress=report,
    )
    (out / "qdq.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    cache.store("qdq", key, out)
    return out, record


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


def build_static_into(plan, options, tmp: Path, result, stages, start: float) -> None:
    """`edgepipe.build.run._build_into` for a static profile (same stages, same result fields)."""
    from edgepipe.build.run import _applicable_thresholds, _evaluation_ids, package_build
    from edgepipe.stages.validate.graph_check import check_graph
    from edgepipe.stages.validate.static import validate_static

    cache = StageCache(options.cache_dir, enabled=options.use_cache)
    work = tmp / "work"
    work.mkdir()
    stages("source", plan.source.kind)
    quant = _static_quant(plan)
    stages("export")
    report = stages.sub("export")
    export_dir, result.cached = _export(plan, quant, cache, work, "export", report)
    reference_dir, _ = _export(plan, None, cache, work, "reference", report)
    qdq_dir, qdq_record = _qdq(plan, quant, export_dir, cache, work, report)

    config = json.loads((export_dir / "config.json").read_text(encoding="utf-8"))
    family = plan.recipe.resolve_family(config)
    vocab = int(config["vocab_size"])

    stages("optimize")
    artifact = tmp / "artifact"
    _assemble(export_dir, qdq_dir, artifact)
    optimization = {
        "level": plan.profile.optimization_level,
        "provider": plan.profile.provider,
        "applied": False,
        "reason": (
            "static QDQ graphs are compiled by the QNN provider (EPContext graphs); "
            "onnxruntime's CPU-side fusions would remove QDQ pairs the HTP needs"
        ),
    }

    stages("validate")
    # The profile's op set and dtypes first: cheap, and names an op the HTP compile would
    # only report as a failed partition.
    checks = {name: check_graph(artifact / name, plan.profile) for name in FILES}
    static_failures = [f"{name}: {f}" for name, c in checks.items() for f in c["failures"]]
    if static_failures:
        raise BuildFailed(f"{plan.name}: static check failed: " + "; ".join(static_failures))
    validation = validate_static(
        artifact,
        reference_dir,
        _evaluation_ids(plan, family, vocab),
        files=FILES,
        num_layers=int(config["num_hidden_layers"]),
        pad_token_id=_pad_id(export_dir),
        provider_options=plan.profile.session_provider_options(),
        thresholds=_applicable_thresholds(plan),
        progress=stages.sub("validate"),
    )
    validation["static_checks"] = {"passed": True, "graphs": checks}
    provider_check = {
        "provider": plan.profile.provider,
        "architecture": plan.profile.architecture,
        "ran_on": {"provider": f"{QNN} ({plan.profile.qnn.backend_type}, simulated)"},
        "provider_run": True,
        "note": (
            f"{plan.profile.provider} ran here with its {plan.profile.qnn.backend_type} backend "
            "in simulation (onnxruntime-qnn on x86-64): every node was placed on the HTP with "
            "CPU fallback disabled and its logits were checked. No Snapdragon device ran, so "
            "the build records no device timings."
        ),
    }
    validation["provider_run"] = True
    validation["provider_note"] = provider_check["note"]
    result.validation = validation
    result.quality = validation["quality"]
    if not validation["passed"]:
        raise BuildFailed(
            f"{plan.name}: validation failed on the simulated HTP against the fp32 reference: "
            + "; ".join(validation["failures"])
        )

    stages("package")
    qnn = plan.profile.qnn
    static = {
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
            "provider_check": provider_check,
        },
        static=static,
    )
    result.size_bytes = manifest["size_bytes"]
