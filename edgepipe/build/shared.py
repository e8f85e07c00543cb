"""What both build variants (`edgepipe.build.dynamic`, `edgepipe.build.static`) share: the
build's result and progress records, the tokenized texts, the thresholds that apply, the cached
export step and the package step.

Neither variant imports the other or `edgepipe.build.run`; what they have in common lives here.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgepipe.arch.families import family_mismatch
from edgepipe.arch.tokenizer import build_qwen_tokenizer
from edgepipe.build.cache import StageCache, build_code_hash, content_hash
from edgepipe.build.plan import BuildPlan
from edgepipe.errors import InvalidInput
from edgepipe.process import peak_rss_bytes
from edgepipe.schema.precision import ResolvedPrecision

# Evaluation text is cut to this many tokens unless the recipe asks for fewer: validation runs
# the artifact token by token, and 256 tokens already separate a good build from a broken one.
MAX_EVAL_TOKENS = 256
# Fewest tokens an evaluation or calibration text may give: one token scores nothing and passes
# every quality gate; 16 is also the prompt of the greedy comparison.
MIN_TEXT_TOKENS = 16
STAGES = ("source", "export", "optimize", "validate", "package")

Report = Callable[[str], None]


@dataclass
class BuildResult:
    """The outcome of one recipe × profile build (what `--json` prints per build).

    Attributes:
        recipe, profile: names.
        status: `built`, `failed` (a stage or a threshold failed: exit 1) or `invalid` (bad
            input found during the build: exit 2).
        artifact: the published folder (None unless built).
        precision: weight precision built.
        size_bytes: total artifact size.
        seconds: wall time.
        stage_seconds: wall time per stage.
        stage_peak_rss_mb: the process's peak RSS (MiB) at the end of each stage (None where
            the platform cannot tell).
        cached: the export came from the stage cache.
        quality: the quality metrics (vs the unquantized export for quantized builds, else vs
            the validation reference).
        validation: the full validation report.
        error: what went wrong (None when built).
        summary: the one line a user reads first (`summary_line`), None when not built.
    """

    recipe: str
    profile: str
    status: str = "failed"
    artifact: str | None = None
    precision: str | None = None
    size_bytes: int | None = None
    seconds: float = 0.0
    cached: bool = False
    stage_seconds: dict = field(default_factory=dict)
    stage_peak_rss_mb: dict = field(default_factory=dict)
    quality: dict | None = None
    validation: dict | None = None
    error: str | None = None
    summary: str | None = None


class StageProgress:
    """Times the stages of one build and reports each step to the caller's callback.

    Args:
        plan: the build.
        callback: `(build name, stage, message)`, or None.
    """

    def __init__(self, plan: BuildPlan, callback: Callable[[str, str, str], None] | None):
        self.plan, self.callback = plan, callback
        self.seconds: dict[str, float] = {}
        self.peak_rss_mb: dict[str, float | None] = {}
        self._current: str | None = None
        self._since = time.perf_counter()

    def __call__(self, stage: str, message: str = "") -> None:
        """Enter `stage` (one of STAGES, `done` or `failed`) or report a step within it."""
        if stage != self._current and (stage in STAGES or stage in ("done", "failed")):
            now = time.perf_counter()
            if self._current is not None:
                spent = self.seconds.get(self._current, 0.0) + now - self._since
                self.seconds[self._current] = round(spent, 3)
                # The process's peak so far: where it jumps is the stage that needs the memory.
                peak = peak_rss_bytes()
                self.peak_rss_mb[self._current] = None if peak is None else round(peak / 2**20, 1)
            self._current, self._since = stage, now
        if self.callback is not None:
            self.callback(self.plan.name, stage, message)

    def sub(self, stage: str) -> Report:
        """A one-argument reporter for steps of `stage` (what the stages' `progress` takes)."""
        return lambda message: self(stage, message)


def as_plain(value: Any) -> Any:
    """A pydantic model (or nested models) as plain dicts/lists; other values unchanged."""
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {k: as_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [as_plain(v) for v in value]
    return value


# ----------------------------------------------------------------------------- texts


def model_facts(plan: BuildPlan, folder: Path) -> tuple[str, int]:
    """(tokenizer family, vocabulary size) from the `config.json` in `folder`: the source
    model's, which every export folder carries a copy of (see `export_step`)."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    family = plan.recipe.resolve_family(config)
    mismatch = family_mismatch(family, config)
    if mismatch:
        raise InvalidInput(f"{plan.recipe.name}: family: {mismatch}")
    return family, int(config["vocab_size"])


def model_precision(plan: BuildPlan, folder: Path) -> ResolvedPrecision:
    """The build's precision as its model gets it (`ResolvedPrecision.for_model`: a tied
    model's one table), from the `config.json` in `folder`: what the manifest records."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    tied = bool(config.get("tie_word_embeddings", False))
    return plan.resolved.for_model(tied, plan.profile.graph_variant)


def _text_ids(plan: BuildPlan, which: str, family: str, vocab_size: int, limit: int) -> list[int]:
    """The recipe's `which` text (`evaluation` or `calibration`) as at most `limit` token ids."""
    sample = getattr(plan.recipe, which)
    tokens = build_qwen_tokenizer(family).encode(sample.read(), add_special_tokens=False)
    ids = tokens.ids[: min(sample.max_tokens, limit)]
    if len(ids) < MIN_TEXT_TOKENS:
        raise InvalidInput(
            f"{plan.recipe.name}: {which}: the text gives {len(ids)} tokens; at least "
            f"{MIN_TEXT_TOKENS} are needed to measure anything (a longer text, or builtin: prose)"
        )
    # Tiny test models may have a smaller vocabulary than the real tokenizer.
    return [i % vocab_size for i in ids]


def evaluation_ids(plan: BuildPlan, family: str, vocab_size: int) -> list[int]:
    """The recipe's evaluation text as token ids, cut to its `max_tokens` and MAX_EVAL_TOKENS.

    Raises:
        InvalidInput: the text gives fewer than MIN_TEXT_TOKENS tokens.
    """
    return _text_ids(plan, "evaluation", family, vocab_size, MAX_EVAL_TOKENS)


def calibration_ids(
    plan: BuildPlan, family: str, vocab_size: int, limit: int | None = None
) -> list[int]:
    """The recipe's calibration text as token ids, cut to its `max_tokens` (and `limit`).

    GPTQ and the static QDQ calibration take all `max_tokens`; the fp16 guard, which runs the
    graph token by token, takes MAX_EVAL_TOKENS.

    Raises:
        InvalidInput: the text gives fewer than MIN_TEXT_TOKENS tokens.
    """
    return _text_ids(
        plan, "calibration", family, vocab_size, limit or plan.recipe.calibration.max_tokens
    )


def calibration_hash(plan: BuildPlan) -> str:
    """sha256 of the calibration text: part of the key of every stage that reads it."""
    return content_hash(plan.recipe.calibration.read())


def applicable_thresholds(plan: BuildPlan) -> dict:
    """The recipe's thresholds that apply to this build: the logit-difference bound only to
    all-fp32 builds (quantized or fp16 logits legitimately differ), cosine only to static
    graphs (the schema says so), the fp16 KL only to float16 graphs."""
    thresholds = dict(as_plain(plan.recipe.validation))
    r = plan.resolved
    fp32 = (
        plan.activation_dtype == "float32"
        and r.weights == r.embedding == r.lm_head == "fp32"
        and not r.overrides
    )
    if not fp32:
        thresholds.pop("max_logit_abs_diff", None)
    if plan.profile.graph_variant != "static":
        thresholds.pop("min_cosine", None)
    if plan.activation_dtype != "float16":
        thresholds.pop("max_fp16_kl", None)
    return thresholds


def float16_bytes(export_dir: Path, activation_dtype: str) -> int:
    """What the weights of the unquantized export in `export_dir` take at 16 bits per weight."""
    data = sum(p.stat().st_size for p in export_dir.glob("*.onnx*"))
    return data // 2 if activation_dtype == "float32" else data


def summary_line(plan: BuildPlan, result: BuildResult, fp16_bytes: int | None) -> str:
    """`recipe@profile int4: KL 0.011, top-1 0.95, 23.4 MiB (0.30x fp16)`: what a build's
    quality and size come to, in one line (quality: against the unquantized export)."""
    q = result.quality or {}
    parts = []
    if q.get("kl") is not None:
        parts.append(f"KL {q['kl']:.4f}")
    if q.get("top1_agreement") is not None:
        parts.append(f"top-1 {q['top1_agreement']:.3f}")
    if result.size_bytes is not None:
        size = f"{result.size_bytes / 2**20:.1f} MiB"
        if fp16_bytes:
            size += f" ({result.size_bytes / fp16_bytes:.2f}x fp16)"
        parts.append(size)
    return f"{plan.name} {plan.precision}: " + ", ".join(parts)


# ----------------------------------------------------------------------------- cached steps


def export_key(plan: BuildPlan, quant: Any, roots: tuple[str, ...], **fields: Any) -> dict:
    """The export cache key's inputs: the source identity, the exporter's code, the graph
    variant and the quantization, plus the variant's own `fields`.

    Args:
        plan: the build.
        quant: the variant's quantization dataclass (None = unquantized).
        roots: the modules whose code decides the export's bytes (see `build_code_hash`).
        fields: the variant's other inputs (dtype, layout, chunk ...).
    """
    return {
        "source": plan.source.identity(),
        "code": build_code_hash(roots),
        "graph_variant": plan.profile.graph_variant,
        "quant": asdict(quant) if quant is not None else None,
        **fields,
    }


def cached_step(
    cache: StageCache,
    stage: str,
    inputs: Mapping,
    out: Path,
    produce: Callable[[Path], None],
    report: Report,
    label: str = "",
) -> tuple[Path, bool]:
    """The output folder of a cached stage: the verified cache entry, or `produce(out)` now.

    Args:
        cache: the stage cache.
        stage: the cache's stage name (`export`, `qdq`).
        inputs: everything that decides the output (hashed into the key).
        out: where `produce` writes on a miss.
        produce: writes the stage's output folder.
        report: progress lines.
        label: what the progress line calls the output ("" = the stage's output).

    Returns:
        (folder, came_from_cache).
    """
    key = cache.key(stage, inputs)
    hit = cache.lookup(stage, key)
    if hit is not None:
        report(f"{label}: reused from the stage cache" if label else "reused from the stage cache")
        return hit, True
    produce(out)
    # A cache that cannot be written returns None: that only costs a rebuild next time.
    cache.store(stage, key, out)
    return out, False


def export_step(
    plan: BuildPlan,
    cache: StageCache,
    inputs: Mapping,
    out: Path,
    export: Callable[[Path, Path], None],
    report: Report,
    label: str = "",
) -> tuple[Path, bool]:
    """The export folder: from the cache, else the source materialized and `export(model_dir,
    out)` run now. The folder also gets the source's `config.json`, so later stages read the
    model's facts (`model_facts`) without materializing the source again.

    Returns:
        (folder, came_from_cache).
    """

    def produce(folder: Path) -> None:
        model_dir = plan.source.materialize(folder.parent, report)
        export(model_dir, folder)
        shutil.copyfile(model_dir / "config.json", folder / "config.json")

    return cached_step(cache, "export", inputs, out, produce, report, label)


# ----------------------------------------------------------------------------- package


def package_build(
    plan: BuildPlan,
    artifact: Path,
    family: str,
    result: BuildResult,
    start: float,
    reports: dict,
    resolved: ResolvedPrecision,
    **extra: Any,
) -> dict:
    """`edgepipe.stages.package.package_artifact` with what every build variant records the
    same way: recipe, profile (with its session provider options), source identity, the export
    record and the wall time since `start`; `reports` and `extra` hold the variant's own parts.
    `resolved` is the precision the graph holds (`model_precision`).

    Returns:
        The manifest.
    """
    from edgepipe.stages.package import package_artifact

    return package_artifact(
        artifact,
        recipe=as_plain(plan.recipe),
        profile={
            **as_plain(plan.profile),
            "provider_options": plan.profile.session_provider_options(),
        },
        family=family,
        precision=plan.precision,
        source={"kind": plan.source.kind, **plan.source.identity()},
        reports={
            **reports,
            "export": {"cached": result.cached, "resolved_precision": as_plain(resolved)},
        },
        build_seconds=time.perf_counter() - start,
        **extra,
    )
