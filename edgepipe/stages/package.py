"""The package stage: turn an optimized model folder into a self-describing artifact.

Adds to the folder (see docs/contracts.md, "Artifact folder"): the tokenizer files and chat
template, `generation_config.json` from the recipe's generation defaults, the `search` defaults
and provider options in `genai_config.json`, and last `manifest.json` — what was built from what
(recipe and profile content hashes, source identity and revision, tool versions), the sha256 of
every other file, the validation/quality report, the optimization record, build time and peak
memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from edgepipe.arch.tokens import CHAT_EOS_IDS, ENDOFTEXT_ID
from edgepipe.errors import BuildFailed
from edgepipe.formats.files import write_json
from edgepipe.formats.hashing import content_hash, hash_tree
from edgepipe.process import peak_rss_bytes, tool_versions

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
# The build's records, written into the manifest under these keys (null when a build has none).
REPORTS = (
    "validation",
    "quality",
    "optimization",
    "export",
    "decoder",
    "provider_check",
    "fp16_guard",
    "target_kl",
)

# genai_config provider option keys (onnxruntime-genai's names for the execution providers).
GENAI_PROVIDER_KEYS = {
    "DmlExecutionProvider": "dml",
    "QNNExecutionProvider": "qnn",
    "CUDAExecutionProvider": "cuda",
    "WebGpuExecutionProvider": "webgpu",
}


def generation_config(generation: Mapping, eos_token_ids: list[int]) -> dict:
    """`generation_config.json` (Hugging Face layout) from the recipe's generation defaults.

    Args:
        generation: the recipe's `generation` block (temperature, top_k, top_p,
            repetition_penalty, max_new_tokens, thinking ...); None values are left out.
        eos_token_ids: the stop tokens.
    """
    keys = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "max_new_tokens")
    config = {k: generation[k] for k in keys if generation.get(k) is not None}
    temperature = config.get("temperature")
    config["do_sample"] = bool(temperature) and temperature > 0
    config["eos_token_id"] = list(eos_token_ids)
    config["pad_token_id"] = ENDOFTEXT_ID
    for key in ("thinking", "enable_thinking"):
        if generation.get(key) is not None:
            config["enable_thinking"] = bool(generation[key])
    return dict(sorted(config.items()))


def decoder_record(model_path: Path) -> dict:
    """The manifest's `decoder` block of a dynamic graph: `overridable_inputs`, the graph
    inputs that are also initializers (name -> default value), e.g. `{"logits_to_keep": 1}`.

    onnxruntime lists them in `get_overridable_initializers()`, not `get_inputs()`; the manifest
    says so without loading the graph (the runtime opens such decoders quietly).
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(model_path), load_external_data=False).graph
    defaults = {t.name: t for t in graph.initializer}
    overridable = {
        i.name: numpy_helper.to_array(defaults[i.name], base_dir=str(model_path.parent)).tolist()
        for i in graph.input
        if i.name in defaults
    }
    return {"overridable_inputs": overridable}


def update_genai_config(
    folder: Path, generation: Mapping, provider: str, provider_options: Mapping
) -> None:
    """Put the recipe's sampling defaults and the profile's provider options into the export's
    `genai_config.json`, so onnxruntime-genai apps get the same defaults as edgepipe.runtime.

    Raises:
        BuildFailed: the export wrote no `genai_config.json`.
    """
    path = folder / "genai_config.json"
    if not path.is_file():
        raise BuildFailed(f"package: {path} is missing; the export stage must write it")
    config = json.loads(path.read_text(encoding="utf-8"))
    search = config.setdefault("search", {})
    mapping = {
        "temperature": "temperature",
        "top_k": "top_k",
        "top_p": "top_p",
        "repetition_penalty": "repetition_penalty",
    }
    for ours, theirs in mapping.items():
        if generation.get(ours) is not None:
            search[theirs] = generation[ours]
    temperature = generation.get("temperature")
    if temperature is not None:
        search["do_sample"] = bool(temperature) and temperature > 0
    key = GENAI_PROVIDER_KEYS.get(provider)
    if key is not None:
        session = config["model"]["decoder"].setdefault("session_options", {})
        options = {k: str(v) for k, v in sorted(provider_options.items())}
        session["provider_options"] = [{key: options}]
    write_json(path, config)


