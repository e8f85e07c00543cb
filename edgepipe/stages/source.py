"""The source stage: where the model's `config.json` and safetensors come from.

Four kinds, exactly one per recipe (see the recipe schema):

* `hub: {id, revision}` — `edgepipe.stages.hub.hub_download` at the pinned revision, only the
  files the builder reads (config, safetensors, tokenizer). It honours `HF_HUB_OFFLINE=1` and
  the Hugging Face cache (`HF_HOME`), so CI can pre-fill the cache and build offline.
* `path: <folder>` — a local folder, used in place (never modified).
* `preset: {name, seed}` — a random-weight model written by `edgepipe.arch.presets.write_preset`.
* `modelscope: {id, revision}` — the hub's contract on ModelScope (`edgepipe.stages.modelscope`).

Any kind may carry `adapter:` (a PEFT LoRA adapter, `edgepipe.stages.adapter`): the exporter then
reads the weights through `weights()`, which merges it as each tensor streams through, and the
identity (cache key, manifest) includes the adapter's files and config.
* `bundled: {name}` — a trained model shipped inside edgepipe in compact form, expanded into
  the build's work folder by `edgepipe.arch.bundled.expand_bundled`.

`identity()` is known before anything is downloaded or written, so the stage cache can decide
whether the export must run at all; `materialize()` produces the folder only when needed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edgepipe import schema
from edgepipe.arch.bundled import bundled_folder, expand_bundled
from edgepipe.errors import InvalidInput
from edgepipe.formats.hashing import hash_tree
from edgepipe.formats.safetensors import SafetensorsModel
from edgepipe.stages.adapter import ModelAdapter, adapter_from_recipe
from edgepipe.stages.hub import hub_download
from edgepipe.stages.modelscope import modelscope_download

# What the builder and the reference model read; nothing else is downloaded (no .bin, no .pt).
HUB_ALLOW_PATTERNS = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
)


@dataclass
class ModelSource:
    """A resolved model source (the stage; `edgepipe.schema.Source` is the recipe block).

    Attributes:
        kind: `hub`, `modelscope`, `path`, `preset` or `bundled`.
        spec: the recipe's source block as a dict (`{"id", "revision"}`, `{"path"}`,
            `{"name", "seed"}` or `{"name"}`).
        base_dir: folder that relative `path` sources are resolved against (the recipe's).
        adapter: the `source.adapter` LoRA adapter merged into the weights, if any.
    """

    kind: str
    spec: dict
    base_dir: Path = field(default_factory=Path.cwd)
    adapter: ModelAdapter | None = None
    _dir: Path | None = None
    _identity: dict | None = None

    @property
    def folder(self) -> Path:
        """The local folder of a `path` source."""
        path = Path(os.path.expanduser(str(self.spec["path"])))
        return path if path.is_absolute() else (self.base_dir / path)

    def identity(self) -> dict:
        """What identifies the weights, for cache keys and the manifest.

        hub/modelscope: id and pinned revision; path: the sha256 of every config/safetensors
        file (a folder's name says nothing about its content); preset: name and seed; bundled:
        name and the sha256 of its compact files (retrained weights are another model); plus
        the adapter's identity when there is one.
        """
        if self._identity is not None:
            return self._identity
        if self.kind in ("hub", "modelscope"):
            ident = {self.kind: self.spec["id"], "revision": self.spec.get("revision")}
        elif self.kind == "preset":
            ident = {"preset": self.spec["name"], "seed": self.spec.get("seed", 0)}
        elif self.kind == "bundled":
            files = _weight_files(bundled_folder(self.spec["name"]))
            ident = {"bundled": self.spec["name"], "files": files}
        else:
            folder = self.folder
            if not (folder / "config.json").is_file():
                raise InvalidInput(
                    f"source.path: {folder} has no config.json; point it at a Hugging Face "
                    "model folder (config.json + *.safetensors)"
                )
            ident = {"path": str(folder), "files": _weight_files(folder)}
        if self.adapter is not None:
            ident = {**ident, "adapter": self.adapter.identity()}
        self._identity = ident
        return ident

    @property
    def revision(self) -> str | None:
        """The pinned hub or ModelScope revision (None for other kinds)."""
        return self.spec.get("revision") if self.kind in ("hub", "modelscope") else None

    def weights(self, model_dir: Path):
        """What the exporter reads: the folder's safetensors, with the adapter merged if any."""
        if self.adapter is None:
            return SafetensorsModel(model_dir)
        return self.adapter.weights(model_dir)

    def reference_dir(self, work_dir: Path, progress: Callable[[str], None] | None = None) -> Path:
        """The folder the validate stage loads into transformers: the model folder, or with an
        adapter a merged copy written into `work_dir`."""
        model_dir = self.materialize(work_dir, progress)
        if self.adapter is None:
            return model_dir
        return self.adapter.reference_dir(model_dir, work_dir, progress)

    def materialize(self, work_dir: Path, progress: Callable[[str], None] | None = None) -> Path:
        """The model folder, downloading or writing it on first use.

        Args:
            work_dir: where a preset or a bundled model is written (the build's temp folder).
            progress: called with a short status line (the hub download shows its own bars).

        Raises:
            BuildFailed: the hub download failed (message says how to fix offline mode).
        """
        # A preset lives in one build's temp folder, gone when that build ends: a plan built
        # again (a library caller's second build_all) writes it again into the new work_dir.
        if self._dir is not None and (self._dir / "config.json").is_file():
            return self._dir
        if self.kind == "path":
            self.identity()  # checks config.json
            self._dir = self.folder
        elif self.kind == "preset":
            from edgepipe.arch.presets import write_preset

            if progress:
                progress(f"writing preset {self.spec['name']}")
            out = Path(work_dir) / "preset"
            write_preset(self.spec["name"], int(self.spec.get("seed", 0)), out)
            self._dir = out
        elif self.kind == "modelscope":
            self._dir = modelscope_download(
                self.spec["id"], self.spec["revision"], HUB_ALLOW_PATTERNS, progress=progress
            )
        elif self.kind == "bundled":
            if progress:
                progress(f"expanding bundled model {self.spec['name']}")
            out = Path(work_dir) / f"bundled-{self.spec['name']}"
            self._dir = expand_bundled(self.spec["name"], out)
        else:
            self._dir = hub_download(
                self.spec["id"], self.spec.get("revision"), HUB_ALLOW_PATTERNS, progress=progress
            )
        return self._dir


def _weight_files(folder: Path) -> dict[str, str]:
    """sha256 of each config / safetensors file in `folder`."""
    return {
        rel: digest
        for rel, digest in hash_tree(folder).items()
        if rel.endswith((".json", ".safetensors"))
    }


def source_from_recipe(source: schema.Source, base_dir: Path | None = None) -> ModelSource:
    """The source stage for a recipe's `source` block.

    Args:
        source: the validated block; the schema already holds exactly one of hub, modelscope,
            path and preset, so this only reads whichever is set (and `adapter`, if any).
        base_dir: what a relative `path` is resolved against (the recipe's folder).
    """
    base = base_dir or Path.cwd()
    adapter = adapter_from_recipe(source.adapter, base) if source.adapter is not None else None
    repo = source.hub or source.modelscope
    if repo is not None:
        kind = "hub" if source.hub is not None else "modelscope"
        return ModelSource(kind, {"id": repo.id, "revision": repo.revision}, base, adapter)
    if source.preset is not None:
        spec = {"name": source.preset.name, "seed": source.preset.seed}
        return ModelSource("preset", spec, base, adapter)
    if source.bundled is not None:
        return ModelSource("bundled", {"name": source.bundled.name}, base, adapter)
    return ModelSource("path", {"path": str(source.path)}, base, adapter)
