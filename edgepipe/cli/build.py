"""`edgepipe build` and `edgepipe matrix`.

Exit codes of `build`: 0 every artifact built; 1 a stage or a validation threshold failed;
2 invalid input (a bad recipe or profile, an unknown name, a missing dependency such as
onnxruntime-qnn for qnn-htp). Providers that cannot run here (directml) are built, checked
statically and run on CPU; the manifest says the provider was not run.
"""

from __future__ import annotations

import contextlib
import json
import sys

from edgepipe.cli.command import add_command

PRECISIONS = ("fp32", "fp16", "int8", "int4")


def register(subparsers) -> None:
    """Add `build` and `matrix` to the CLI."""
    build = add_command(subparsers, "build", build_command)
    build.add_argument(
        "recipes",
        nargs="*",
        metavar="RECIPE",
        help="shipped name or YAML path (with --shard, default: every shipped recipe)",
    )
    build.add_argument(
        "-p",
        "--profile",
        action="append",
        dest="profiles",
        metavar="PROFILE",
        help="device profile (repeatable); default: every profile in the recipe's targets",
    )
    build.add_argument("-o", "--out", default="dist", help="output folder (default: dist)")
    build.add_argument("--precision", choices=PRECISIONS, help="override the weights precision")
    build.add_argument("--json", action="store_true", help="print a machine-readable report")
    build.add_argument("--jobs", type=int, default=1, help="parallel builds (default 1)")
    build.add_argument("--shard", metavar="I/N", help="build slice I of N (see `edgepipe matrix`)")
    build.add_argument("--cache-dir", help="stage cache folder (default ~/.cache/edgepipe/stages)")
    build.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")

    matrix = add_command(subparsers, "matrix", matrix_command)
    matrix.add_argument(
        "recipes", nargs="*", metavar="RECIPE", help="names or YAML paths (default: all shipped)"
    )
    matrix.add_argument("-p", "--profile", action="append", dest="profiles", metavar="PROFILE")
    matrix.add_argument("--format", choices=("github", "json"), default="json")
    matrix.add_argument(
        "--shards", type=int, help="number of CI jobs (default: one per recipe x profile)"
    )


def build_command(args) -> int:
    """Build recipes into device-tuned artifacts at OUT/<recipe>/<profile>/.

    Stages: source -> export+quantize -> optimize -> validate -> package. Each artifact is
    written to a temporary folder and renamed into place only when every stage passed.
    Exit codes: 0 built; 1 a build or validation failed; 2 invalid input (a bad recipe,
    profile or name, or a missing dependency: the message names the pip install).
    """
    from edgepipe.errors import InvalidInput

    try:
        return _build(args)
    except (InvalidInput, KeyboardInterrupt) as exc:
        if args.json:
            # `--json > report.json` in CI: the report is there whatever happened.
            problems = getattr(exc, "problems", ["interrupted"])
            code = 2 if isinstance(exc, InvalidInput) else 130
            print(json.dumps({"exit_code": code, "builds": [], "errors": problems}, indent=2))
        raise


