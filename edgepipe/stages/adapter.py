"""`source.adapter`: where a PEFT LoRA adapter comes from, what identifies it, how it is applied.

Three kinds, like the base source: `path` (a local folder, used in place), `hub: {id, revision}`
(`huggingface_hub.snapshot_download`, honours `HF_HUB_OFFLINE`) and `modelscope: {id, revision}`
(`edgepipe.stages.modelscope`). Only `adapter_config.json` and `adapter_model.safetensors` are
fetched (never `adapter_model.bin`: pickle).

`identity()` (for the stage cache key and the manifest) is the adapter's location, pinned
revision, the sha256 of its two files and its config. An adapter is a few MB, so a hub or
ModelScope adapter is fetched when the identity is first asked for; the config is checked then
too, so an unsupported adapter is refused before the build writes anything.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edgepipe import schema
from edgepipe.arch.families import read_config
from edgepipe.formats.hashing import sha256_file
from edgepipe.formats.peft import CONFIG_FILE, WEIGHTS_FILE, PeftAdapter, read_adapter
from edgepipe.stages.hub import hub_download
from edgepipe.stages.lora import LoraMergedWeights, open_merged, write_merged_model
from edgepipe.stages.modelscope import modelscope_download

ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)


@dataclass
class ModelAdapter:
    """A resolved `source.adapter` (the stage; `edgepipe.schema.AdapterSource` is the recipe
    block).

    Attributes:
        kind: `path`, `hub` or `modelscope`.
        spec: `{"path"}` or `{"id", "revision"}`.
        base_dir: folder a relative `path` is resolved against (the recipe's).
    """

    kind: str
    spec: dict
    base_dir: Path = field(default_factory=Path.cwd)
    _dir: Path | None = None
    _adapter: PeftAdapter | None = None
    _identity: dict | None = None

    def folder(self, progress: Callable[[str], None] | None = None) -> Path:
        """The local adapter folder, fetched on first use."""
        if self._dir is None:
            if self.kind == "path":
                path = Path(os.path.expanduser(str(self.spec["path"])))
                self._dir = path if path.is_absolute() else self.base_dir / path
            elif self.kind == "hub":
                self._dir = hub_download(
                    self.spec["id"],
                    self.spec["revision"],
                    ADAPTER_FILES,
                    field="source.adapter.hub",
                    progress=progress,
                )
            else:
                self._dir = modelscope_download(
                    self.spec["id"],
                    self.spec["revision"],
                    ADAPTER_FILES,
                    field="source.adapter.modelscope",
                    progress=progress,
                )
        return self._dir

    def adapter(self) -> PeftAdapter:
        """The adapter's config and tensor index (checked; InvalidInput when unsupported)."""
        if self._adapter is None:
            self._adapter = read_adapter(self.folder())
        return self._adapter

    def identity(self) -> dict:
        """Location, pinned revision, sha256 of each adapter file and the adapter's config."""
        if self._identity is None:
            adapter = self.adapter()
            where = (
                {"path": str(self.folder())}
                if self.kind == "path"
                else {self.kind: self.spec["id"], "revision": self.spec["revision"]}
            )
            self._identity = {
                **where,
                "files": {n: sha256_file(adapter.folder / n) for n in ADAPTER_FILES},
                "config": adapter.config,
            }
        return self._identity

    def weights(self, model_dir: Path) -> LoraMergedWeights:
        """The base folder's weights with this adapter merged as they are read."""
        tied = read_config(model_dir).tie_word_embeddings
        return open_merged(model_dir, self.adapter().folder, tied=tied)

    def reference_dir(self, model_dir: Path, work: Path, progress=None) -> Path:
        """A model folder with the merged weights, for the validate stage's transformers
        reference (the fine-tune, not the base); written once per build into `work`."""
        out = Path(work) / "merged-reference"
        if (out / "model.safetensors").is_file():
            return out
        if progress:
            progress("writing the merged reference weights")
        write_merged_model(self.weights(model_dir), out)
        for path in Path(model_dir).iterdir():
            if path.is_file() and not path.name.endswith(
                (".safetensors", ".safetensors.index.json")
            ):
                shutil.copyfile(path, out / path.name)
        return out


def adapter_from_recipe(
    adapter: schema.AdapterSource, base_dir: Path | None = None
) -> ModelAdapter:
    """The adapter of a recipe's `source.adapter` block.

    Args:
        adapter: the validated block; the schema already holds exactly one of path, hub and
            modelscope, so this only reads whichever is set.
        base_dir: what a relative `path` is resolved against (the recipe's folder).
    """
    base = base_dir or Path.cwd()
    repo = adapter.hub or adapter.modelscope
    if repo is not None:
        kind = "hub" if adapter.hub is not None else "modelscope"
        return ModelAdapter(kind, {"id": repo.id, "revision": repo.revision}, base)
    return ModelAdapter("path", {"path": str(adapter.path)}, base)
