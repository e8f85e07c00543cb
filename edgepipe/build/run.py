"""`edgepipe build`: source → export+quantize → optimize → validate → package, atomically.

Each build (one recipe for one profile) runs in a temporary folder inside OUT and its artifact
is renamed to `OUT/<recipe>/<profile>/` only when every stage passed (`edgepipe.build.publish`): a
failed or killed build leaves the previous artifact untouched.

The stages themselves belong to the profile's graph variant (`VARIANTS`); the export result is
cached (`edgepipe.build.cache`): an unchanged recipe re-validates and re-packages, but does not
re-export.
"""

from __future__ import annotations

import json
import shutil
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgepipe.build import dynamic, static
from edgepipe.build.cache import StageCache
from edgepipe.build.plan import BuildPlan, plan_builds
from edgepipe.build.publish import TMP_PREFIX, publish, sweep, tag
from edgepipe.build.shared import STAGES, BuildResult, StageProgress
from edgepipe.errors import BuildFailed, EdgepipeError, InvalidInput

# The graph variants a profile's `graph_variant` names: each module has `supported_here(plan)`
# and `build_into(plan, cache, tmp, result, stages, start)`.
VARIANTS = {"dynamic": dynamic, "static": static}

__all__ = [
    "STAGES",
    "VARIANTS",
    "BuildOptions",
    "BuildPlan",
    "BuildResult",
    "build_all",
    "build_one",
    "exit_code",
    "plan_builds",
    "report_json",
]


@dataclass
class BuildOptions:
    """Options shared by every build of one `edgepipe build` call.

    Attributes:
        out_dir: OUT, where artifacts are published.
        precision: the `--precision` override (None: the recipe's).
        cache_dir: the stage cache folder (None: `edgepipe.build.cache.default_cache_root()`).
        use_cache: False for `--no-cache` (neither read nor write the cache).
        progress: `(build name, stage, message)` callback for a live display.
    """

    out_dir: Path = Path("dist")
    precision: str | None = None
    cache_dir: Path | None = None
    use_cache: bool = True
    progress: Callable[[str, str, str], None] | None = field(default=None, repr=False)


def build_one(plan: BuildPlan, options: BuildOptions) -> BuildResult:
    """Build one artifact; never raises for a failed build (the result says what failed).

    Args:
        plan: from `plan_builds`.
        options: output folder, cache and progress callback.

    Returns:
        The result (`status` says whether it was built).

    Raises:
        KeyboardInterrupt: passed on, after the temp folder is removed.
    """
    start = time.perf_counter()
    result = BuildResult(plan.recipe.name, plan.profile.name, precision=plan.precision)
    stages = StageProgress(plan, options.progress)
    out_dir = Path(options.out_dir)
    tmp = out_dir / f"{TMP_PREFIX}{plan.recipe.name}-{plan.profile.name}-{tag()}"
    variant = VARIANTS[plan.profile.graph_variant]
    try:
        unsupported = variant.supported_here(plan)
        if unsupported:
            raise InvalidInput(unsupported)
        tmp.mkdir(parents=True)
        cache = StageCache(options.cache_dir, enabled=options.use_cache)
        variant.build_into(plan, cache, tmp, result, stages, start)
        final = out_dir / plan.recipe.name / plan.profile.name
        publish(tmp / "artifact", final)
        result.status, result.artifact = "built", str(final)
        stages("done", str(final))
    except InvalidInput as exc:
        result.status = "invalid"
        result.error = "\n".join(_unprefixed(p, plan.name) for p in exc.problems)
    except (BuildFailed, EdgepipeError) as exc:
        result.status, result.error = "failed", _unprefixed(str(exc), plan.name)
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


def _unprefixed(message: str, name: str) -> str:
    """`message` without a leading `name: `: the result (and the summary line) already says
    which build it is, so the CLI does not print "r@p: r@p: ..."."""
    return message.removeprefix(f"{name}: ")


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
        (p.recipe_arg, p.profile_arg or str(p.profile.name), options.precision, worker_options)
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
