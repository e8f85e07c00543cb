"""`edgepipe build`: source → export+quantize → optimize → validate → package, atomically.

Each build (one recipe for one profile) runs in a temporary folder inside OUT and its artifact
is renamed to `OUT/<recipe>/<profile>/` only when every stage passed (`edgepipe.build.publish`): a
failed or killed build leaves the previous artifact untouched.

The export result is cached (`edgepipe.build.cache`): an unchanged recipe re-validates and
re-packages, but does not re-export.
"""

from __future__ import annotations

import functools
import json
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgepipe.build.cache import ENTRY_FILE, StageCache, content_hash, sha256_file
from edgepipe.build.matrix import MatrixEntry, build_matrix, shard_slice
from edgepipe.build.publish import TMP_PREFIX, publish, sweep, tag
from edgepipe.errors import BuildFailed, EdgepipeError, InvalidInput
from edgepipe.stages.source import Source, as_plain, source_from_recipe

# Evaluation text is cut to this many tokens unless the recipe asks for fewer: validation runs
# the artifact token by token, and 256 tokens already separate a good build from a broken one.
MAX_EVAL_TOKENS = 256
STAGES = ("source", "export", "optimize", "validate", "package")


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
        stage_peak_rss_mb: the process's peak RSS (MiB) at the end of each stage.
        cached: the export came from the stage cache.
        quality: the quality metrics (vs the unquantized export for quantized builds, else vs
            the validation reference).
        validation: the full validation report.
        error: what went wrong (None when built).
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


@dataclass
class BuildOptions:
    """Options shared by every build of one `edgepipe build` call."""

    out_dir: Path = Path("dist")
    precision: str | None = None
    cache_dir: Path | None = None
    use_cache: bool = True
    progress: Callable[[str, str, str], None] | None = field(default=None, repr=False)


# ----------------------------------------------------------------------------- planning


@dataclass
class BuildPlan:
    """Everything one build needs, resolved from the recipe and the profile."""

    recipe: object  # edgepipe.schema.Recipe
    profile: object  # edgepipe.schema.DeviceProfile
    resolved: object  # edgepipe.schema.ResolvedPrecision
    source: Source
    recipe_arg: str = ""  # what the recipe was loaded from (a name or a path)
    profile_arg: str = ""  # what the profile was named by (-p value or a target)

    @property
    def name(self) -> str:
        return f"{self.recipe.name}@{self.profile.name}"

    @property
    def precision(self) -> str:
        return self.resolved.weights

    @property
    def activation_dtype(self) -> str:
        return self.profile.activation_dtype

    def quant_plan(self):
        """The `edgepipe.stages.quantize.plan.QuantPlan` of this build (None: nothing quantized)."""
        from edgepipe.stages.quantize.plan import QuantPlan

        r = self.resolved
        # The schema lets the FIRST matching override win, QuantPlan the LAST: reverse.
        overrides = [(o.pattern, o.weights, o.block_size) for o in reversed(r.overrides)]
        plan = QuantPlan.from_precision(
            r.weights,
            method=r.method,
            block_size=r.block_size or 32,
            symmetric=r.symmetric,
            accuracy_level=r.accuracy_level,
            embedding=r.embedding,
            lm_head=r.lm_head,
            exclude=list(r.exclude),
            overrides=overrides,
            has_calibration_text=self.recipe.calibration is not None,
        )
        return plan if plan.is_quantized else None

    def supported_here(self) -> str | None:
        """Why this build cannot be made yet (None when it can).

        A provider that cannot run here (DirectML) is still built: the validate stage checks
        its graph statically and runs it on CPU (`edgepipe.stages.validate.graph_check`). Static NPU graphs
        need onnxruntime-qnn to be validated (`edgepipe.build.static`).
        """
        if self.profile.graph_variant == "static":
            from edgepipe.build.static import static_supported_here

            return static_supported_here(self.profile)
        return None

    def layout(self) -> dict:
        """The profile's decoder layout as `build_decoder` keyword arguments."""
        d = self.profile.decoder
        return {
            "rotary_in_attention": d.rotary == "attention",
            "packed_qkv": d.qkv == "packed",
            "fused_bias": d.matmul_bias == "fused",
        }


