"""Helpers the benchmark scripts share: cached model folders, measured child processes, facts.

* `source_model(name)`: a shape-exact random-weight bf16 model folder (`edgepipe.arch.presets`),
  written once into `benchmarks/.cache/models/` and reused (a `.complete` marker is written
  last, so an interrupted write is redone, never half-used).
* `run_measured(cmd)`: run a child process and return its wall time and peak RSS (GNU time's
  "Maximum resident set size", measured from a small forking process).
* `genai_builder_cmd(...)`: onnxruntime-genai's model builder at its defaults for a precision.
* `machine_facts()` / `load_now()`: what the numbers were measured on, and how busy it was.

Run the scripts from the repository root with the worktree on PYTHONPATH, e.g.
`PYTHONPATH=$PWD .venv/bin/python benchmarks/side_by_side.py`.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
CACHE = BENCH_DIR / ".cache"
RESULTS = BENCH_DIR / "results"
# The shapes the side-by-side benchmark runs by default (shape table in docs/models.md).
BENCH_MODELS = ("qwen2.5-0.5b", "qwen3-0.6b", "qwen2.5-1.5b", "qwen3-1.7b")
SEED = 0
MIB = 2**20
PROFILE = "cpu-x64"
# cached_build kinds built by edgepipe -> the recipe's `precision` block. "edgepipe" is what
# `edgepipe build` ships for the Qwen recipes (recipes/qwen*.yaml: int4 body, the tied
# embedding/lm_head table at int8 — llama.cpp's Q4_0 mix keeps it at 8 bits too, so this is the
# quality-matched row); "edgepipe-int4-table" one int4 table for both,
# like onnxruntime-genai's `-p int4` build. `add_edgepipe_kind` adds tuning rows.
SHIPPED_PRECISION = {"method": "rtn", "embedding": "same", "lm_head": "int8"}
EDGEPIPE_KINDS: dict[str, dict] = {
    "edgepipe": SHIPPED_PRECISION,
    "edgepipe-int4-table": {"method": "rtn", "embedding": "same", "lm_head": "same"},
}


def add_edgepipe_kind(text: str) -> str:
    """Register a build kind from `NAME:KEY=VALUE,...` over the shipped precision block (e.g.
    `b128sym:block_size=128,symmetric=true`); returns the kind's name."""
    import yaml

    name, _, body = text.partition(":")
    if not body and name in EDGEPIPE_KINDS:
        return name
    precision = dict(SHIPPED_PRECISION)
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        precision[key] = yaml.safe_load(value)
    EDGEPIPE_KINDS[name] = precision
    return name


# Child processes must never reach a hub: every input is a local folder.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def source_model(name: str, cache: Path = CACHE, dtype: str = "bfloat16") -> Path:
    """The cached random-weight folder of preset `name` (written on first use).

    Args:
        name: an `edgepipe.arch.presets.PRESETS` key, e.g. "qwen3-0.6b".
        cache: the benchmark cache folder.
        dtype: safetensors dtype; bfloat16 like the real checkpoints.

    Returns:
        The folder (config.json, safetensors, real Qwen tokenizer files).
    """
    folder = cache / "models" / f"{name}-{dtype}-seed{SEED}"
    marker = folder / ".complete"
    if marker.is_file():
        return folder
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    started = time.perf_counter()
    # In a child: the draw peaks near the largest tensor in float32, and a parent that grew
    # would lend that peak to every child it starts (see `run_measured`).
    code = "import sys; from edgepipe.arch.presets import write_preset; "
    code += "write_preset(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])"
    subprocess.run([sys.executable, "-c", code, name, str(SEED), str(partial), dtype], check=True)
    (partial / ".complete").write_text(json.dumps({"preset": name, "seed": SEED, "dtype": dtype}))
    os.replace(partial, folder)
    print(f"[{name}] random {dtype} weights written in {time.perf_counter() - started:.0f}s")
    return folder


def folder_bytes(path: Path, prefix: str = "") -> int:
    """Bytes of the files under `path` (only names starting with `prefix`, when given)."""
    return sum(p.stat().st_size for p in Path(path).rglob(f"{prefix}*") if p.is_file())


