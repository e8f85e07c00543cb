"""`source.adapter` end to end (edgepipe.stages.adapter): the exported decoder with an adapter
against transformers + peft, builds through the CLI, the cache key and manifest, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import yaml

from edgepipe.build.plan import plan_builds
from edgepipe.build.run import BuildOptions, build_all
from edgepipe.cli.main import main
from edgepipe.errors import InvalidInput
from edgepipe.runtime.artifact import load_artifact
from edgepipe.schema import AdapterSource, Source
from edgepipe.schema import shipped as resources
from edgepipe.stages.adapter import adapter_from_recipe
from edgepipe.stages.source import source_from_recipe
from tests.fixtures.lora import edit_adapter_config, hf_greedy_logits, save_tiny_adapter

pytest.importorskip("peft")

SMALL_PROMPT = [1, 17, 993, 40, 5, 123, 7]
TOL = 1e-4


def stage(block: dict):
    """The source stage of a recipe whose `source:` block is `block` (validated as a recipe's)."""
    return source_from_recipe(Source.model_validate(block))


def _greedy(model_path: Path, prompt: list[int], steps: int):
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    past = {
        i.name: np.zeros([1, i.shape[1], 0, i.shape[3]], np.float32)
        for i in session.get_inputs()
        if i.name.startswith("past_key_values.")
    }
    names = [o.name for o in session.get_outputs()]
    ids, total, logits, tokens = np.array([prompt], np.int64), len(prompt), [], []
    for _ in range(steps + 1):
        feeds = {"input_ids": ids, "attention_mask": np.ones((1, total), np.int64), **past}
        outs = dict(zip(names, session.run(None, feeds), strict=True))
        logits.append(outs["logits"][0, -1])
        tokens.append(int(logits[-1].argmax()))
        past = {n.replace("present.", "past_key_values."): outs[n] for n in names[1:]}
        ids, total = np.array([[tokens[-1]]], np.int64), total + 1
    return logits, tokens


@pytest.mark.parametrize("case", ["qwen2-all-rslora", "qwen3-patterns", "qwen2-saved-embed"])
def test_export_with_adapter_matches_transformers_peft_merge(case, lora_cases, tmp_path):
    from edgepipe.stages.export.dynamic import build_decoder

    base, adapter, reference = lora_cases[case]
    source = stage({"path": str(base), "adapter": {"path": str(adapter)}})
    build_decoder(base, tmp_path, context_length=128, weights=source.weights(base))
    logits, tokens = _greedy(tmp_path / "model.onnx", SMALL_PROMPT, 16)
    ref_logits, ref_tokens = hf_greedy_logits(reference, SMALL_PROMPT, 16)
    diffs = [float(np.abs(a - b).max()) for a, b in zip(logits, ref_logits, strict=True)]
    assert max(diffs) <= TOL, diffs
    assert tokens == ref_tokens
    base_logits, _ = hf_greedy_logits(base, SMALL_PROMPT, 0)
    assert np.abs(base_logits[0] - ref_logits[0]).max() > 1e-2  # the adapter matters


# ------------------------------------------------------------------------ builds (CLI + API)


@pytest.fixture(scope="module")
def qwen2_adapter(tiny_qwen2_dir, tmp_path_factory) -> Path:
    return save_tiny_adapter(
        tiny_qwen2_dir,
        tmp_path_factory.mktemp("adapter") / "a",
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
    )


def _recipe(folder: Path, base: Path, adapter: Path | None) -> Path:
    """tiny-qwen2's recipe with the base folder (and adapter) as its source."""
    data = yaml.safe_load(resources.resolve_recipe("tiny-qwen2").read_text(encoding="utf-8"))
    data["source"] = {"path": str(base)}
    if adapter is not None:
        data["source"]["adapter"] = {"path": str(adapter)}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny-qwen2.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_cli_builds_an_adapter_and_the_manifest_names_it(
    tiny_qwen2_dir, qwen2_adapter, tmp_path, capsys
):
    recipe = _recipe(tmp_path / "r", tiny_qwen2_dir, qwen2_adapter)
    out = tmp_path / "dist"
    code = main(
        ["build", str(recipe), "-p", "cpu-x64", "--precision", "fp32", "-o", str(out), "--no-cache"]
    )
    assert code == 0, capsys.readouterr()
    manifest = load_artifact(out / "tiny-qwen2" / "cpu-x64", verify=True).manifest
    adapter = manifest["source"]["adapter"]
    assert adapter["path"] == str(qwen2_adapter)
    assert set(adapter["files"]) == {"adapter_config.json", "adapter_model.safetensors"}
    assert set(adapter["config"]["target_modules"]) == {"q_proj", "v_proj", "down_proj"}
    # The transformers reference is the merged fine-tune: fp32 matches it.
    assert manifest["validation"]["reference"] == "transformers"
    assert manifest["validation"]["logit_abs_diff"] <= 1e-3


def test_int4_build_reports_quality_against_the_merged_reference(
    tiny_qwen2_dir, qwen2_adapter, tmp_path
):
    recipe = _recipe(tmp_path / "r", tiny_qwen2_dir, qwen2_adapter)
    plans = plan_builds([str(recipe)], ["cpu-x64"], "int4")
    (result,) = build_all(plans, BuildOptions(tmp_path / "dist", "int4", tmp_path / "cache"))
    assert result.status == "built", result.error
    manifest = load_artifact(Path(result.artifact)).manifest
    assert manifest["quality"]["reference"] == "unquantized-export"
    assert 0 <= manifest["quality"]["top1_agreement"] <= 1
    assert "adapter" in manifest["source"]


def test_cli_refuses_a_dora_adapter_with_exit_2(tiny_qwen2_dir, qwen2_adapter, tmp_path, capsys):
    dora = shutil.copytree(qwen2_adapter, tmp_path / "dora")
    edit_adapter_config(dora, use_dora=True)
    recipe = _recipe(tmp_path / "r", tiny_qwen2_dir, dora)
    out = tmp_path / "dist"
    code = main(
        ["build", str(recipe), "-p", "cpu-x64", "--precision", "fp32", "-o", str(out), "--no-cache"]
    )
    captured = capsys.readouterr()
    assert code == 2
    assert "use_dora: True: not supported" in captured.out + captured.err
    assert not (out / "tiny-qwen2").exists()


# ------------------------------------------------------------------------ identity, refusals


def test_the_adapter_changes_the_source_identity(tiny_qwen2_dir, qwen2_adapter, tmp_path):
    plain = stage({"path": str(tiny_qwen2_dir)}).identity()
    with_adapter = stage(
        {"path": str(tiny_qwen2_dir), "adapter": {"path": str(qwen2_adapter)}}
    ).identity()
    assert {k: v for k, v in with_adapter.items() if k != "adapter"} == plain
    edited = edit_adapter_config(shutil.copytree(qwen2_adapter, tmp_path / "b"), lora_alpha=4)
    other = stage({"path": str(tiny_qwen2_dir), "adapter": {"path": str(edited)}}).identity()
    assert other["adapter"]["files"] != with_adapter["adapter"]["files"]


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing-config", "no adapter_config.json"),
        ("pickle-only", "adapter_model.bin"),
        ("dora", "use_dora"),
    ],
)
def test_bad_adapters_raise_invalid_input(qwen2_adapter, tmp_path, kind, message):
    folder = shutil.copytree(qwen2_adapter, tmp_path / kind)
    if kind == "missing-config":
        (folder / "adapter_config.json").unlink()
    elif kind == "pickle-only":
        (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    else:
        edit_adapter_config(folder, use_dora=True)
    with pytest.raises(InvalidInput, match=message):
        adapter_from_recipe(AdapterSource.model_validate({"path": str(folder)})).identity()


def test_adapter_for_another_size_is_refused_before_export(
    tiny_qwen2_dir, make_tiny_model, tmp_path
):
    other = save_tiny_adapter(
        make_tiny_model("qwen2", hidden_size=64), tmp_path / "a", r=2, target_modules=["q_proj"]
    )
    source = stage({"path": str(tiny_qwen2_dir), "adapter": {"path": str(other)}})
    with pytest.raises(InvalidInput, match="trained on another model size"):
        source.weights(tiny_qwen2_dir)


def test_modelscope_source_with_adapter_reads_a_prefilled_cache(
    tiny_qwen2_dir, qwen2_adapter, tmp_path, monkeypatch
):
    pytest.importorskip("modelscope")
    cache = tmp_path / "ms"
    for repo, folder in (("Qwen/Tiny", tiny_qwen2_dir), ("me/tiny-lora", qwen2_adapter)):
        shutil.copytree(folder, cache / "models" / repo.replace("/", "--") / "snapshots" / "v1.0")
    monkeypatch.setenv("MODELSCOPE_CACHE", str(cache))
    monkeypatch.setenv("MODELSCOPE_OFFLINE", "1")
    source = stage(
        {
            "modelscope": {"id": "Qwen/Tiny", "revision": "v1.0"},
            "adapter": {"modelscope": {"id": "me/tiny-lora", "revision": "v1.0"}},
        }
    )
    ident = source.identity()
    assert ident["modelscope"] == "Qwen/Tiny" and ident["revision"] == "v1.0"
    assert ident["adapter"]["modelscope"] == "me/tiny-lora"
    model_dir = source.materialize(tmp_path / "work")
    assert json.loads((model_dir / "config.json").read_text())["hidden_size"] == 128
    assert "model.layers.0.self_attn.q_proj.weight" in source.weights(model_dir)


def test_the_docs_example_recipe_is_valid():
    from edgepipe import schema

    recipe = schema.load_recipe(
        Path(__file__).parents[1] / "docs/recipes/qwen2.5-0.5b-instruct-lora.yaml"
    )
    assert recipe.source.adapter.path.name == "my-qwen2.5-0.5b-lora"