def _with_precision(recipe, precision: str):
    """A copy of `recipe` whose weights precision is `precision` for every profile."""
    copy = recipe.model_copy(deep=True)
    copy.precision.weights = precision
    for part in copy.precision.profiles.values():
        part.weights = None
    return copy


def plan_builds(
    recipes: Sequence[str],
    profiles: Sequence[str] | None = None,
    precision: str | None = None,
    shard: tuple[int, int] | None = None,
) -> list[BuildPlan]:
    """Resolve the recipe × profile builds of one command line, checking all input first.

    Args:
        recipes: shipped recipe names or YAML paths.
        profiles: `-p` values (names or paths); None = each recipe's `targets`.
        precision: `--precision` override of the weights precision.
        shard: `(I, N)`: keep slice I of N of the sorted pairs (see `edgepipe.build.matrix`).

    Raises:
        InvalidInput: every problem found in the recipes and profiles, at once.
    """
    from edgepipe import schema

    problems: list[str] = []
    loaded = []
    for arg in recipes:
        try:
            loaded.append((arg, schema.load_recipe(arg)))
        except InvalidInput as exc:
            problems.extend(exc.problems)
    if problems:
        raise InvalidInput(problems[0], problems)

    entries = build_matrix(
        [(r.name, arg, list(profiles) if profiles else list(r.targets)) for arg, r in loaded]
    )
    if shard is not None:
        entries = shard_slice(entries, *shard)
    by_name = {r.name: (arg, r) for arg, r in loaded}
    plans = []
    for entry in entries:
        _, recipe = by_name[entry.recipe]
        if precision is not None:
            recipe = _with_precision(recipe, precision)
        try:
            profile = (
                recipe._profile(entry.profile)
                if entry.profile in recipe.targets
                else schema.load_profile(entry.profile)
            )
            resolved = recipe.precision_for(profile)
            base = recipe.path.parent if recipe.path else Path.cwd()
            plans.append(
                BuildPlan(
                    recipe,
                    profile,
                    resolved,
                    source_from_recipe(recipe.source, base),
                    recipe_arg=str(entry.recipe_path),
                    profile_arg=entry.profile,
                )
            )
        except InvalidInput as exc:
            problems.extend(exc.problems)
    if problems:
        raise InvalidInput(problems[0], problems)
    return plans


def matrix_entries(
    recipes: Sequence[str], profiles: Sequence[str] | None = None
) -> list[MatrixEntry]:
    """The sorted recipe × profile pairs of `recipes` (names or paths), for `edgepipe matrix`."""
    from edgepipe import schema

    problems, rows = [], []
    for arg in recipes:
        try:
            recipe = schema.load_recipe(arg)
        except InvalidInput as exc:
            problems.extend(exc.problems)
            continue
        # As in `plan_builds`: -p replaces the targets, so matrix shards == build shards.
        rows.append((recipe.name, str(arg), list(profiles) if profiles else list(recipe.targets)))
    if problems:
        raise InvalidInput(problems[0], problems)
    return build_matrix(rows)


# ----------------------------------------------------------------------------- one build


def _peak_rss_mb() -> float:
    try:
        import resource
    except ImportError:  # Windows
        return 0.0
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / (1024 * 1024)  # KiB on Linux
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, 1)


