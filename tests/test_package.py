"""Tests for edgepipe.stages.package: artifact files, genai/generation configs and the manifest."""

from __future__ import annotations

import json

import pytest

from edgepipe.build.cache import sha256_file
from edgepipe.runtime.artifact import load_artifact
from edgepipe.schema import load_profile, load_recipe
from edgepipe.stages.package import (
    MANIFEST,
    decoder_record,
    generation_config,
    package_artifact,
    update_genai_config,
)
from tests.fixtures.toy import build_toy_artifact


@pytest.fixture(scope="module")
def packaged(tmp_path_factory, qwen3_tokenizer_dir):
    folder = tmp_path_factory.mktemp("pkg") / "artifact"
    build_toy_artifact(folder, qwen3_tokenizer_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (folder / name).unlink()
    (folder / "generation_config.json").unlink()
    recipe = load_recipe("tiny-qwen3").model_dump(mode="json")
    profile = load_profile("cpu-x64").model_dump(mode="json")
    manifest = package_artifact(
        folder,
        recipe=recipe,
        profile=profile,
        family="qwen3",
        precision="int4",
        source={"kind": "preset", "preset": "tiny-qwen3", "seed": 0},
        reports={"validation": {"passed": True}, "quality": {"kl": 0.01}},
        build_seconds=1.5,
    )
    return folder, manifest, recipe


def test_artifact_has_every_contract_file(packaged):
    folder, _, _ = packaged
    for name in (
        "model.onnx",
        "model.onnx.data",
        "genai_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
        MANIFEST,
    ):
        assert (folder / name).is_file(), name


def test_manifest_checksums_cover_every_other_file_and_verify(packaged):
    folder, manifest, _ = packaged
    on_disk = sorted(p.name for p in folder.iterdir() if p.name != MANIFEST)
    assert sorted(manifest["files"]) == on_disk
    assert manifest["files"]["model.onnx.data"] == sha256_file(folder / "model.onnx.data")
    artifact = load_artifact(folder, verify=True)
    assert artifact.provider == "CPUExecutionProvider"
    assert artifact.graph_variant == "dynamic"


def test_manifest_records_provenance_and_reports(packaged):
    _, manifest, recipe = packaged
    assert manifest["recipe"]["name"] == "tiny-qwen3"
    assert len(manifest["recipe"]["sha256"]) == 64
    assert manifest["profile"]["name"] == "cpu-x64"
    assert manifest["source"] == {"kind": "preset", "preset": "tiny-qwen3", "seed": 0}
    assert set(manifest["versions"]) == {"edgepipe", "onnx", "onnx-ir", "onnxruntime"}
    assert manifest["quality"] == {"kl": 0.01}
    assert manifest["build_seconds"] == 1.5
    assert manifest["peak_rss_bytes"] > 0
    assert manifest["size_bytes"] > 0


def test_decoder_record_lists_the_graph_inputs_that_are_initializers(packaged, tmp_path):
    import numpy as np
    import onnx

    folder, manifest, _ = packaged
    assert manifest["decoder"] is None  # a build without the record (static builds)
    assert decoder_record(folder / "model.onnx") == {"overridable_inputs": {}}
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(1), "logits_to_keep"))
    model.graph.input.append(onnx.helper.make_tensor_value_info("logits_to_keep", 7, []))
    onnx.save(model, str(tmp_path / "model.onnx"))
    record = decoder_record(tmp_path / "model.onnx")
    assert record == {"overridable_inputs": {"logits_to_keep": 1}}


def test_generation_defaults_reach_both_configs(packaged):
    folder, _, recipe = packaged
    gen = json.loads((folder / "generation_config.json").read_text())
    wanted = recipe["generation"]
    assert gen["temperature"] == wanted["temperature"]
    assert gen["top_k"] == wanted["top_k"]
    assert gen["do_sample"] is True
    assert gen["eos_token_id"] == [151645, 151643]
    search = json.loads((folder / "genai_config.json").read_text())["search"]
    assert search["top_p"] == wanted["top_p"]
    assert search["do_sample"] is True
    assert search["past_present_share_buffer"] is True  # the export's own keys stay


def test_runtime_runs_the_packaged_artifact_like_the_unpackaged_model(
    packaged, tmp_path, qwen3_tokenizer_dir
):
    from edgepipe.runtime import Generator

    # Packaging rewrote the tokenizer files and the configs: the runtime must still encode,
    # decode and stop exactly as with the model's own files.
    unpackaged = build_toy_artifact(tmp_path / "toy", qwen3_tokenizer_dir)
    params = {"max_new_tokens": 4, "do_sample": False}
    ours = Generator(packaged[0]).generate("Hello", **params)
    theirs = Generator(unpackaged).generate("Hello", **params)
    assert ours.prompt_token_ids == theirs.prompt_token_ids
    assert (ours.token_ids, ours.text) == (theirs.token_ids, theirs.text)


def test_zero_temperature_means_greedy():
    config = generation_config({"temperature": 0.0, "top_k": 20}, [151643])
    assert config["do_sample"] is False
    assert config["pad_token_id"] == 151643


def test_provider_options_go_to_genai_session_options(tmp_path):
    (tmp_path / "genai_config.json").write_text(json.dumps({"model": {"decoder": {}}}))
    update_genai_config(tmp_path, {}, "QNNExecutionProvider", {"backend_type": "htp"})
    config = json.loads((tmp_path / "genai_config.json").read_text())
    options = config["model"]["decoder"]["session_options"]["provider_options"]
    assert options == [{"qnn": {"backend_type": "htp"}}]


def test_missing_genai_config_fails_the_build(tmp_path):
    from edgepipe.errors import BuildFailed

    with pytest.raises(BuildFailed, match="genai_config.json"):
        update_genai_config(tmp_path, {}, "CPUExecutionProvider", {})
