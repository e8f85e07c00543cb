"""Weights that two initializers share: found by their bytes, stored once.

A tied model's quantized table is one buffer viewed two ways (GatherBlockQuantized takes it
2-D, the lm_head's MatMulNBits 3-D): the export writes it once and points both initializers at
the same (offset, length) of `model.onnx.data` (`GraphWriter.alias`). Tools that re-save a
graph do not know that: onnx-ir's `save` and onnxruntime's offline optimizer write each
initializer on its own, so the table would ship twice (+68 MB for Qwen2.5-0.5B's 4-bit table).
`share_duplicates` restores the sharing after such a tool ran, and `duplicate_initializers`
is the check that nothing shipped holds the same bytes twice.

Only external initializers of two or more dimensions count: 1-D vectors (norm gains, biases)
may coincide legitimately, e.g. a freshly initialized norm is all ones in every layer.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

# Offsets of the rewritten data file are aligned as `edgepipe.formats.onnx_writer` aligns them.
ALIGNMENT = 64
_CHUNK = 1 << 24


@dataclass(frozen=True)
class Stored:
    """Where one external initializer's bytes lie."""

    name: str
    location: str
    offset: int
    length: int


def _external(tensor) -> dict[str, str] | None:
    import onnx

    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    return {e.key: e.value for e in tensor.external_data}


def stored_initializers(model) -> list[Stored]:
    """Every external initializer of `model` (an `onnx.ModelProto`) of two or more dims."""
    out = []
    for tensor in model.graph.initializer:
        info = _external(tensor)
        if info is None or len(tensor.dims) < 2:
            continue
        out.append(
            Stored(tensor.name, info["location"], int(info.get("offset", 0)), int(info["length"]))
        )
    return out


def _digest(path: Path, offset: int, length: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        f.seek(offset)
        left = length
        while left:
            block = f.read(min(left, _CHUNK))
            if not block:
                raise ValueError(f"{path}: ends before offset {offset} + length {length}")
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


def _groups(model_path: Path, model) -> dict[tuple[int, str], list[Stored]]:
    """Stored regions grouped by (length, sha256) of their bytes.

    Only regions that share their length with another region are read and hashed: bytes of a
    length no other region has cannot repeat, so they are grouped by length alone ("" digest).
    """
    items = stored_initializers(model)
    regions_of_length: dict[int, set[tuple[str, int, int]]] = {}
    for item in items:
        regions_of_length.setdefault(item.length, set()).add(
            (item.location, item.offset, item.length)
        )
    groups: dict[tuple[int, str], list[Stored]] = {}
    digests: dict[tuple[str, int, int], str] = {}
    for item in items:
        region = (item.location, item.offset, item.length)
        if len(regions_of_length[item.length]) == 1:
            digests[region] = ""
        elif region not in digests:
            digests[region] = _digest(model_path.parent / item.location, item.offset, item.length)
        groups.setdefault((item.length, digests[region]), []).append(item)
    return groups


def duplicate_initializers(model_path: Path | str) -> list[tuple[str, str]]:
    """Pairs of initializers holding the same bytes in different places of the external data.

    Args:
        model_path: an `.onnx` file whose weights are external.

    Returns:
        `(first, other)` name pairs, one per initializer whose bytes repeat those of `first`
        at another offset or file; empty when every weight is stored once (aliases that share
        one offset are fine).
    """
    import onnx

    model_path = Path(model_path)
    model = onnx.load(str(model_path), load_external_data=False)
    pairs = []
    for items in _groups(model_path, model).values():
        first = items[0]
        for other in items[1:]:
            if (other.location, other.offset) != (first.location, first.offset):
                pairs.append((first.name, other.name))
    return pairs


def share_duplicates(model_path: Path | str) -> int:
    """Store each repeated weight once: rewrite `model_path` and its data file so that
    initializers holding the same bytes point at one region.

    Every external initializer (of any rank) must live in one data file, as the optimize
    stage's `clean_layout` writes it. The data file is rewritten region by region in the order
    the graph lists them, so the same input gives the same bytes.

    Returns:
        The number of initializers now pointing at another one's bytes (0: nothing changed,
        and the files were left as they were).
    """
    import onnx

    model_path = Path(model_path)
    model = onnx.load(str(model_path), load_external_data=False)
    owner: dict[str, Stored] = {}
    for items in _groups(model_path, model).values():
        for other in items[1:]:
            if (other.location, other.offset) != (items[0].location, items[0].offset):
                owner[other.name] = items[0]
    if not owner:
        return 0
    externals = [(t, _external(t)) for t in model.graph.initializer]
    locations = {info["location"] for _, info in externals if info is not None}
    if len(locations) != 1:
        raise ValueError(f"{model_path}: weights in {len(locations)} files; expected one")
    (location,) = locations
    source = model_path.parent / location
    tmp = source.with_name(source.name + ".shared")
    placed: dict[tuple[int, int], int] = {}  # (old offset, length) -> new offset
    with source.open("rb") as src, tmp.open("wb") as dst:
        for tensor, info in externals:
            if info is None:
                continue
            stored = owner.get(tensor.name)
            key = (
                (stored.offset, stored.length)
                if stored
                else (int(info.get("offset", 0)), int(info["length"]))
            )
            if key not in placed:
                placed[key] = _copy_region(src, dst, *key)
            _set_offset(tensor, placed[key])
    os.replace(tmp, source)
    onnx.save(model, str(model_path))
    return len(owner)


def _copy_region(src, dst, offset: int, length: int) -> int:
    """Append `length` bytes of `src` from `offset` to `dst` at an aligned offset; returns it."""
    at = dst.tell()
    pad = -at % ALIGNMENT
    dst.write(b"\0" * pad)
    src.seek(offset)
    left = length
    while left:
        block = src.read(min(left, _CHUNK))
        dst.write(block)
        left -= len(block)
    return at + pad


def _set_offset(tensor, offset: int) -> None:
    for entry in tensor.external_data:
        if entry.key == "offset":
            entry.value = str(offset)
            return
    entry = tensor.external_data.add()
    entry.key, entry.value = "offset", str(offset)