class _Stages:
    """Reports stage progress of one build to the caller's callback."""

    def __init__(self, plan: BuildPlan, callback):
        self.plan, self.callback = plan, callback
        self.seconds: dict[str, float] = {}
        self.peak_rss_mb: dict[str, float] = {}
        self._current, self._since = None, time.perf_counter()

    def __call__(self, stage: str, message: str = "") -> None:
        if stage != self._current and (stage in STAGES or stage in ("done", "failed")):
            now = time.perf_counter()
            if self._current is not None:
                spent = self.seconds.get(self._current, 0.0) + now - self._since
                self.seconds[self._current] = round(spent, 3)
                # The process's peak so far: where it jumps is the stage that needs the memory.
                self.peak_rss_mb[self._current] = _peak_rss_mb()
            self._current, self._since = stage, now
        if self.callback is not None:
            self.callback(self.plan.name, stage, message)

    def sub(self, stage: str) -> Callable[[str], None]:
        return lambda message: self(stage, message)


def _export(
    plan: BuildPlan, model_dir: Path, out: Path, quant, report, dtype: str, guard=None
) -> dict:
    """Run the exporter (and the quantizer, as weights stream through it) into `out`."""
    from edgepipe.stages.export.dynamic import build_decoder

    def progress(step: str, done: int, total: int) -> None:
        report(f"{step} {done}/{total}")

    kwargs = {}
    if quant is not None and any(spec.method == "gptq" for spec in quant.specs()):
        kwargs["calibration_ids"] = _calibration_ids(plan, model_dir)
    result = build_decoder(
        model_dir,
        out,
        weights=plan.source.weights(model_dir),
        activation_dtype=dtype,
        quant=quant,
        all_logits=False,
        progress=progress,
        fp16_guard=guard,
        **plan.layout(),
        **kwargs,
    )
    return {
        "config": as_plain(result.config),
        "bytes_written": result.bytes_written,
        "quantized_weights": len(result.quantized),
    }


def _calibration_ids(plan: BuildPlan, model_dir: Path):
    """The recipe's calibration text as token ids (gptq), cut to its `max_tokens`."""
    import numpy as np

    from edgepipe.arch.tokenizer import build_qwen_tokenizer

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    family = plan.recipe.resolve_family(config)
    sample = plan.recipe.calibration
    ids = build_qwen_tokenizer(family).encode(sample.read(), add_special_tokens=False).ids
    vocab = int(config.get("vocab_size") or 151936)
    return np.asarray([i % vocab for i in ids[: sample.max_tokens]], dtype=np.int64)


