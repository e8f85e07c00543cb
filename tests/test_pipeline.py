"""End-to-end tests of `edgepipe build`: real builds of the tiny recipes, atomicity, the cache.

Builds share one session cache and one output folder: the four tiny artifacts (tiny-qwen2 and
tiny-qwen3 for cpu-x64 at fp32 and int4) are built once and read by many tests.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from edgepipe import resources
from edgepipe.cache import ENTRY_FILE, StageCache, sha256_file
from edgepipe.cli import main
from edgepipe.pipeline import (
    OLD_PREFIX,
    TMP_PREFIX,
    BuildOptions,
    build_all,
    export_modules,
    plan_builds,
    publish,
    sweep,
)
from edgepipe.runtime.artifact import load_artifact

REPO = Path(__file__).resolve().parents[1]
BUILDS = [
    ("tiny-qwen2", "fp32"),
    ("tiny-qwen2", "int4"),
    ("tiny-qwen3", "fp32"),
    ("tiny-qwen3", "int4"),
]


@pytest.fixture(scope="session")
def build_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("stage-cache")


@pytest.fixture(scope="session")
def built(tmp_path_factory, build_cache) -> dict:
    """(recipe, precision) -> BuildResult, each in its own OUT folder."""
    results = {}
    for recipe, precision in BUILDS:
        out = tmp_path_factory.mktemp(f"dist-{recipe}-{precision}")
        plans = plan_builds([recipe], ["cpu-x64"], precision)
        (result,) = build_all(plans, BuildOptions(out, precision, build_cache))
        results[(recipe, precision)] = result
    return results


def _recipe_copy(folder: Path, name: str, **changes) -> Path:
    """A copy of a shipped recipe with top-level sections updated (same name, new folder)."""
    data = yaml.safe_load(resources.resolve_recipe(name).read_text(encoding="utf-8"))
    for key, value in changes.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _model_bytes(folder: Path) -> dict[str, str]:
    return {n: sha256_file(folder / n) for n in ("model.onnx", "model.onnx.data")}


@pytest.mark.parametrize(("recipe", "precision"), BUILDS)
def test_tiny_build_passes_its_own_validation(built, recipe, precision):
    result = built[(recipe, precision)]
    assert result.status == "built", result.error
    folder = Path(result.artifact)
    assert folder.parts[-2:] == (recipe, "cpu-x64")
    artifact = load_artifact(folder, verify=True)  # every sha256 of the manifest holds
    manifest = artifact.manifest
    assert manifest["precision"] == precision
    assert manifest["validation"]["passed"] is True
    assert manifest["validation"]["failures"] == []
    assert manifest["source"] == {"kind": "preset", "preset": recipe, "seed": 0}
    assert manifest["build_seconds"] > 0 and manifest["peak_rss_bytes"] > 0
    if precision == "fp32":
        # Compared with transformers: the exported graph computes the same function.
        assert manifest["validation"]["reference"] == "transformers"
        assert manifest["validation"]["logit_abs_diff"] <= 1e-3
        assert manifest["quality"] is None
    else:
        quality = manifest["quality"]
        assert quality["mean_kl"] >= 0
        assert 0 <= quality["top1_agreement"] <= 1
        assert quality["reference"] == "unquantized-export"
    # No temp folder or set-aside artifact is left next to it.
    out = folder.parents[1]
    assert not list(out.glob(f"{TMP_PREFIX}*"))
    assert not list(folder.parent.glob(f"{OLD_PREFIX}*"))


def test_int4_artifact_is_smaller_than_fp32(built):
    for recipe in ("tiny-qwen2", "tiny-qwen3"):
        assert built[(recipe, "int4")].size_bytes < built[(recipe, "fp32")].size_bytes / 2


@pytest.mark.parametrize(("recipe", "precision"), BUILDS)
def test_onnxruntime_genai_loads_and_generates(built, recipe, precision):
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    folder = built[(recipe, precision)].artifact
    model = og.Model(folder)
    tokenizer = og.Tokenizer(model)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=24)
    generator = og.Generator(model, params)
    generator.append_tokens(tokenizer.encode("Hello, world"))
    while not generator.is_done():
        generator.generate_next_token()
    assert len(generator.get_sequence(0)) > 3


def test_edgepipe_runtime_runs_the_artifact(built):
    from edgepipe.runtime import Generator

    generator = Generator(built[("tiny-qwen3", "int4")].artifact, verify_checksums=True)
    result = generator.generate("Hello", max_new_tokens=5, temperature=0)
    assert len(result.token_ids) == 5


@pytest.mark.slow
def test_two_builds_give_byte_identical_model_files(built, tmp_path):
    # int4: quantization is where nondeterminism would creep in (threads, float summation).
    precision = "int4"
    plans = plan_builds(["tiny-qwen2"], ["cpu-x64"], precision)
    (again,) = build_all(plans, BuildOptions(tmp_path, precision, use_cache=False))
    assert again.status == "built", again.error
    assert not again.cached
    first = Path(built[("tiny-qwen2", precision)].artifact)
    assert _model_bytes(Path(again.artifact)) == _model_bytes(first)


def test_unchanged_recipe_reuses_the_cached_export(built, build_cache, tmp_path):
    plans = plan_builds(["tiny-qwen2"], ["cpu-x64"], "fp32")
    (again,) = build_all(plans, BuildOptions(tmp_path, "fp32", build_cache))
    assert again.status == "built", again.error
    assert again.cached
    first = Path(built[("tiny-qwen2", "fp32")].artifact)
    assert _model_bytes(Path(again.artifact)) == _model_bytes(first)


def test_corrupted_cache_entry_is_detected_and_rebuilt(built, build_cache, tmp_path):
    entries = [p for p in (build_cache / "export").iterdir() if (p / ENTRY_FILE).is_file()]
    assert entries
    for entry in entries:  # damage every export entry: whichever the build needs is hit
        data = entry / "model.onnx.data"
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
    plans = plan_builds(["tiny-qwen3"], ["cpu-x64"], "fp32")
    (rebuilt,) = build_all(plans, BuildOptions(tmp_path, "fp32", build_cache))
    assert rebuilt.status == "built", rebuilt.error
    assert not rebuilt.cached
    first = Path(built[("tiny-qwen3", "fp32")].artifact)
    assert _model_bytes(Path(rebuilt.artifact)) == _model_bytes(first)
    # The entry was stored again, and verifies.
    cache = StageCache(build_cache)
    assert any(cache.verify(p) for p in (build_cache / "export").iterdir() if p.is_dir())


def test_without_transformers_validation_uses_the_unquantized_export(
    built, build_cache, tmp_path, monkeypatch
):
    import edgepipe.pipeline as pipeline

    # What `pip install 'edgepipe[build]'` (no torch, no transformers) gets.
    monkeypatch.setattr(pipeline, "importlib_available", lambda module: False)
    plans = plan_builds(["tiny-qwen3"], ["cpu-x64"], "int4")
    (result,) = build_all(plans, BuildOptions(tmp_path, "int4", build_cache))
    assert result.status == "built", result.error
    assert result.validation["reference"] == "unquantized-export"
    # Same reference, same text: the gate and the quality report agree (the report leaves out
    # the last position, which has no next token).
    assert result.validation["kl"] == pytest.approx(result.quality["mean_kl"], rel=1e-2)


@pytest.mark.slow
def test_gptq_recipe_builds_with_calibration_text(built, build_cache, tmp_path):
    recipe = _recipe_copy(tmp_path / "recipes", "tiny-qwen3", precision={"method": "gptq"})
    plans = plan_builds([str(recipe)], ["cpu-x64"])
    (result,) = build_all(plans, BuildOptions(tmp_path / "dist", None, build_cache))
    assert result.status == "built", result.error
    assert not result.cached  # gptq is a different export from rtn
    rtn = built[("tiny-qwen3", "int4")].quality
    # Deterministic seeds: measured 0.117 (gptq) vs 0.199 (rtn) mean KL.
    assert result.quality["mean_kl"] < rtn["mean_kl"]


def test_failing_threshold_exits_1_and_leaves_no_artifact(tmp_path, build_cache, capsys):
    recipe = _recipe_copy(tmp_path / "recipes", "tiny-qwen2", validation={"max_kl": 0.0})
    out = tmp_path / "dist"
    argv = ["build", str(recipe), "-p", "cpu-x64", "--precision", "int4", "-o", str(out)]
    code = main([*argv, "--cache-dir", str(build_cache), "--json"])
    assert code == 1
    report = json.loads(capsys.readouterr().out)
    (build,) = report["builds"]
    assert build["status"] == "failed"
    assert "kl" in build["error"] and "<= 0.0" in build["error"]
    assert not (out / "tiny-qwen2").exists()
    assert not list(out.glob(f"{TMP_PREFIX}*"))


@pytest.mark.slow
def test_killed_build_leaves_previous_artifact_and_next_build_succeeds(built, tmp_path):
    out = tmp_path / "dist"
    final = out / "tiny-qwen2" / "cpu-x64"
    publish_src = tmp_path / "previous"
    import shutil

    shutil.copytree(built[("tiny-qwen2", "fp32")].artifact, publish_src)
    publish(publish_src, final)
    before = {p.name: sha256_file(p) for p in final.iterdir()}

    argv = [sys.executable, "-m", "edgepipe", "build", "tiny-qwen2", "-p", "cpu-x64"]
    argv += ["-o", str(out), "--no-cache", "--json"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob(f"{TMP_PREFIX}*")):
            assert child.poll() is None, "the build ended before its temp folder appeared"
            assert time.monotonic() < deadline, "no temp folder appeared"
            time.sleep(0.05)
        time.sleep(0.5)  # let it write part of the export
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    leftovers = list(out.glob(f"{TMP_PREFIX}*"))
    assert leftovers  # what a killed build leaves: only its temp folder...
    assert {p.name: sha256_file(p) for p in final.iterdir()} == before  # ...old artifact intact

    plans = plan_builds(["tiny-qwen2"], ["cpu-x64"], "fp32")
    (result,) = build_all(plans, BuildOptions(out, "fp32", use_cache=False))
    assert result.status == "built", result.error
    assert not any(p.exists() for p in leftovers)  # swept by the next build
    assert load_artifact(final, verify=True).manifest["precision"] == "fp32"


def test_directml_profile_is_refused_with_exit_2(tmp_path, capsys):
    code = main(["build", "tiny-qwen2", "-p", "directml", "-o", str(tmp_path), "--json"])
    assert code == 2
    (build,) = json.loads(capsys.readouterr().out)["builds"]
    assert "DmlExecutionProvider" in build["error"]


def test_unknown_recipe_exits_2_before_building(tmp_path, capsys):
    assert main(["build", "no-such-recipe", "-o", str(tmp_path)]) == 2
    assert "unknown recipe" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_bad_shard_exits_2(tmp_path, capsys):
    assert main(["build", "tiny-qwen2", "--shard", "3/2", "-o", str(tmp_path)]) == 2
    assert "--shard" in capsys.readouterr().err


def test_shard_builds_only_its_slice():
    everything = plan_builds(["tiny-qwen2", "tiny-qwen3"], ["cpu-x64", "cpu-arm64"])
    names = sorted(p.name for p in everything)
    first = [
        p.name
        for p in plan_builds(["tiny-qwen2", "tiny-qwen3"], ["cpu-x64", "cpu-arm64"], shard=(1, 3))
    ]
    assert first == [names[0], names[3]]


def test_export_cache_key_covers_the_code_the_export_imports():
    names = {path.name for path in export_modules()}
    assert {"export.py", "presets.py", "quantize.py", "safetensors_io.py"} <= names
    assert "pipeline.py" not in names and "validate.py" not in names


# ----------------------------------------------------------------------------- atomic writes


def _folder(path: Path, text: str) -> Path:
    path.mkdir(parents=True)
    (path / "model.onnx").write_text(text)
    return path


def test_publish_replaces_an_existing_artifact_and_removes_the_old_one(tmp_path):
    final = _folder(tmp_path / "dist" / "r" / "p", "old")
    publish(_folder(tmp_path / "new", "new"), final)
    assert (final / "model.onnx").read_text() == "new"
    assert sorted(p.name for p in final.parent.iterdir()) == ["p"]


def test_sweep_removes_dead_builds_and_keeps_live_ones(tmp_path):
    dead_pid = 2**22 + 12345  # above Linux's pid_max default: never a live process
    dead = _folder(tmp_path / f"{TMP_PREFIX}r-p-{dead_pid}-0123abcd", "x")
    live = _folder(tmp_path / f"{TMP_PREFIX}r-p-{os.getpid()}-0123abcd", "x")
    removed = sweep(tmp_path)
    assert removed == [dead]
    assert live.exists() and not dead.exists()


def test_sweep_restores_an_artifact_set_aside_by_a_killed_build(tmp_path):
    dead_pid = 2**22 + 12345
    aside = _folder(tmp_path / "r" / f"{OLD_PREFIX}cpu-x64-{dead_pid}-0123abcd", "old")
    sweep(tmp_path)
    assert not aside.exists()
    assert (tmp_path / "r" / "cpu-x64" / "model.onnx").read_text() == "old"


@pytest.mark.slow
def test_parallel_jobs_build_every_pair(built, build_cache, tmp_path):
    plans = plan_builds(["tiny-qwen2", "tiny-qwen3"], ["cpu-x64"], "fp32")
    results = build_all(plans, BuildOptions(tmp_path, "fp32", build_cache), jobs=2)
    assert [(r.recipe, r.status) for r in results] == [
        ("tiny-qwen2", "built"),
        ("tiny-qwen3", "built"),
    ], [r.error for r in results]
    for r in results:
        assert _model_bytes(Path(r.artifact)) == _model_bytes(
            Path(built[(r.recipe, "fp32")].artifact)
        )


@pytest.mark.slow
def test_sigterm_removes_the_temp_folder_on_the_way_out(tmp_path):
    out = tmp_path / "dist"
    argv = [sys.executable, "-m", "edgepipe", "build", "tiny-qwen2", "-p", "cpu-x64"]
    argv += ["-o", str(out), "--no-cache", "--json"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob(f"{TMP_PREFIX}*")):
            assert child.poll() is None, "the build ended before its temp folder appeared"
            assert time.monotonic() < deadline, "no temp folder appeared"
            time.sleep(0.05)
        child.send_signal(signal.SIGTERM)
    finally:
        child.wait(timeout=60)
    assert child.returncode == 130  # the CLI's exit code for an interrupted build
    assert not list(out.glob(f"{TMP_PREFIX}*"))
    assert not (out / "tiny-qwen2").exists()
