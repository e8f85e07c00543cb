"""The registry of supported architecture families, and reading a model's config.json.

Adding a family: write its `FamilySpec` in a data-only module next to `qwen2.py`, and add it to
`FAMILIES` here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgepipe.arch.qwen2 import QWEN2
from edgepipe.arch.qwen3 import QWEN3
from edgepipe.arch.spec import DecoderConfig, FamilySpec, decoder_config
from edgepipe.errors import InvalidInput

#: Every supported family, in the order `family_for` tries them.
FAMILIES: tuple[FamilySpec, ...] = (QWEN2, QWEN3)


def family_for(config: dict[str, Any], where: str = "config.json") -> FamilySpec:
    """Pick the family of a parsed config.json from `architectures` (or `model_type`).

    Args:
        config: the parsed config.json.
        where: the file, for messages.

    Raises:
        InvalidInput: no family matches; the message lists the supported ones.
    """
    archs = config.get("architectures") or []
    model_type = config.get("model_type")
    for fam in FAMILIES:
        if any(a in fam.architectures for a in archs):
            return fam
    if not archs:
        for fam in FAMILIES:
            if model_type in fam.model_types:
                return fam
    supported = [a for f in FAMILIES for a in f.architectures]
    types = [t for f in FAMILIES for t in f.model_types]
    raise InvalidInput(
        f"{where}: architectures {archs} / model_type {model_type!r} is not supported; "
        f"supported architectures: {supported} (model_type {types})"
    )


def read_config(model_dir: Path | str) -> DecoderConfig:
    """Read and check `model_dir/config.json`.

    Raises:
        InvalidInput: missing file, unsupported family or rope scaling, missing fields.
    """
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise InvalidInput(
            f"{path}: config.json not found; a model folder needs config.json and "
            "model.safetensors (or sharded *.safetensors with model.safetensors.index.json)"
        )
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"{path}: not valid JSON ({exc})") from exc
    return decoder_config(config, family_for(config, str(path)), str(path))


def family_mismatch(declared: str, config: dict[str, Any]) -> str | None:
    """Why `declared` (a recipe's `family:`) is not the family of this config.json, or None.

    A recipe's family picks the chat template and tokenizer; the graph follows the checkpoint.
    Saying `qwen3` over a Qwen2 checkpoint would ship the wrong template, so the config's
    `architectures` / `model_type` must agree (an unsupported config is reported elsewhere).
    """
    try:
        actual = family_for(config)
    except InvalidInput:
        return None
    if actual.name == declared:
        return None
    return (
        f"{declared!r}, but the checkpoint's config.json is {actual.name} (architectures "
        f"{config.get('architectures')}, model_type {config.get('model_type')!r}); set "
        f"family: {actual.name} or remove the field"
    )