def _export_stage(
    plan: BuildPlan,
    quant,
    cache: StageCache,
    work: Path,
    name: str,
    report: Callable[[str], None],
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
    from dataclasses import asdict as dc_asdict

    dtype = dtype or plan.activation_dtype
    key = cache.key(
        "export",
        {
            "source": plan.source.identity(),
            "code": build_code_hash(),
            "activation_dtype": dtype,
            "graph_variant": plan.profile.graph_variant,
            "layout": plan.layout(),
            "fp16_guard": guard.to_dict() if guard is not None and guard.active else None,
            "quant": dc_asdict(quant) if quant is not None else None,
            # gptq reads calibration text: its content is part of what the export depends on.
            "calibration": _calibration_hash(plan, quant),
            "all_logits": False,
        },
    )
    hit = cache.lookup("export", key)
    if hit is not None:
        report("reused from the stage cache")
        return hit, True
    out = work / name
    model_dir = plan.source.materialize(work, report)
    report("exporting" + (" and quantizing" if quant is not None else ""))
    _export(plan, model_dir, out, quant, report, dtype, guard)
    stored = cache.store("export", key, out)
    del stored  # a cache that cannot be written only costs a rebuild next time
    return out, False


# The modules whose code decides the export's bytes; everything they import from edgepipe
# counts too (found by `export_modules`).
EXPORT_ROOTS = ("edgepipe.stages.export.dynamic", "edgepipe.arch.presets", "edgepipe.stages.lora")


def export_modules(roots: tuple[str, ...] = EXPORT_ROOTS) -> list[Path]:
    """Source files of `roots` and of every edgepipe module they import, transitively
    (read from the import statements, so adding a module needs no list to be kept)."""
    import ast
    import importlib.util

    seen: dict[str, Path] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, AttributeError, ValueError):  # `from module import function`
            continue
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            continue
        path = Path(spec.origin)
        seen[name] = path
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                base = node.module if node.level == 0 else None
                if base and base.startswith("edgepipe"):
                    todo.append(base)
                    todo.extend(f"{base}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                todo.extend(a.name for a in node.names if a.name.startswith("edgepipe"))
    return sorted(set(seen.values()))


@functools.cache
def build_code_hash(roots: tuple[str, ...] = EXPORT_ROOTS) -> str:
    """sha256 of the export-side source code (`export_modules(roots)`), once per process: the
    code a process runs is what it imported, even if the files are edited while it runs.

    Part of the export cache key: the version number does not change while the code does (a
    checkout between releases, a local edit), and a stale export served from the cache would
    be wrong silently, e.g. a preset whose random draw changed.
    """
    package = Path(__file__).resolve().parents[1]  # edgepipe/
    return content_hash(
        {path.relative_to(package).as_posix(): sha256_file(path) for path in export_modules(roots)}
    )


def _calibration_hash(plan: BuildPlan, quant) -> str | None:
    if quant is None or not any(spec.method == "gptq" for spec in quant.specs()):
        return None
    return content_hash(plan.recipe.calibration.read())


def _applicable_thresholds(plan: BuildPlan) -> dict:
    """The recipe's thresholds that apply to this build: the logit-difference bound only to
    all-fp32 builds (quantized or fp16 logits legitimately differ), cosine only to static
    graphs (the schema says so)."""
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


def _evaluation_ids(plan: BuildPlan, family: str, vocab_size: int, sample=None) -> list[int]:
    """`sample` (default: the recipe's evaluation text) as token ids, cut to MAX_EVAL_TOKENS."""
    from edgepipe.arch.tokenizer import build_qwen_tokenizer

    field_name = "calibration" if sample is not None else "evaluation"
    sample = sample or plan.recipe.evaluation
    text = sample.read()
    limit = min(sample.max_tokens, MAX_EVAL_TOKENS)
    ids = build_qwen_tokenizer(family).encode(text, add_special_tokens=False).ids[:limit]
    if len(ids) < 2:
        raise InvalidInput(f"{plan.recipe.name}: {field_name}: the text has fewer than 2 tokens")
    # Tiny test models may have a smaller vocabulary than the real tokenizer.
    return [i % vocab_size for i in ids]


def build_one(plan: BuildPlan, options: BuildOptions) -> BuildResult:
    """Build one artifact; never raises for a failed build (the result says what failed).

    Raises:
        KeyboardInterrupt: passed on, after the temp folder is removed.
    """
    start = time.perf_counter()
    result = BuildResult(plan.recipe.name, plan.profile.name, precision=plan.precision)
    stages = _Stages(plan, options.progress)
    out_dir = Path(options.out_dir)
    tmp = out_dir / f"{TMP_PREFIX}{plan.recipe.name}-{plan.profile.name}-{tag()}"
    try:
        unsupported = plan.supported_here()
        if unsupported:
            raise InvalidInput(unsupported)
        tmp.mkdir(parents=True)
        _build_into(plan, options, tmp, result, stages, start)
        final = out_dir / plan.recipe.name / plan.profile.name
        publish(tmp / "artifact", final)
        result.status, result.artifact = "built", str(final)
        stages("done", str(final))
    except InvalidInput as exc:
        result.status, result.error = "invalid", "\n".join(exc.problems)
    except (BuildFailed, EdgepipeError) as exc:
        result.status, result.error = "failed", str(exc)
    except Exception as exc:  # a bug or an upstream library error: report it, keep going
        result.status = "failed"
        result.error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        result.seconds = round(time.perf_counter() - start, 3)
    if result.status != "built":
        stages("failed", result.error or "")
    result.stage_seconds = dict(stages.seconds)
    result.stage_peak_rss_mb = dict(stages.peak_rss_mb)
    return result


def _family_and_vocab(plan: BuildPlan, export_dir: Path) -> tuple[str, int]:
    genai = json.loads((export_dir / "genai_config.json").read_text(encoding="utf-8"))
    family = plan.recipe.resolve_family({"model_type": genai["model"].get("type")})
    return family, int(genai["model"]["vocab_size"])


class _Fp16Stage:
    """The fp16 guard of a float16 build (`edgepipe.stages.export.fp16guard`): the unquantized float32
    export, its activation maxima on the calibration text (the evaluation text when the recipe
    has none), and the `Fp16Guard` the profile's policy makes of them."""

    def __init__(self, plan: BuildPlan, cache: StageCache, work: Path, report):
        from edgepipe.stages.export.fp16guard import activation_maxima, plan_guard

        self.policy = plan.profile.decoder.fp16_guard
        self.fp32_dir, _ = _export_stage(plan, None, cache, work, "fp32", report, dtype="float32")
        family, vocab = _family_and_vocab(plan, self.fp32_dir)
        self.ids = _evaluation_ids(plan, family, vocab, plan.recipe.calibration)
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


def package_build(
    plan, artifact: Path, family: str, result: BuildResult, start: float, reports: dict, **extra
) -> dict:
    """`edgepipe.stages.package.package_artifact` with what every build variant records the same way:
    recipe, profile (with its session provider options), source identity, the export record
    and the wall time since `start`; `reports` and `extra` hold the variant's own parts."""
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
            "export": {"cached": result.cached, "resolved_precision": as_plain(plan.resolved)},
        },
        build_seconds=time.perf_counter() - start,
        **extra,
    )


