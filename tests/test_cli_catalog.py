"""`edgepipe list` and `edgepipe validate`, as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgepipe.cli.main import main
from edgepipe.schema import shipped as resources

TINY = resources.recipe_files()["tiny-qwen2"].read_text(encoding="utf-8")


@pytest.fixture(autouse=True)
def _cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_validate_passes_on_every_shipped_file(capsys):
    assert main(["validate"]) == 0
    out = capsys.readouterr().out
    count = len(resources.recipe_files()) + len(resources.profile_files())
    assert out.strip() == f"ok: {count} file(s) valid"


def test_list_prints_one_line_per_recipe_and_profile(capsys):
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines if line.startswith("  ")]
    assert names == [*resources.profile_files(), *resources.recipe_files()]
    qnn = next(line for line in lines if line.strip().startswith("qnn-htp"))
    assert "QNN, static" in qnn
    tiny = next(line for line in lines if line.strip().startswith("tiny-qwen2"))
    assert tiny.endswith("[cpu-x64,cpu-arm64,directml,qnn-htp]")


BAD = {
    "unknown key": (
        TINY.replace("  lm_head: same", "  lm_head: same\n  bits: 4"),
        "tiny-qwen2.yaml: precision.bits: unknown key 'bits'; allowed keys: weights, method",
    ),
    "wrong type": (
        TINY.replace("seed: 0 ", "seed: zero "),
        "tiny-qwen2.yaml: source.preset.seed: Input should be a valid integer",
    ),
    "unknown profile in targets": (
        TINY.replace("qnn-htp]", "hexagon]"),
        "tiny-qwen2.yaml: targets[3]: unknown profile 'hexagon'; known profiles: cpu-arm64, "
        "cpu-x64, directml, qnn-htp",
    ),
    "two sources at once": (
        TINY.replace("source:\n", "source:\n  path: ./model\n"),
        "tiny-qwen2.yaml: source: give exactly one of hub, modelscope, path, preset, bundled "
        "(got path, preset)",
    ),
    "malformed yaml": (
        TINY.replace("targets: [cpu-x64,", "targets: [cpu-x64,,"),
        "tiny-qwen2.yaml: line 12, column",
    ),
    "block size not a power of two": (
        TINY.replace("  lm_head: same", "  lm_head: same\n  block_size: 100"),
        "tiny-qwen2.yaml: precision.block_size: must be a power of two from 16 to 256",
    ),
    "bits not in the set": (
        TINY.replace("  lm_head: same", "  lm_head: int2"),
        "tiny-qwen2.yaml: precision.lm_head: must be one of 'int4', 'int8', 'fp16', 'fp32' or "
        "'same'; got 'int2'",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_validate_exits_2_naming_file_and_field(case, tmp_path, capsys):
    text, expected = BAD[case]
    assert text != TINY, "the replacement must change the recipe"
    path = write(tmp_path / "tiny-qwen2.yaml", text)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"error: {expected}" in err, err


def test_validate_reports_a_missing_file_and_keeps_going(tmp_path, capsys):
    good = write(tmp_path / "tiny-qwen2.yaml", TINY)
    assert main(["validate", "missing.yaml", str(good), "also-missing.yaml"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: missing.yaml: file not found",
        "error: also-missing.yaml: file not found",
    ]


def test_validate_lets_a_recipe_target_a_profile_given_alongside(tmp_path, capsys):
    profile = resources.profile_files()["cpu-x64"].read_text(encoding="utf-8")
    write(tmp_path / "lab-cpu.yaml", profile.replace("name: cpu-x64", "name: lab-cpu"))
    write(tmp_path / "tiny-qwen2.yaml", TINY.replace("cpu-x64, cpu-arm64", "lab-cpu, cpu-arm64"))
    assert main(["validate", "tiny-qwen2.yaml"]) == 2
    assert "targets[0]: unknown profile 'lab-cpu'" in capsys.readouterr().err
    assert main(["validate", "lab-cpu.yaml", "tiny-qwen2.yaml"]) == 0


def test_console_script_validates_and_fails_with_exit_2(tmp_path):
    script = Path(sys.executable).with_name("edgepipe")
    assert script.exists(), "the console script is installed with `pip install -e .`"
    env = {**os.environ, "PYTHONWARNINGS": "error::DeprecationWarning"}
    ok = subprocess.run([str(script), "validate"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    bad = write(
        tmp_path / "tiny-qwen2.yaml", TINY.replace("name: tiny-qwen2", "nme: tiny-qwen2", 1)
    )
    run = subprocess.run([str(script), "validate", str(bad)], capture_output=True, text=True)
    assert run.returncode == 2
    assert "tiny-qwen2.yaml: nme: unknown key 'nme' (did you mean 'name'?)" in run.stderr
    assert "tiny-qwen2.yaml: name: required field is missing" in run.stderr


def test_validate_expands_a_folder_to_its_yaml_files(tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    write(folder / "tiny-qwen2.yaml", TINY)
    write(folder / "notes.txt", "not a recipe")
    assert main(["validate", "mine"]) == 0
    assert capsys.readouterr().out.strip() == "ok: 1 file(s) valid"


def test_list_marks_a_broken_file_invalid_and_keeps_listing(tmp_path, monkeypatch, capsys):
    broken = write(tmp_path / "broken.yaml", "name: [unclosed\n")
    shipped = {"broken": broken, **resources.recipe_files()}
    monkeypatch.setattr(resources, "recipe_files", lambda: shipped)
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert f"broken                       INVALID (run: edgepipe validate {broken})" in out
    assert "tiny-qwen3" in out


def test_list_into_a_closed_pipe_exits_quietly():
    # `edgepipe list | head -1`: the reader has gone before we write; no traceback.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "edgepipe", "list"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
    finally:
        os.close(write_end)
    assert proc.returncode == 141
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr
