"""The source stage: where the model's `config.json` and safetensors come from.

Four kinds, exactly one per recipe (see the recipe schema):

* `hub: {id, revision}` — `huggingface_hub.snapshot_download` at the pinned revision, only the
  files the builder reads (config, safetensors, tokenizer). It honours `HF_HUB_OFFLINE=1` and
  the Hugging Face cache (`HF_HOME`), so CI can pre-fill the cache and build offline.
* `path: <folder>` — a local folder, used in place (never modified).
* `preset: {name, seed}` — a random-weight model written by `edgepipe.arch.presets.write_preset`.
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
from edgepipe.build.cache import hash_tree
from edgepipe.errors import BuildFailed, InvalidInput

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
        kind: `hub`, `path`, `preset` or `bundled`.
        spec: the recipe's source block as a dict (`{"id", "revision"}`, `{"path"}`,
            `{"name", "seed"}` or `{"name"}`).
        base_dir: folder that relative `path` sources are resolved against (the recipe's).
    """

    kind: str
    spec: dict
    base_dir: Path = field(default_factory=Path.cwd)
    _dir: Path | None = None
    _identity: dict | None = None

    @property
    def folder(self) -> Path:
        """The local folder of a `path` source."""
        path = Path(os.path.expanduser(str(self.spec["path"])))
        return path if path.is_absolute() else (self.base_dir / path)

    def identity(self) -> dict:
        """What identifies the weights, for cache keys and the manifest.

        hub: id and pinned revision; path: the sha256 of every config/safetensors file (a
        folder's name says nothing about its content); preset: name and seed; bundled: name
        and the sha256 of its compact files (retrained weights are another model).
        """
        if self._identity is not None:
            return self._identity
        if self.kind == "hub":
            ident = {"hub": self.spec["id"], "revision": self.spec.get("revision")}
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
        self._identity = ident
        return ident

    @property
    def revision(self) -> str | None:
        """The pinned hub revision (None for other kinds)."""
        return self.spec.get("revision") if self.kind == "hub" else None

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
        elif self.kind == "bundled":
            if progress:
                progress(f"expanding bundled model {self.spec['name']}")
            out = Path(work_dir) / f"bundled-{self.spec['name']}"
            self._dir = expand_bundled(self.spec["name"], out)
        else:
            self._dir = _download(self.spec["id"], self.spec.get("revision"), progress)
        return self._dir


def _weight_files(folder: Path) -> dict[str, str]:
    """sha256 of each config / safetensors file in `folder`."""
    return {
        rel: digest
        for rel, digest in hash_tree(folder).items()
        if rel.endswith((".json", ".safetensors"))
    }


def _download(repo_id: str, revision: str | None, progress) -> Path:
    from edgepipe.errors import require

    hub = require("huggingface_hub", "build")
    if progress:
        progress(f"downloading {repo_id}@{(revision or 'main')[:12]}")
    try:
        path = hub.snapshot_download(
            repo_id=repo_id, revision=revision, allow_patterns=list(HUB_ALLOW_PATTERNS)
        )
    except Exception as exc:  # network, auth, offline-cache-miss: all end the build the same way
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = (
            "HF_HUB_OFFLINE is set and the revision is not in the Hugging Face cache; "
            "run once online or unset HF_HUB_OFFLINE"
            if offline
            else "check the network, the repository id and the pinned revision"
        )
        raise BuildFailed(
            f"source.hub: could not fetch {repo_id}@{revision}: {exc} ({hint})"
        ) from exc
    return Path(path)


def source_from_recipe(source: schema.Source, base_dir: Path | None = None) -> ModelSource:
    """The source stage for a recipe's `source` block.

    Args:
        source: the validated block; the schema already holds exactly one of hub, path and
            preset, so this only reads whichever is set.
        base_dir: what a relative `path` is resolved against (the recipe's folder).
    """
    base = base_dir or Path.cwd()
    if source.hub is not None:
        spec = {"id": source.hub.id, "revision": source.hub.revision}
        return ModelSource("hub", spec, base)
    if source.preset is not None:
        return ModelSource("preset", {"name": source.preset.name, "seed": source.preset.seed}, base)
    if source.bundled is not None:
        return ModelSource("bundled", {"name": source.bundled.name}, base)
    return ModelSource("path", {"path": str(source.path)}, base)
