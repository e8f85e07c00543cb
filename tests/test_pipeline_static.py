"""`edgepipe build` for static profiles: the shipped tiny recipe for qnn-htp from the command
line (real vocabulary, simulated HTP), rebuilds from the stage cache, and refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edgepipe.build.cache import sha256_file
from edgepipe.build.plan import plan_builds
from edgepipe.build.run import BuildOptions, build_all
from edgepipe.cli.main import main
from edgepipe.runtime import Generator
from edgepipe.runtime.artifact import load_artifact
from tests.fixtures.static import needs_qnn

REPO = Path(__file__).resolve().parents[1]
STATIC_FILES = ("prefill.onnx", "decode.onnx", "model.onnx.data")


def cli_build(recipe: str, tmp_path: Path) -> tuple[dict, Path]:
    """`edgepipe build <recipe> -p qnn-htp --json` in a fresh process, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "EDGEPIPE_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "dist"
    command = [sys.executable, "-m", "edgepipe", "build", recipe, "-p", "qnn-htp"]
    done = subprocess.run(
        [*command, "-o", str(out), "--json"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout), out  # stdout is the JSON report and nothing else


def check_artifact(report: dict, recipe: str) -> None:
    (build,) = report["builds"]
    assert build["status"] == "built" and build["precision"] == "int8"
    folder = Path(build["artifact"])
    assert folder.parts[-2:] == (recipe, "qnn-htp")
    artifact = load_artifact(folder, verify=True)  # every sha256 of the manifest holds
    manifest = artifact.manifest
    validation = manifest["validation"]
    assert validation["passed"] and validation["provider"] == "QNNExecutionProvider"
    assert validation["cosine"] >= manifest["recipe"]["content"]["validation"]["min_cosine"]
    assert validation["htp_vs_cpu"]["cosine"] > 0.9999
    assert manifest["static"]["kv_capacity"] == 1024 and manifest["static"]["chunk"] == 64
    assert manifest["profile"]["graph_variant"] == "static"
    assert set(artifact.ep_context) == {"prefill", "decode"}
    assert validation["static_checks"]["passed"]
    assert set(validation["static_checks"]["graphs"]) == {"prefill.onnx", "decode.onnx"}
    assert manifest["provider_check"]["provider_run"] is True
    assert "simulation" in manifest["provider_check"]["note"]
    for name in STATIC_FILES:
        assert (folder / name).is_file()
    # The artifact runs on the QNN provider from its compiled EPContext graphs.
    gen = Generator(folder)
    assert gen.provider == "QNNExecutionProvider"
    assert {p.name for p in gen.engine.files.values()} == {"prefill_ctx.onnx", "decode_ctx.onnx"}
    result = gen.generate("Hello", max_new_tokens=2, stop_token_ids=[])
    assert len(result.token_ids) == 2


# Both CLI builds take minutes (real vocabulary, simulated HTP): slow, like every full build.
# Under `-m "not slow"` the static pipeline is still built end to end by `small_static_build`.
@needs_qnn
@pytest.mark.slow
def test_tiny_qwen3_builds_for_qnn_htp_from_the_command_line(tmp_path):
    report, _ = cli_build("recipes/tiny-qwen3.yaml", tmp_path)
    check_artifact(report, "tiny-qwen3")


@needs_qnn
@pytest.mark.slow
def test_tiny_qwen2_builds_for_qnn_htp_from_the_command_line(tmp_path):
    report, _ = cli_build("recipes/tiny-qwen2.yaml", tmp_path)
    check_artifact(report, "tiny-qwen2")


@needs_qnn
def test_a_rebuild_reuses_the_cached_exports_and_gives_the_same_graphs(
    small_static_build, tmp_path
):
    first = small_static_build("qwen2", "int8")
    recipe = small_static_build.recipes[("qwen2", "int8")]
    plans = plan_builds([str(recipe)], None, "int8")
    (again,) = build_all(plans, BuildOptions(tmp_path, "int8", small_static_build.cache_dir))
    assert again.status == "built" and again.cached
    assert again.stage_seconds["export"] < first.stage_seconds["export"]
    for name in STATIC_FILES:
        assert sha256_file(Path(again.artifact) / name) == sha256_file(Path(first.artifact) / name)


def test_without_onnxruntime_qnn_a_static_build_is_refused_with_exit_2(
    tmp_path, capsys, monkeypatch
):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "onnxruntime_qnn" else real(name, *a),
    )
    code = main(["build", "tiny-qwen2", "-p", "qnn-htp", "-o", str(tmp_path), "--json"])
    assert code == 2
    (build,) = json.loads(capsys.readouterr().out)["builds"]
    assert build["status"] == "invalid"
    assert "pip install onnxruntime-qnn" in build["error"]
    assert not (tmp_path / "tiny-qwen2").exists()


@needs_qnn
def test_an_op_outside_the_profile_fails_the_static_build_naming_it(
    small_static_build, tmp_path, capsys
):
    small_static_build("qwen2", "int8")  # the model folder and the cached exports
    recipe = yaml.safe_load(small_static_build.recipes[("qwen2", "int8")].read_text())
    profile_path = small_static_build.recipes[("qwen2", "int8")].parent / "qnn-small.yaml"
    profile = yaml.safe_load(profile_path.read_text())
    profile.update(name="qnn-no-softmax", ops=[op for op in profile["ops"] if op != "Softmax"])
    (tmp_path / "qnn-no-softmax.yaml").write_text(yaml.safe_dump(profile))
    recipe.update(name="no-softmax", targets=["qnn-no-softmax.yaml"])
    (tmp_path / "no-softmax.yaml").write_text(yaml.safe_dump(recipe))
    argv = ["build", str(tmp_path / "no-softmax.yaml"), "-o", str(tmp_path / "dist"), "--json"]
    assert main([*argv, "--cache-dir", str(small_static_build.cache_dir)]) == 1
    (build,) = json.loads(capsys.readouterr().out)["builds"]
    assert "static check failed: prefill.onnx: op Softmax" in build["error"]
    assert "decode.onnx: op Softmax" in build["error"]
    assert not (tmp_path / "dist" / "no-softmax").exists()