def _build_into(plan, options, tmp: Path, result: BuildResult, stages, start: float) -> None:
    from edgepipe.stages.optimize import optimize_model
    from edgepipe.stages.validate.dynamic import validate_model
    from edgepipe.stages.validate.graph_check import check_graph, provider_status

    if plan.profile.graph_variant == "static":
        from edgepipe.build.static import build_static_into

        return build_static_into(plan, options, tmp, result, stages, start)
    cache = StageCache(options.cache_dir, enabled=options.use_cache)
    work = tmp / "work"
    work.mkdir()
    stages("source", plan.source.kind)
    quant = plan.quant_plan()
    stages("export")
    fp16 = None
    if plan.activation_dtype == "float16":
        fp16 = _Fp16Stage(plan, cache, work, stages.sub("export"))
    guard = fp16.guard if fp16 is not None else None
    export_dir, result.cached = _export_stage(
        plan, quant, cache, work, "export", stages.sub("export"), guard=guard
    )
    reference_dir = None
    if quant is not None:
        reference_dir, _ = _export_stage(
            plan, None, cache, work, "reference", stages.sub("export"), guard=guard
        )

    family, vocab = _family_and_vocab(plan, export_dir)

    stages("optimize")
    artifact = tmp / "artifact"
    optimization = optimize_model(
        export_dir,
        artifact,
        provider=plan.profile.provider,
        level=plan.profile.optimization_level,
        tolerance=1e-3 if plan.activation_dtype == "float32" else 2e-2,
        exclude=(ENTRY_FILE,),
        progress=stages.sub("optimize"),
    )

    stages("validate")
    static = check_graph(artifact / "model.onnx", plan.profile)
    if not static["passed"]:
        raise BuildFailed(f"{plan.name}: static check failed: " + "; ".join(static["failures"]))
    ids = _evaluation_ids(plan, family, vocab)
    source_dir = None
    if importlib_available("transformers") and importlib_available("torch"):
        source_dir = plan.source.reference_dir(work, stages.sub("validate"))
    validation = validate_model(
        artifact / "model.onnx",
        ids,
        provider=plan.profile.provider,
        provider_options=plan.profile.session_provider_options(),
        reference_dir=source_dir,
        reference_model=(reference_dir or export_dir) / "model.onnx",
        fp32_model=fp16.fp32_dir / "model.onnx" if fp16 is not None else None,
        thresholds=_applicable_thresholds(plan),
        quality=quant is not None,
        progress=stages.sub("validate"),
    )
    validation["static_checks"] = static
    provider = provider_status(plan.profile, validation["provider"])
    validation["provider_run"], validation["provider_note"] = (
        provider["provider_run"],
        provider["note"],
    )
    fp16_record = fp16.record(reference_dir or export_dir) if fp16 is not None else None
    result.validation = validation
    result.quality = validation.get("quality") or {
        k: validation[k] for k in ("kl", "top1_agreement", "perplexity_ratio") if k in validation
    }
    if not validation["passed"]:
        # Say where a reused export lives: a stale entry is then one `--no-cache` away.
        origin = f" (export reused from the stage cache: {export_dir})" if result.cached else ""
        raise BuildFailed(
            f"{plan.name}: validation failed against the {validation['reference']} reference: "
            + "; ".join(validation["failures"])
            + origin
        )

    stages("package")
    manifest = package_build(
        plan,
        artifact,
        family,
        result,
        start,
        {
            "validation": validation,
            "quality": validation.get("quality"),
            "optimization": optimization,
            "provider_check": provider,
            "fp16_guard": fp16_record,
        },
    )
    result.size_bytes = manifest["size_bytes"]