def run_measured(
    cmd: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> dict:
    """Run `cmd`; return `wall_s`, `peak_rss_mib`, `rc`, `stdout` (and `error` on failure).

    The peak is "Maximum resident set size" of `/usr/bin/time`, which forks the command from
    its own small process. Linux carries a process's peak RSS across fork + exec (the exec'd
    child starts from the forking process's high-water mark), so a child started straight
    from a large Python parent would report at least the parent's peak. Where GNU time is
    missing, `getrusage(RUSAGE_CHILDREN)` is the fallback, named in `rss_method`.
    """
    time_bin = shutil.which("time", path="/usr/bin:/bin")
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        stats = Path(tmp) / "time.txt"
        full = [time_bin, "-o", str(stats), "-f", "%M", *cmd] if time_bin else cmd
        started = time.perf_counter()
        done = subprocess.run(
            full,
            capture_output=True,
            text=True,
            env={**os.environ, **OFFLINE_ENV, **(env or {})},
            cwd=cwd,
        )
        wall = time.perf_counter() - started
        if time_bin and stats.is_file() and stats.read_text().split():
            kib = int(stats.read_text().split()[-1])
            method = "/usr/bin/time"
        else:
            import resource

            kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            method = "getrusage(RUSAGE_CHILDREN)"
    result = {
        "wall_s": round(wall, 2),
        "peak_rss_mib": round(kib * 1024 / MIB, 1),
        "rss_method": method,
        "rc": done.returncode,
        "stdout": done.stdout,
    }
    if done.returncode:
        result["error"] = (done.stderr or done.stdout)[-3000:]
    return result


def genai_builder_cmd(model_dir: Path, out_dir: Path, cache_dir: Path, precision="int4"):
    """onnxruntime-genai's model builder for the CPU at its defaults (`-p PRECISION -e cpu`)."""
    return [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        str(model_dir),
        "-o",
        str(out_dir),
        "-p",
        precision,
        "-e",
        "cpu",
        "-c",
        str(cache_dir),
    ]


def load_now() -> list[float]:
    """The 1, 5 and 15 minute load averages (other users' work shows up here)."""
    return [round(x, 2) for x in os.getloadavg()]


@contextlib.contextmanager
def busy_load(core: int = 0):
    """A fixed synthetic load for the duration: one Python busy loop pinned to `core`.

    Every contender of a `--busy` run shares the same load, so it stands for "an app next to
    other work" without depending on who else uses the machine.
    """
    code = "while True: pass"
    cmd = [sys.executable, "-c", code]
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", str(core), *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def mem_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None elsewhere)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _version(module: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return None


def git_revision() -> str | None:
    """The checkout's commit (with `+dirty` when it has local changes), or None."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return None
    return (sha + ("+dirty" if dirty else "")) or None


# Fused int4 projections onnxruntime defines as contrib ops; they are worth an export switch
# only where the CPU provider has kernels for them.
FUSED_OPS = ("MatMulNBits", "MatMulNBitsMlp", "MatMulNBitsQkv")


def cpu_kernels(ops=FUSED_OPS) -> dict[str, bool]:
    """Which of `ops` (com.microsoft) this onnxruntime registers CPU kernels for."""
    from onnxruntime.capi import _pybind_state as C

    registered = {
        k.op_name
        for k in C.get_all_opkernel_def()
        if k.provider == "CPUExecutionProvider" and k.domain == "com.microsoft"
    }
    return {op: op in registered for op in ops}


def machine_facts() -> dict:
    """CPU, cores, memory, load and library versions, for the results file."""
    flags = ""
    with contextlib.suppress(OSError):
        flags = Path("/proc/cpuinfo").read_text()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "avx512_vnni": "avx512_vnni" in flags,
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "mem_available_bytes": mem_available_bytes(),
        "load": load_now(),
        "python": platform.python_version(),
        "versions": {
            name: _version(name)
            for name in ("onnxruntime", "onnxruntime-genai", "onnx", "numpy", "edgepipe")
        },
        "edgepipe_git": git_revision(),
        "cpu_kernels": cpu_kernels(),
    }


def file_sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_json(path: Path, data) -> None:
    """Write `data` as indented JSON, atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


# `edgepipe build`'s export + quantize and optimize stages for one profile (the graph it ships;
# validation and packaging leave it as is), in a child process: the recipe
# is resolved by edgepipe.build.plan exactly as `edgepipe build RECIPE -p PROFILE` resolves it.
_EDGEPIPE_BUILD_CHILD = """
import json, shutil, sys
from pathlib import Path
from edgepipe.stages.export.dynamic import build_decoder
from edgepipe.build.cache import build_code_hash
from edgepipe.build.dynamic import EXPORT_ROOTS
from edgepipe.build.plan import plan_builds
from edgepipe.stages.optimize import optimize_model
(plan,) = plan_builds([sys.argv[1]], [sys.argv[2]])
quant = plan.quant_plan()
out = Path(sys.argv[4])
export_dir = out.with_name(out.name + ".export")
shutil.rmtree(export_dir, ignore_errors=True)
result = build_decoder(sys.argv[3], export_dir, activation_dtype=plan.activation_dtype,
                       quant=quant)
# The optimize stage as `edgepipe build` runs it: the shipped graph is its output.
optimization = optimize_model(export_dir, out, provider=plan.profile.provider,
                              level=plan.profile.optimization_level,
                              tolerance=1e-3 if plan.activation_dtype == "float32" else 2e-2)
shutil.rmtree(export_dir)
specs = sorted({f"{s.bits}/{s.block_size}/{s.symmetric}/{s.accuracy_level}" for s in quant.specs()})
print(json.dumps({"code_hash": build_code_hash(EXPORT_ROOTS), "bytes_written": result.bytes_written,
                  "quant": specs, "stages": "export+optimize",
                  "optimization": {k: optimization.get(k) for k in ("applied", "reason")}}))
"""
# The stages the edgepipe build child runs (its records say so): a record of others is rebuilt.
SHIPPED_STAGES = "export+optimize"

_RECIPE = """\
# Written by benchmarks/common.py: a shape-exact random {name} for the benchmarks.
name: {recipe_name}
description: shape-exact random-weight {name} (benchmarks only)
source:
  path: {path}
targets: [{profile}]
precision: {precision}
validation:                      # random weights: wiring gates only (see recipes/tiny-*.yaml)
  max_kl: 1.0
  min_top1_agreement: 0.0
  max_perplexity_ratio: 1.5
"""


def bench_recipe(
    name: str, model_dir: Path, profile: str = "cpu-x64", cache: Path = CACHE, kind="edgepipe"
):
    """A recipe YAML that builds the cached folder `model_dir` with `kind`'s precision block
    (written into the cache)."""
    recipe_name = f"bench-{name}-{kind}"
    path = cache / "recipes" / f"{recipe_name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    precision = json.dumps(EDGEPIPE_KINDS[kind])  # JSON is YAML
    path.write_text(
        _RECIPE.format(
            name=name,
            recipe_name=recipe_name,
            path=Path(model_dir).resolve(),
            profile=profile,
            precision=precision,
        )
    )
    return path


def edgepipe_build_cmd(recipe: Path, profile: str, model_dir: Path, out_dir: Path) -> list[str]:
    """The child command of `edgepipe build`'s export and optimize stages
    (`_EDGEPIPE_BUILD_CHILD`)."""
    return [sys.executable, "-c", _EDGEPIPE_BUILD_CHILD, str(recipe), profile] + [
        str(model_dir),
        str(out_dir),
    ]


def cached_build(kind: str, name: str, model_dir: Path, cache: Path = CACHE, *, rebuild=False):
    """Build (or reuse) `kind`'s int4 CPU artifact of `model_dir`; the record says what it cost.

    Args:
        kind: one of `EDGEPIPE_KINDS` (`edgepipe build`'s export + quantize + optimize for
            `PROFILE` with that precision block: the graph it ships; validation and packaging
            do not change it) or "genai" (`onnxruntime_genai.models.builder -p int4 -e cpu`).
        name: the preset name (cache folder).
        model_dir: the source folder (`source_model`).
        cache: the benchmark cache; artifacts go to `builds/NAME/KIND/`, records beside.
        rebuild: build even when a record exists. An edgepipe record is also stale when the
            export code changed (`edgepipe.build.cache.build_code_hash`).

    Returns:
        `artifact`, `artifact_bytes` (model.onnx + data), `wall_s`, `peak_rss_mib`, load.
    """
    folder = cache / "builds" / name
    out = folder / kind
    record_path = folder / f"{kind}.json"
    code_hash = None
    if kind in EDGEPIPE_KINDS:
        from edgepipe.build.cache import build_code_hash
        from edgepipe.build.dynamic import EXPORT_ROOTS

        # The profile's defaults (block size, symmetry) are part of what a build resolves to.
        profile = REPO / "device_profiles" / f"{PROFILE}.yaml"
        code_hash = build_code_hash(EXPORT_ROOTS) + ":" + file_sha256(profile)
    if record_path.is_file() and out.is_dir() and not rebuild:
        record = json.loads(record_path.read_text())
        fresh = kind not in EDGEPIPE_KINDS or record.get("stages") == SHIPPED_STAGES
        fresh = fresh and record.get("precision") == EDGEPIPE_KINDS.get(kind)
        if record.get("code_hash") == code_hash and record.get("rc") == 0 and fresh:
            return {**record, "artifact": str(out)}  # the cache may have moved since
    shutil.rmtree(out, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    if kind in EDGEPIPE_KINDS:
        recipe = bench_recipe(name, model_dir, PROFILE, cache, kind)
        cmd = edgepipe_build_cmd(recipe, PROFILE, model_dir, out)
    else:
        cmd = genai_builder_cmd(model_dir, out, folder / "genai-cache")
    print(f"[{name}] building with {kind} ...", flush=True)
    record = run_measured(cmd)
    record["load_after"] = load_now()
    shutil.rmtree(folder / "genai-cache", ignore_errors=True)
    if record["rc"]:
        raise RuntimeError(f"{kind} build of {name} failed:\n{record.get('error')}")
    stdout = record.pop("stdout")
    if kind in EDGEPIPE_KINDS:
        record.update(json.loads(stdout.strip().splitlines()[-1]))
        record["precision"] = EDGEPIPE_KINDS[kind]
        record["code_hash"] = code_hash
    record["artifact"] = str(out)
    record["artifact_bytes"] = folder_bytes(out, "model.onnx")
    write_json(record_path, record)
    print(
        f"[{name}] {kind}: {record['wall_s']:.0f}s, peak RSS {record['peak_rss_mib']:.0f} MiB, "
        f"{record['artifact_bytes'] / MIB:.0f} MiB",
        flush=True,
    )
    return record