def package_artifact(
    folder: Path,
    *,
    recipe: Mapping,
    profile: Mapping,
    family: str,
    precision: str,
    source: Mapping,
    reports: Mapping,
    build_seconds: float,
    eos_token: str = "<|im_end|>",
    static: Mapping | None = None,
) -> dict:
    """Complete the artifact in `folder` (which holds the optimized model) and write its manifest.

    Args:
        folder: the artifact being built (inside the build's temp folder).
        recipe: the validated recipe as plain data.
        profile: the validated device profile as plain data (`provider`, `provider_options`,
            `graph_variant`, `package` are copied into the manifest for the runtime).
        family: tokenizer family, `qwen2` or `qwen3`.
        precision: the weight precision built (`fp32`, `fp16`, `int8`, `int4`).
        source: the source identity (hub id + revision, folder file hashes, preset + seed).
        reports: `validation`, `optimization`, `quality`, `export`, `provider_check` (which
            provider and CPU architecture really ran, `edgepipe.stages.validate.graph_check`)
            `fp16_guard` (float16 builds), `target_kl` and `decoder` (`decoder_record`) records.
        build_seconds: wall time of the build so far.
        eos_token: `<|im_end|>` for chat models, `<|endoftext|>` for base models.
        static: static (NPU) artifacts: the manifest's `static` section (chunk, kv_capacity,
            graphs, quantization, `ep_context`); see docs/contracts.md.

    Returns:
        The manifest.
    """
    from edgepipe.arch.tokenizer import write_tokenizer_files

    generation = dict(recipe.get("generation") or {})
    provider = profile.get("provider") or "CPUExecutionProvider"
    provider_options = dict(profile.get("provider_options") or {})
    write_tokenizer_files(folder, family, eos_token=eos_token)
    # `<|endoftext|>` ends base models; chat models stop at `<|im_end|>` first.
    eos_ids = list(CHAT_EOS_IDS) if eos_token == "<|im_end|>" else [ENDOFTEXT_ID]
    write_json(folder / "generation_config.json", generation_config(generation, eos_ids))
    update_genai_config(folder, generation, provider, provider_options)

    _readable_by_all(folder)
    files = hash_tree(folder, exclude=(MANIFEST,))
    manifest = {
        "format": MANIFEST_FORMAT,
        "recipe": {"name": recipe.get("name"), "sha256": content_hash(recipe), "content": recipe},
        "profile": {
            "name": profile.get("name"),
            "sha256": content_hash(profile),
            "provider": provider,
            "provider_options": provider_options,
            "session_config": dict(profile.get("session_config") or {}),
            "graph_variant": profile.get("graph_variant", "dynamic"),
            "package": profile.get("package") or profile.get("onnxruntime_package"),
            "content": profile,
        },
        "precision": precision,
        "source": dict(source),
        "versions": tool_versions(),
        "files": files,
        "size_bytes": sum((folder / rel).stat().st_size for rel in files),
        **{key: reports.get(key) for key in REPORTS},
        "build_seconds": round(build_seconds, 3),
        "peak_rss_bytes": peak_rss_bytes(),
    }
    if static is not None:
        manifest["static"] = dict(static)
    write_json(folder / MANIFEST, manifest)
    _readable_by_all(folder)
    return manifest


def _readable_by_all(folder: Path) -> None:
    """Give every file the mode a plain `open()` would (0644 under the usual umask): atomic
    writes through `mkstemp` create 0600 files, which break artifacts copied to a server or
    shared between users."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)
