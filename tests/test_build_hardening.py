"""Build-side input that used to slip through or end in a traceback: each refused, exit 2."""

from __future__ import annotations

import json

import pytest
import yaml

from edgepipe.arch.families import family_mismatch
from edgepipe.arch.spec import rope_theta
from edgepipe.build.plan import plan_builds
from edgepipe.build.shared import MIN_TEXT_TOKENS, evaluation_ids
from edgepipe.cli.main import main
from edgepipe.errors import InvalidInput
from edgepipe.schema import load_recipe
from edgepipe.schema import shipped as resources

QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}


@pytest.mark.parametrize(
    "config, named",
    [
        # A default rope_parameters does not make the rope_scaling beside it go away.
        (
            {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
             "rope_scaling": {"type": "yarn", "factor": 4.0}},
            "rope_scaling: rope type 'yarn'",
        ),
        ({"rope_scaling": {"rope_type": "nosuch"}}, "rope_scaling: rope type 'nosuch'"),
        ({"rope_parameters": {"rope_type": "default", "factor": 2.0}}, r"\['factor'\]"),
        ({"rope_scaling": {"factor": 2.0}}, r"rope_scaling: \['factor'\]"),
        ({"rope_scaling": "linear"}, "rope_scaling: expected an object"),
    ],
)  # fmt: skip
def test_rope_settings_the_exporter_does_not_implement_are_refused(config, named):
    with pytest.raises(InvalidInput, match=named):
        rope_theta(config, "config.json")


def test_plain_rope_settings_are_read():
    assert rope_theta({"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}, "c") == 5e5
    assert rope_theta({"rope_theta": 1e4, "rope_scaling": None}, "c") == 1e4


def test_a_family_that_contradicts_the_checkpoint_is_refused():
    assert "checkpoint's config.json is qwen2" in family_mismatch("qwen3", QWEN2)
    assert family_mismatch("qwen2", QWEN2) is None


def write_recipe(folder, **changes):
    recipe = yaml.safe_load(resources.resolve_recipe("tiny-qwen2").read_text(encoding="utf-8"))
    recipe.update(name="probe", targets=["cpu-x64"], **changes)
    path = folder / "probe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def test_validate_refuses_family_qwen3_on_a_qwen2_folder(tiny_qwen2_dir, tmp_path):
    path = write_recipe(tmp_path, source={"path": str(tiny_qwen2_dir)}, family="qwen3")
    with pytest.raises(InvalidInput, match="family: 'qwen3', but the checkpoint's"):
        load_recipe(path)


def test_a_one_token_evaluation_text_is_refused(tmp_path):
    (tmp_path / "eval.txt").write_text("Hi", encoding="utf-8")
    path = write_recipe(tmp_path, evaluation={"file": "eval.txt"})
    (plan,) = plan_builds([str(path)])
    with pytest.raises(InvalidInput, match=f"gives 1 tokens; at least {MIN_TEXT_TOKENS}"):
        evaluation_ids(plan, "qwen2", 151936)


def test_a_non_utf8_evaluation_text_is_refused(tmp_path):
    (tmp_path / "eval.txt").write_bytes(b"caf\xe9 " * 40)
    path = write_recipe(tmp_path, evaluation={"file": "eval.txt"})
    (plan,) = plan_builds([str(path)])
    with pytest.raises(InvalidInput, match=r"eval\.txt: not UTF-8 text \(byte 0xe9 at offset 3\)"):
        evaluation_ids(plan, "qwen2", 151936)


def test_matrix_refuses_an_unknown_profile(capsys):
    assert main(["matrix", "tiny-qwen2", "-p", "nosuch"]) == 2
    assert "nosuch: unknown device profile" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["-o", "--cache-dir"])
def test_build_refuses_a_file_where_a_folder_belongs(flag, tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    assert main(["build", "tiny-qwen2", "-p", "cpu-x64", flag, str(tmp_path / "a-file")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file, not a folder" in err[0]


def test_build_refuses_an_output_folder_it_cannot_create(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    assert main(["build", "tiny-qwen2", "-o", str(tmp_path / "a-file" / "out")]) == 2
    assert "-o/--out: cannot create folder" in capsys.readouterr().err


def test_build_json_prints_a_report_when_the_input_is_invalid(capsys):
    assert main(["build", "nosuch", "--json"]) == 2
    report = json.loads(capsys.readouterr().out)
    assert report["exit_code"] == 2 and "nosuch: unknown recipe" in report["errors"][0]


def test_a_failed_build_does_not_repeat_its_name(tmp_path, monkeypatch):
    from edgepipe.build import run as build_run
    from edgepipe.errors import BuildFailed

    (plan,) = plan_builds(["tiny-qwen2"], ["cpu-x64"])

    class Failing:
        @staticmethod
        def supported_here(plan):
            return None

        @staticmethod
        def build_into(plan, cache, tmp, result, stages, start):
            raise BuildFailed(f"{plan.name}: validation failed against the reference: kl 9")

    monkeypatch.setitem(build_run.VARIANTS, plan.profile.graph_variant, Failing)
    result = build_run.build_one(plan, build_run.BuildOptions(tmp_path / "dist", None, tmp_path))
    assert result.status == "failed"
    assert result.error == "validation failed against the reference: kl 9"
