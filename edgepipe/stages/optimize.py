"""The optimize stage: a clean external-data layout, and ONNX Runtime's offline graph optimization.

Two steps, each from an input folder to a new output folder (the input is never edited):

1. **Layout**: unused nodes and initializers are removed (onnx-ir's dead-code pass) and every
   weight goes to one external file `model.onnx.data`, written in graph order, so the same
   graph always gives the same bytes.
   A weight two initializers share (a tied table) is stored once (`share_duplicates`).
2. **ORT offline optimization** at the profile's level, saved through
   `SessionOptions.optimized_model_filepath` with the initializers in one external file
   (`session.optimized_model_external_initializers_file_name`). Only the CPU provider's
   optimized graphs are saved: other providers' (DirectML, QNN) would contain
   provider-specific rewrites or compiled contexts, so their sessions optimize at load time.

The optimized graph is kept only if it still loads, gives the same logits as the unoptimized
one on a probe input, is not slower, and (when onnxruntime-genai is importable) still loads in
onnxruntime-genai; otherwise the layout-only graph is kept and the reason goes to the manifest.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgepipe.errors import BuildFailed, InvalidInput
from edgepipe.formats.external_data import share_duplicates
from edgepipe.stages.validate.runner import CPU, DecoderRunner, quiet_options

MODEL = "model.onnx"
DATA = "model.onnx.data"

# Profile level names (and the ORT enum names) -> onnxruntime.GraphOptimizationLevel member.
LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "layout": "ORT_ENABLE_LAYOUT",
    "all": "ORT_ENABLE_ALL",
}
# Probe: a short prefill then decode steps; enough to exercise attention with a KV cache.
# Small ids, valid for any vocabulary (tiny test models have a few hundred tokens).
PROBE_IDS = [9, 8, 7, 6, 5, 4, 3, 2]
# An optimized graph slower than this factor of the unoptimized one is not kept. Only judged
# when the probe takes long enough to measure: a millisecond probe is all scheduler noise, and
# a coin-flip decision would break byte-identical rebuilds.
SLOWER_FACTOR = 1.25
MIN_TIMED_SECONDS = 0.05


def level_name(level) -> str:
    """Normalize a profile's optimization level (`basic`, `ORT_ENABLE_ALL`, 99, ...).

    Raises:
        InvalidInput: unknown level, naming the allowed values.
    """
    if level is None:
        return "extended"
    if isinstance(level, int):
        by_int = {0: "disable", 1: "basic", 2: "extended", 3: "layout", 99: "all"}
        if level in by_int:
            return by_int[level]
    text = str(level).strip().lower()
    for name, enum in LEVELS.items():
        if text in (name, enum.lower()):
            return name
    raise InvalidInput(
        f"profile optimization level: unknown value {level!r}; allowed values: {sorted(LEVELS)}"
    )


def clean_layout(
    src_dir: Path, dst_dir: Path, model_name: str = MODEL, exclude: tuple[str, ...] = ()
) -> int:
    """Copy `src_dir` to `dst_dir` with the model's unused initializers removed and every
    weight in one `model.onnx.data`. Files named in `exclude` are not copied.

    Weights that several initializers hold (a tied model's quantized table, viewed 2-D by
    GatherBlockQuantized and 3-D by MatMulNBits) are stored once: onnx-ir's `save`, like
    onnxruntime's optimizer before it, writes each initializer on its own, and
    `share_duplicates` points the copies back at one region.

    Returns:
        The number of initializers removed.
    """
    import onnx_ir as ir
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    dst_dir.mkdir(parents=True, exist_ok=True)
    for path in sorted(src_dir.iterdir()):
        if path.is_file() and path.suffix not in (".onnx", ".data") and path.name not in exclude:
            shutil.copy2(path, dst_dir / path.name)
    model = ir.load(src_dir / model_name)
    before = len(model.graph.initializers)
    RemoveUnusedNodesPass()(model)
    removed = before - len(model.graph.initializers)
    # Weights external; small tensors (axes, shapes) inline, since onnxruntime's shape
    # inference cannot read external data and refuses such graphs.
    ir.save(model, dst_dir / MODEL, external_data=DATA, size_threshold_bytes=1024, max_workers=1)
    share_duplicates(dst_dir / MODEL)
    return removed


def ort_optimize(src: Path, dst_dir: Path, level: str) -> Path:
    """onnxruntime's offline optimization of `src` at `level`, saved into `dst_dir`.

    Args:
        src: the model to optimize.
        dst_dir: the output folder (created); it gets `model.onnx` and one `model.onnx.data`.
        level: a `LEVELS` name.

    Returns:
        The saved `model.onnx`.
    """
    import onnxruntime as ort

    dst_dir.mkdir(parents=True, exist_ok=True)
    options = quiet_options()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[level])
    options.optimized_model_filepath = str(dst_dir / MODEL)
    options.add_session_config_entry(
        "session.optimized_model_external_initializers_file_name", DATA
    )
    # Small initializers (shape constants) inline, as ORT would otherwise; weights external.
    options.add_session_config_entry(
        "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
    )
    ort.InferenceSession(str(src), sess_options=options, providers=[CPU])
    return dst_dir / MODEL


def _probe(model: Path) -> tuple[np.ndarray, float]:
    """Logits of the probe (prefill + 4 decode steps) and the best prefill time of 3 runs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    runner = DecoderRunner(model, CPU, session_options=options)
    rows = []
    logits, past = runner.step(PROBE_IDS, runner.empty_past(), len(PROBE_IDS))
    rows.append(logits[0, -1])
    total = len(PROBE_IDS)
    for token in (10, 11, 12, 13):
        total += 1
        logits, past = runner.step([token], past, total)
        rows.append(logits[0, -1])
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        runner.step(PROBE_IDS, runner.empty_past(), len(PROBE_IDS))
        best = min(best, time.perf_counter() - start)
    return np.stack(rows), best


def _genai_loads(folder: Path) -> str | None:
    """None when onnxruntime-genai loads `folder` (or is not installed), else the error."""
    if not (folder / "genai_config.json").is_file():
        return None
    try:
        import onnxruntime_genai as og
    except ImportError:
        return None
    try:
        og.Model(str(folder))
    except Exception as exc:  # genai raises RuntimeError or its own types
        return str(exc)
    return None


def optimize_model(
    src_dir: Path,
    dst_dir: Path,
    *,
    provider: str = CPU,
    level=None,
    tolerance: float = 1e-3,
    exclude: tuple[str, ...] = (),
    progress: Callable[[str], None] | None = None,
    optimizer: Callable[[Path, Path, str], Path] = ort_optimize,
) -> dict:
    """Write the optimized artifact model of `src_dir` into `dst_dir` (created).

    Args:
        src_dir: the export folder (`model.onnx`, `model.onnx.data`, `genai_config.json`, ...).
        dst_dir: the output folder; it gets every file of `src_dir`, the model rewritten.
        provider: the profile's execution provider.
        level: the profile's graph optimization level (see `level_name`).
        tolerance: largest probe-logit difference accepted, relative to the largest logit
            (fp32 graphs stay near 1e-6; fp16 graphs need about 1e-2).
        exclude: names of files in `src_dir` not to carry over (e.g. a cache entry's index).
        progress: called with a short status line.
        optimizer: (model, output folder, level) -> the optimized model it saved there;
            `ort_optimize` by default. Its result is kept only if it passes the checks of the
            module docstring.

    Returns:
        The manifest's `optimization` record: `level`, `provider`, `applied` (the ORT-optimized
        graph was kept), `reason` (why not, when not), `removed_initializers`, and the probe's
        `max_abs_logit_diff` and `prefill_seconds` before/after when measured.

    Raises:
        BuildFailed: the exported graph itself does not load in onnxruntime.
    """
    level = level_name(level)
    record = {"level": level, "provider": provider, "applied": False, "reason": None}
    with tempfile.TemporaryDirectory(dir=dst_dir.parent, prefix=".optimize-") as tmp:
        tmp = Path(tmp)
        if progress:
            progress("cleaning external-data layout")
        record["removed_initializers"] = clean_layout(src_dir, tmp / "clean", exclude=exclude)
        try:
            base_logits, base_time = _probe(tmp / "clean" / MODEL)
        except Exception as exc:
            raise BuildFailed(f"optimize: the exported graph does not run on CPU: {exc}") from exc

        chosen = tmp / "clean"
        if level == "disable":
            record["reason"] = "profile disables graph optimization"
        elif provider != CPU:
            record["reason"] = (
                f"offline optimized graphs are saved for {CPU} only; {provider} optimizes "
                "at session creation"
            )
        else:
            # Layout-level rewrites (NCHWc and friends) target the build machine's CPU: ORT
            # warns that such saved graphs only suit the machine that made them. Save at most
            # `extended`; the rest happens when the runtime creates its session.
            saved_level = "extended" if level in ("layout", "all") else level
            record["saved_level"] = saved_level
            if progress:
                progress(f"onnxruntime optimization ({saved_level})")
            chosen, reason = _try_optimized(
                tmp, optimizer, saved_level, (base_logits, base_time), tolerance, record
            )
            record["applied"] = reason is None
            record["reason"] = reason
        shutil.copytree(chosen, dst_dir)
    return record


def _try_optimized(tmp: Path, optimizer, level: str, base, tolerance, record):
    base_logits, base_time = base
    clean = tmp / "clean"
    try:
        saved = optimizer(clean / MODEL, tmp / "ort", level)
        final = tmp / "optimized"
        clean_layout(saved.parent, final)
        for path in clean.iterdir():  # genai_config.json, tokenizer files, ...
            if path.suffix not in (".onnx", ".data") and not (final / path.name).exists():
                shutil.copy2(path, final / path.name)
        logits, seconds = _probe(final / MODEL)
    except Exception as exc:  # ORT raises several unrelated types for graphs it cannot save
        return clean, f"optimized graph could not be saved or loaded: {exc}"
    diff = float(np.max(np.abs(logits - base_logits)))
    scale = max(1.0, float(np.max(np.abs(base_logits))))
    record["max_abs_logit_diff"] = diff
    record["prefill_seconds"] = {"unoptimized": base_time, "optimized": seconds}
    if not diff <= tolerance * scale:
        return clean, f"optimized graph changes logits (max abs diff {diff:.3g})"
    if base_time >= MIN_TIMED_SECONDS and seconds > SLOWER_FACTOR * base_time:
        return clean, f"optimized graph is slower ({seconds:.4f}s vs {base_time:.4f}s prefill)"
    genai_error = _genai_loads(final)
    if genai_error is not None:
        return clean, f"onnxruntime-genai cannot load the optimized graph: {genai_error}"
    return final, None