def importlib_available(module: str) -> bool:
    """True when `module` can be imported (without importing it)."""
    import importlib.util

    return importlib.util.find_spec(module) is not None


# ----------------------------------------------------------------------------- many builds


def _worker(args: tuple) -> dict:
    """Process-pool entry: plan and build one pair (plans hold pydantic models: re-resolve)."""
    recipe_arg, profile, precision, options = args
    try:
        (plan,) = plan_builds([recipe_arg], [profile], precision)
    except InvalidInput as exc:
        return asdict(BuildResult("?", profile, status="invalid", error=str(exc)))
    return asdict(build_one(plan, options))


def build_all(
    plans: Sequence[BuildPlan],
    options: BuildOptions,
    *,
    jobs: int = 1,
) -> list[BuildResult]:
    """Build every plan, `jobs` at a time, after sweeping dead builds' temp folders.

    Args:
        plans: from `plan_builds`.
        options: output folder, cache and progress callback.
        jobs: parallel builds (separate processes; each export is itself multi-threaded in
            onnxruntime, so more jobs than cores rarely helps).

    Returns:
        One result per plan, in plan order.
    """
    out_dir = Path(options.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sweep(out_dir)
    if jobs <= 1 or len(plans) <= 1:
        return [build_one(plan, options) for plan in plans]

    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # Workers cannot call back into the parent's live display: they report when done.
    worker_options = BuildOptions(
        options.out_dir, options.precision, options.cache_dir, options.use_cache, None
    )
    tasks = [
        (
            p.recipe_arg,
            p.profile_arg or str(p.profile.name),
            options.precision,
            worker_options,
        )
        for p in plans
    ]
    context = multiprocessing.get_context("spawn")  # onnxruntime's threads do not survive fork
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        results = []
        for plan, data in zip(plans, pool.map(_worker, tasks), strict=True):
            result = BuildResult(**data)
            if options.progress is not None:
                options.progress(plan.name, "done" if result.status == "built" else "failed", "")
            results.append(result)
    return results


def exit_code(results: Sequence[BuildResult]) -> int:
    """0 when everything was built, 2 when a build met invalid input, else 1."""
    if all(r.status == "built" for r in results):
        return 0
    if any(r.status == "invalid" for r in results) and not any(
        r.status == "failed" for r in results
    ):
        return 2
    return 1


def report_json(results: Sequence[BuildResult]) -> str:
    """The machine-readable report `--json` prints."""
    doc = {"exit_code": exit_code(results), "builds": [asdict(r) for r in results]}
    return json.dumps(doc, indent=2, default=str, allow_nan=True)
