"""A LoRA adapter merged into a base model's weights as they stream through the exporter.

`LoraMergedWeights` has the read interface of `edgepipe.formats.safetensors.SafetensorsModel`
(`folder`, `tensors`, `names`, `in`, `info`, `read`, `read_chunks`), so the graph builders take
it in place of the base weights and never learn an adapter exists. Each target weight is read,
gets `scale * (B @ A)` added in float32 numpy, and is handed on: peak memory stays one base
tensor plus the adapter's small A and B (r x in, out x r). `modules_to_save` tensors are read
from the adapter file instead of the base. No torch.

Everything that cannot be merged is refused when the wrapper is made, before anything is
written: a LoRA pair or saved tensor with no base counterpart (unknown target module), shapes
that disagree with the base (an adapter trained on another size), a `target_modules` entry that
names no base linear, and a tied embedding that the adapter would untie.

`fan_in_fan_out` is ignored as PEFT itself does for `nn.Linear` targets (PEFT sets it back to
False with a warning; every Qwen projection is an `nn.Linear`, stored out x in).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from edgepipe.errors import InvalidInput
from edgepipe.formats.peft import CONFIG_FILE, PeftAdapter, read_adapter
from edgepipe.formats.safetensors import (
    SafetensorsModel,
    TensorInfo,
    read_tensor,
    write_safetensors,
)

EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
# Rows of a merged weight per B @ A block: 64 x 4864 float32 is ~1.2 MB, an L2-sized product.
MERGE_BLOCK_ROWS = 64


def _module_names(base: SafetensorsModel) -> list[str]:
    """Base linear modules: every 2-D `*.weight` but the embedding (PEFT's module names)."""
    return [
        n.removesuffix(".weight")
        for n in base.names()
        if n.endswith(".weight") and len(base.info(n).shape) == 2 and n != EMBED
    ]


def _target_matches(target: str | list[str], modules: list[str]) -> dict[str, int]:
    """How many base modules each `target_modules` entry selects, as PEFT matches them (a
    string is a regex over the full name; a list entry is a full name or a name's tail)."""
    if isinstance(target, str):
        if target == "all-linear":  # PEFT's shorthand: every linear but the output layer
            return {target: sum(m != "lm_head" for m in modules)}
        return {target: sum(bool(re.fullmatch(target, m)) for m in modules)}
    return {t: sum(m == t or m.endswith(f".{t}") for m in modules) for t in target}


class LoraMergedWeights:
    """Base safetensors weights with a PEFT LoRA adapter merged in, one tensor at a time.

    Args:
        base: the base model's weights.
        adapter: the adapter folder (or an already read `PeftAdapter`).
        tied: whether the base config ties lm_head to the embedding.

    Raises:
        InvalidInput: the adapter does not fit the base (every problem listed, with the field).
    """

    def __init__(self, base: SafetensorsModel, adapter: PeftAdapter | Path | str, *, tied: bool):
        self.base = base
        self.adapter = adapter if isinstance(adapter, PeftAdapter) else read_adapter(adapter)
        self.folder = base.folder
        self.tied = tied
        self.tensors: dict[str, TensorInfo] = dict(base.tensors)
        self._check()
        for name, info in self.adapter.saved.items():
            self.tensors[name] = info
        # A head tied to a replaced table reads the replacement (ensure_weight_tying).
        self._aliases = {LM_HEAD: EMBED} if tied and EMBED in self.adapter.saved else {}

    def _check(self) -> None:
        adapter, base = self.adapter, self.base
        where = adapter.folder / CONFIG_FILE
        problems = []
        for target, hits in _target_matches(adapter.target_modules, _module_names(base)).items():
            if not hits:
                problems.append(
                    f"{where}: target_modules: {target!r} names no linear module of the base "
                    f"model ({base.folder}); an adapter for another architecture?"
                )
        for name, pair in adapter.pairs.items():
            if name not in base:
                problems.append(f"{where}: target_modules: {pair.module}: not in the base model")
                continue
            shape = base.info(name).shape
            lora = (pair.b.shape[0], pair.a.shape[1])
            if len(shape) != 2 or tuple(shape) != lora:
                problems.append(
                    f"{where}: {pair.module}: lora_B @ lora_A is {list(lora)} but the base weight "
                    f"is {list(shape)}; the adapter was trained on another model size"
                )
        for name, info in adapter.saved.items():
            known = name in base or (name == LM_HEAD and self.tied)
            base_shape = (
                base.info(EMBED if name == LM_HEAD and self.tied else name).shape if known else None
            )
            if not known:
                problems.append(f"{where}: modules_to_save: {name}: not in the base model")
            elif tuple(info.shape) != tuple(base_shape):
                problems.append(
                    f"{where}: modules_to_save: {name}: shape {list(info.shape)} but the base "
                    f"has {list(base_shape)}; the adapter was trained on another model size"
                )
        saved_tables = {EMBED, LM_HEAD} & set(adapter.saved)
        if self.tied and saved_tables and not adapter.ties_embeddings:
            problems.append(
                f"{where}: modules_to_save: {', '.join(sorted(saved_tables))} on a base with tied "
                "embeddings: PEFT unties the head from the table when merging; retrain with "
                "LoraConfig(ensure_weight_tying=True) so both stay one table"
            )
        if problems:
            raise InvalidInput(problems[0], problems)

    # -- the SafetensorsModel read interface ------------------------------------------------

    def names(self) -> list[str]:
        """All tensor names, sorted (the base's; the adapter adds none)."""
        return sorted(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def info(self, name: str) -> TensorInfo:
        """Where `name` is stored: the adapter file for `modules_to_save`, else the base.

        A LoRA-updated tensor's info points at the *base* bytes; read it through `read` or
        `read_chunks`, never `read_tensor(info)`.
        """
        if name not in self.tensors:
            raise InvalidInput(f"{self.folder}: tensor {name!r} not found in the weights")
        return self.tensors[name]

    def _merge_rows(self, name: str, rows: np.ndarray, start: int) -> np.ndarray:
        """`rows` (the base tensor's rows from `start`) with scale * B[rows] @ A added."""
        pair = self.adapter.pairs.get(name)
        if pair is None:
            return rows
        rows = rows.astype(np.float32, copy=False)  # a fresh buffer: updated in place
        b = read_tensor(pair.b, (start, start + rows.shape[0])).astype(np.float32, copy=False)
        b *= pair.scale
        a = read_tensor(pair.a).astype(np.float32, copy=False)
        # Block by block, so each product is added while it is still in cache: a whole
        # out x in delta would be written and read back once more (the merge is memory-bound,
        # B @ A has an inner dimension of only r).
        for i in range(0, rows.shape[0], MERGE_BLOCK_ROWS):
            rows[i : i + MERGE_BLOCK_ROWS] += b[i : i + MERGE_BLOCK_ROWS] @ a
        return rows

    def read(self, name: str, dtype: np.dtype | str | None = np.float32) -> np.ndarray:
        """Tensor `name` with its LoRA update merged (float32 when merged), cast to `dtype`."""
        name = self._aliases.get(name, name)
        if name in self.adapter.saved:
            array = read_tensor(self.adapter.saved[name])
        else:
            array = self._merge_rows(name, self.base.read(name, None), 0)
        if dtype is not None and array.dtype != np.dtype(dtype):
            array = array.astype(dtype)
        return array

    def read_chunks(
        self, name: str, rows: int, dtype: np.dtype | str = np.float32
    ) -> Iterator[np.ndarray]:
        """Yield tensor `name` (merged) in blocks of `rows` rows, cast to `dtype`."""
        name = self._aliases.get(name, name)
        info = self.adapter.saved.get(name) or self.base.info(name)
        for start in range(0, info.shape[0], rows):
            chunk = read_tensor(info, (start, start + rows))
            if name not in self.adapter.saved:
                chunk = self._merge_rows(name, chunk, start)
            yield chunk.astype(dtype, copy=False)

    def record(self) -> dict:
        """What the manifest says about the merge: counts of merged and replaced tensors."""
        return {"merged": len(self.adapter.pairs), "replaced": sorted(self.adapter.saved)}


def open_merged(model_dir: Path | str, adapter_dir: Path | str, *, tied: bool) -> LoraMergedWeights:
    """The base folder's weights with the adapter folder merged in (checked, nothing read)."""
    return LoraMergedWeights(SafetensorsModel(model_dir), adapter_dir, tied=tied)


def write_merged_model(weights: LoraMergedWeights, out: Path, dtype: str = "float32") -> Path:
    """Write the merged weights as one safetensors file into `out`, one tensor at a time.

    The validate stage loads this folder into transformers as the reference model (the merged
    fine-tune, not the base); the caller copies config.json and the tokenizer files beside it.
    """
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n in weights.names() if not (weights.tied and n == LM_HEAD)]
    shapes = {n: tuple(weights.info(n).shape) for n in names}
    items = ((n, weights.read(n, np.float32)) for n in names)
    write_safetensors(out / "model.safetensors", items, dtype, shapes=shapes)
    return out
