"""Reading artifact folders: required files, corrupt files, checksums, providers."""

from __future__ import annotations

import json
import shutil

import pytest

from edgepipe.runtime import ArtifactError, Generator, ProviderUnavailable, load_artifact
from edgepipe.runtime.verify import sha256_file
from tests.fixtures.toy import build_toy_artifact


@pytest.fixture(scope="module")
def toy_source(tmp_path_factory, qwen3_tokenizer_dir):
    return build_toy_artifact(tmp_path_factory.mktemp("toy-src") / "artifact", qwen3_tokenizer_dir)


@pytest.fixture
def toy(toy_source, tmp_path):
    folder = tmp_path / "artifact"
    shutil.copytree(toy_source, folder)
    return folder


def write_manifest(folder, provider="CPUExecutionProvider", package=None, **extra):
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}
    profile = {"provider": provider, "provider_options": {}, "graph_variant": "dynamic"}
    if package:
        profile["package"] = package
    manifest = {"profile": profile, "files": files, **extra}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_a_bare_export_folder_runs_on_cpu_without_checksums(toy):
    artifact = load_artifact(toy)
    assert artifact.manifest is None
    assert artifact.provider == "CPUExecutionProvider"
    assert artifact.num_layers == 2 and artifact.head_dim == 16
    assert artifact.eos_token_ids == (151645, 151643)


def test_overridable_decoder_inputs_come_from_the_manifest(toy):
    write_manifest(toy)  # an artifact built before the manifest's `decoder` record
    assert load_artifact(toy).overridable_inputs == {}
    write_manifest(toy, decoder={"overridable_inputs": {"logits_to_keep": 1}})
    assert load_artifact(toy).overridable_inputs == {"logits_to_keep": 1}


def test_checksums_pass_on_an_intact_artifact(toy):
    write_manifest(toy)
    assert load_artifact(toy, verify=True).manifest["profile"]["provider"] == "CPUExecutionProvider"


def test_a_corrupt_weight_file_fails_its_checksum_naming_the_file(toy):
    write_manifest(toy)
    with (toy / "model.onnx.data").open("r+b") as handle:
        handle.seek(100)
        handle.write(b"\x00\x01\x02\x03")
    with pytest.raises(ArtifactError, match=r"model\.onnx\.data: sha256 .* the file is corrupt"):
        Generator(toy, verify_checksums=True)


@pytest.mark.parametrize("name", ["genai_config.json", "tokenizer.json", "model.onnx"])
def test_a_missing_file_raises_naming_it(toy, name):
    (toy / name).unlink()
    with pytest.raises(ArtifactError, match=name.replace(".", r"\.") + ".*missing") as info:
        Generator(toy)
    assert info.value.path.name == name


def test_missing_external_weights_raise_naming_the_model(toy):
    (toy / "model.onnx.data").unlink()
    with pytest.raises(ArtifactError, match=r"model\.onnx: onnxruntime could not load it"):
        Generator(toy)


def test_a_corrupt_json_file_raises_naming_it(toy):
    (toy / "genai_config.json").write_text("{not json")
    with pytest.raises(ArtifactError, match=r"genai_config\.json: not a readable JSON file"):
        load_artifact(toy)


def test_genai_config_without_decoder_fields_is_reported(toy):
    (toy / "genai_config.json").write_text(json.dumps({"model": {"decoder": {}}}))
    with pytest.raises(ArtifactError, match=r"genai_config\.json: missing or invalid model field"):
        load_artifact(toy)


def test_a_provider_that_is_not_installed_names_its_pip_package(toy):
    write_manifest(toy, provider="DmlExecutionProvider", package="onnxruntime-directml")
    with pytest.raises(ProviderUnavailable, match="pip install onnxruntime-directml"):
        Generator(toy)


def test_an_explicit_provider_overrides_the_profile(toy):
    write_manifest(toy, provider="DmlExecutionProvider", package="onnxruntime-directml")
    assert Generator(toy, provider="CPUExecutionProvider").provider == "CPUExecutionProvider"


def test_a_static_manifest_without_a_graph_pipeline_names_what_is_missing(toy):
    write_manifest(toy)
    manifest = json.loads((toy / "manifest.json").read_text())
    manifest["profile"]["graph_variant"] = "static"
    (toy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"decoder\.pipeline has no \['prefill', 'decode'\]"):
        Generator(toy)


def test_an_unknown_graph_variant_is_refused_with_the_known_ones(toy):
    write_manifest(toy)
    manifest = json.loads((toy / "manifest.json").read_text())
    manifest["profile"]["graph_variant"] = "tiled"
    (toy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        Exception, match="graph_variant 'tiled' is not supported .* dynamic, static"
    ):
        Generator(toy)


def test_chat_template_falls_back_to_tokenizer_config(toy):
    text = (toy / "chat_template.jinja").read_text()
    (toy / "chat_template.jinja").unlink()
    config = json.loads((toy / "tokenizer_config.json").read_text())
    config["chat_template"] = text
    (toy / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_artifact(toy).chat_template() == text


def test_chat_without_any_template_names_the_missing_file(toy):
    (toy / "chat_template.jinja").unlink()
    config = json.loads((toy / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (toy / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match=r"chat_template\.jinja: missing"):
        Generator(toy).chat([{"role": "user", "content": "hi"}])