def _writable_folder(flag: str, value: str):
    """`value` as a folder that exists and we can write to, else InvalidInput naming `flag`."""
    import os
    from pathlib import Path

    from edgepipe.errors import InvalidInput

    path = Path(value)
    if path.exists() and not path.is_dir():
        raise InvalidInput(f"{flag}: {path} is a file, not a folder; name a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidInput(f"{flag}: cannot create folder {path} ({exc.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise InvalidInput(f"{flag}: folder {path} is not writable")
    return path


def _build(args) -> int:

    from edgepipe.build.matrix import parse_shard
    from edgepipe.build.plan import plan_builds
    from edgepipe.build.run import BuildOptions, exit_code, report_json
    from edgepipe.errors import InvalidInput
    from edgepipe.schema import shipped as resources

    if args.jobs < 1:
        raise InvalidInput(f"--jobs: must be >= 1, got {args.jobs}")
    shard = parse_shard(args.shard) if args.shard else None
    recipes = list(args.recipes)
    if not recipes:
        if shard is None:
            raise InvalidInput("build: name at least one RECIPE (see `edgepipe list`)")
        # The same default as `edgepipe matrix`, so its shards cover the same pairs.
        recipes = list(resources.recipe_files())
    plans = plan_builds(recipes, args.profiles, args.precision, shard)
    options = BuildOptions(
        out_dir=_writable_folder("-o/--out", args.out),
        precision=args.precision,
        cache_dir=_writable_folder("--cache-dir", args.cache_dir) if args.cache_dir else None,
        use_cache=not args.no_cache,
    )
    if not plans:
        print("nothing to build (the shard is empty)", file=sys.stderr)
        results = []
    else:
        with _interrupt_on_sigterm():
            results = _run_with_progress(plans, options, args.jobs, quiet=args.json)
    if args.json:
        print(report_json(results))
    else:
        _print_summary(results)
    return exit_code(results)


@contextlib.contextmanager
def _interrupt_on_sigterm():
    """Make SIGTERM (CI cancellation, `kill`) unwind like Ctrl-C while building, so the build's
    temp folder is removed on the way out instead of waiting for the next build's sweep."""
    import signal
    import threading

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_with_progress(plans, options, jobs, *, quiet: bool):
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from edgepipe.build.run import build_all
    from edgepipe.build.shared import STAGES

    console = Console(stderr=True)
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[stage]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, disable=quiet, transient=False) as progress:
        tasks = {
            plan.name: progress.add_task(plan.name, total=len(STAGES), stage="waiting")
            for plan in plans
        }

        def callback(name: str, stage: str, message: str) -> None:
            task = tasks.get(name)
            if task is None:
                return
            if stage in STAGES:
                progress.update(task, completed=STAGES.index(stage), stage=f"{stage} {message}")
            elif stage == "done":
                progress.update(task, completed=len(STAGES), stage="built")
            elif stage == "failed":
                progress.update(task, stage="[red]failed")
            else:
                progress.update(task, stage=f"{stage} {message}")

        options.progress = callback
        return build_all(plans, options, jobs=jobs)


def _size(num: int | None) -> str:
    if num is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num < 1024 or unit == "GiB":
            return f"{num:.0f} {unit}" if unit == "B" else f"{num:.1f} {unit}"
        num /= 1024
    return str(num)


def _quality(result) -> str:
    q = result.quality or {}
    if not q:
        return "-"
    parts = []
    kl = q.get("mean_kl", q.get("kl"))
    if kl is not None:
        parts.append(f"KL {kl:.4f}")
    if "top1_agreement" in q:
        parts.append(f"top1 {q['top1_agreement']:.0%}")
    return ", ".join(parts)


def _print_summary(results) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    table = Table(title="edgepipe build")
    for column in ("recipe", "profile", "status", "precision", "size", "quality", "time"):
        table.add_column(column, justify="right" if column in ("size", "time") else "left")
    for r in results:
        status = {"built": "[green]built", "failed": "[red]failed"}.get(r.status, "[red]invalid")
        table.add_row(
            r.recipe,
            r.profile,
            status,
            r.precision or "-",
            _size(r.size_bytes),
            _quality(r),
            f"{r.seconds:.1f}s",
        )
    console.print(table)
    for r in results:
        if r.summary:
            console.print(r.summary, highlight=False)
    for r in results:
        if r.error:
            console.print(f"[red]{r.recipe}@{r.profile}[/red]: {r.error}")
        elif r.artifact:
            console.print(f"{r.recipe}@{r.profile} -> {r.artifact}")
            note = (r.validation or {}).get("provider_note")
            if note:
                console.print(f"  [yellow]{note}[/yellow]")


def matrix_command(args) -> int:
    """Print the recipe x profile build matrix for a CI runner's matrix strategy.

    Each entry carries a `shard` "I/N"; a CI job runs `edgepipe build RECIPES --shard I/N`.
    `--format github` prints one line for `$GITHUB_OUTPUT` (`matrix=...`, then
    `strategy.matrix: ${{ fromJSON(...) }}`); `--format json` lists the pairs and the shards.
    """
    from edgepipe.build.matrix import format_matrix
    from edgepipe.build.plan import matrix_entries
    from edgepipe.errors import InvalidInput
    from edgepipe.schema import shipped as resources

    if args.shards is not None and args.shards < 1:
        raise InvalidInput(f"--shards: must be >= 1, got {args.shards}")
    recipes = args.recipes or list(resources.recipe_files())
    entries = matrix_entries(recipes, args.profiles)
    print(format_matrix(entries, args.format, args.shards))
    return 0
