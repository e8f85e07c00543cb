"""Reading an artifact folder: manifest, genai config, generation defaults, checksums.

An artifact (see docs/contracts.md, "Artifact folder") holds `model.onnx` (+ `model.onnx.data`),
`genai_config.json`, the tokenizer files, `generation_config.json` and `manifest.json`. A bare
export folder (no manifest) is accepted too: it runs on the CPU provider, without checksums. A
static (NPU) artifact has a prefill and a decode graph instead of `model.onnx`, listed in
genai_config.json's `decoder.pipeline`, and its manifest may name compiled EPContext graphs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from edgepipe.runtime.errors import ArtifactError
from edgepipe.runtime.providers import CPU_PROVIDER, install_package
from edgepipe.runtime.verify import SKIPPED, UNVERIFIABLE, VERIFIED, verify_files

# A bare export folder (no manifest profile) runs on the plain onnxruntime wheel.
CPU_PACKAGE = install_package(CPU_PROVIDER)

# Files the runtime cannot work without (the chat template is optional: `chat()` needs it).
REQUIRED_FILES = ("genai_config.json", "tokenizer.json")


@dataclass(frozen=True)
class Artifact:
    """What the runtime needs to know about an artifact folder.

    Attributes:
        path: the folder.
        model_path: the decoder `.onnx` file (from `genai_config.json` decoder.filename).
        num_layers, num_kv_heads, head_dim: KV-cache geometry of the decoder.
        context_length: the model's context window in tokens.
        vocab_size: logits width.
        eos_token_ids: the default stop tokens (genai config and generation config, merged).
        pad_token_id: the id fed to finished rows of a batch.
        provider: the onnxruntime execution provider the artifact was built for.
        provider_options: options for that provider (from the manifest's profile).
        package: the pip package that provides `provider` (for error messages).
        graph_variant: `dynamic` (contrib ops) or `static` (NPU graphs).
        generation_config: `generation_config.json` as a dict (empty when absent).
        manifest: `manifest.json` as a dict, or None for a bare export folder.
        input_names: decoder input names from genai config (`input_ids`, `attention_mask`,
            `past_key_names`, `past_value_names`, optional `position_ids`).
        output_names: decoder output names (`logits`, `present_key_names`, `present_value_names`).
        pipeline: static artifacts: stage name (`prefill`, `decode`) -> graph file.
        ep_context: static artifacts: stage name -> compiled EPContext graph (from the manifest's
            `static.ep_context`), empty when none was compiled.
        overridable_inputs: decoder inputs that are also initializers, name -> default (from
            the manifest's `decoder`; e.g. `logits_to_keep`), empty for older artifacts.
        verification: what was checked: `verified` (every manifest sha256 holds), not verified
            (turned off), or `unverifiable: ...` (no manifest.json to check against).
    """

    path: Path
    model_path: Path
    num_layers: int
    num_kv_heads: int
    head_dim: int
    context_length: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    provider: str = CPU_PROVIDER
    provider_options: dict = field(default_factory=dict)
    package: str = CPU_PACKAGE
    graph_variant: str = "dynamic"
    generation_config: dict = field(default_factory=dict)
    manifest: dict | None = None
    input_names: dict = field(default_factory=dict)
    output_names: dict = field(default_factory=dict)
    pipeline: dict = field(default_factory=dict)
    ep_context: dict = field(default_factory=dict)
    overridable_inputs: dict = field(default_factory=dict)
    verification: str = SKIPPED

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.json"

    def chat_template(self) -> str | None:
        """The chat template text: `chat_template.jinja`, else `tokenizer_config.json`'s."""
        jinja = self.path / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8")
        config_path = self.path / "tokenizer_config.json"
        if config_path.is_file():
            template = read_json(config_path).get("chat_template")
            if isinstance(template, str):
                return template
        return None


def read_json(path: Path) -> dict:
    """Read a JSON object, raising `ArtifactError` naming the file when it is missing or bad."""
    if not path.is_file():
        raise ArtifactError(path, "file is missing from the artifact folder; rebuild or re-copy it")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(path, f"not a readable JSON file ({exc}); the file is corrupt") from exc
    if not isinstance(data, dict):
        raise ArtifactError(path, "expected a JSON object at the top level; the file is corrupt")
    return data


def _id_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def load_artifact(folder, *, verify: bool = False) -> Artifact:
    """Read an artifact (or bare export) folder.

    Args:
        folder: the artifact directory.
        verify: check every sha256 listed in `manifest.json`; each file is hashed once and
            remembered until its size, mtime or inode changes (`edgepipe.runtime.verify`). A
            folder without a manifest loads, with `verification` saying it is unverifiable.

    Raises:
        ArtifactError: a file is missing, corrupt, or fails its checksum; the message names it.
    """
    path = Path(folder)
    if not path.is_dir():
        raise ArtifactError(path, "artifact folder not found")
    for name in REQUIRED_FILES:
        if not (path / name).is_file():
            raise ArtifactError(path / name, "file is missing from the artifact folder")
    genai = read_json(path / "genai_config.json")
    gen_path = path / "generation_config.json"
    generation = read_json(gen_path) if gen_path.is_file() else {}
    manifest_path = path / "manifest.json"
    manifest = read_json(manifest_path) if manifest_path.is_file() else None

    try:
        model = genai["model"]
        decoder = model["decoder"]
        pipeline = _pipeline_files(path, decoder.get("pipeline"))
        model_path = next(iter(pipeline.values()), path / decoder.get("filename", "model.onnx"))
        num_layers = int(decoder["num_hidden_layers"])
        num_kv_heads = int(decoder["num_key_value_heads"])
        head_dim = int(decoder["head_size"])
        context_length = int(model["context_length"])
        vocab_size = int(model["vocab_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(
            path / "genai_config.json", f"missing or invalid model field {exc}; the file is corrupt"
        ) from exc
    for graph in pipeline.values() or [model_path]:
        if not graph.is_file():
            raise ArtifactError(graph, "decoder model file is missing from the artifact folder")

    eos = _id_list(model.get("eos_token_id")) + _id_list(generation.get("eos_token_id"))
    eos_ids = tuple(dict.fromkeys(eos))
    pad = model.get("pad_token_id", generation.get("pad_token_id"))
    if isinstance(pad, list):
        pad = pad[0] if pad else None
    pad_id = int(pad) if pad is not None else (eos_ids[0] if eos_ids else 0)

    profile = (manifest or {}).get("profile") or {}
    compiled = ((manifest or {}).get("static") or {}).get("ep_context") or {}
    ep_context = {stage: path / name for stage, name in (compiled.get("graphs") or {}).items()}
    overridable = ((manifest or {}).get("decoder") or {}).get("overridable_inputs") or {}
    verification = _verify(path, manifest) if verify else SKIPPED

    return Artifact(
        path=path,
        model_path=model_path,
        num_layers=num_layers,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        context_length=context_length,
        vocab_size=vocab_size,
        eos_token_ids=eos_ids,
        pad_token_id=pad_id,
        provider=profile.get("provider") or CPU_PROVIDER,
        provider_options=dict(profile.get("provider_options") or {}),
        package=profile.get("package") or CPU_PACKAGE,
        graph_variant=profile.get("graph_variant") or ("static" if pipeline else "dynamic"),
        generation_config=generation,
        manifest=manifest,
        input_names=dict(decoder.get("inputs") or {}),
        output_names=dict(decoder.get("outputs") or {}),
        pipeline=pipeline,
        ep_context=ep_context,
        overridable_inputs=dict(overridable),
        verification=verification,
    )


def _verify(path: Path, manifest: dict | None) -> str:
    """Check the manifest's sha256 sums; what `Artifact.verification` says."""
    if manifest is None:
        return UNVERIFIABLE
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ArtifactError(path / "manifest.json", "has no `files` map of sha256 sums to verify")
    verify_files(path, files)
    return VERIFIED


def _pipeline_files(folder: Path, pipeline) -> dict[str, Path]:
    """`decoder.pipeline` of genai_config.json (a list of `{stage: {"filename": ...}}`)."""
    if not pipeline:
        return {}
    try:
        return {
            name: folder / spec["filename"] for entry in pipeline for name, spec in entry.items()
        }
    except (AttributeError, KeyError, TypeError) as exc:
        raise ArtifactError(
            folder / "genai_config.json",
            f"decoder.pipeline is malformed ({exc}); the file is corrupt",
        ) from exc
