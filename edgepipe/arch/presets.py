"""Random-weight Qwen model folders of a named architecture, written with numpy only.

A preset folder looks like a Hugging Face download: config.json (the keys transformers 5's
Qwen2Config/Qwen3Config save, so `AutoModelForCausalLM.from_pretrained` loads it),
generation_config.json, `model.safetensors` (or ~2 GB shards with an index, like
`save_pretrained`) and, when edgepipe.arch.tokenizer is available, the real Qwen tokenizer files.
Shape-exact presets cost what the real models cost to export and run, so they are the honest
benchmark inputs; tiny presets make smoke tests fast. Weights are streamed: one tensor is drawn,
written and dropped at a time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.arch.qwen2 import QWEN2
from edgepipe.arch.qwen3 import QWEN3
from edgepipe.arch.spec import ArchShape, DecoderConfig, FamilySpec, expected_shapes
from edgepipe.errors import InvalidInput
from edgepipe.formats.safetensors import INDEX_FILE, SINGLE_FILE, write_safetensors

SHARD_BYTES = 2_000_000_000  # save_pretrained's default max_shard_size is "2GB" (decimal)
TRANSFORMERS_VERSION = "5.23.0"  # written into config.json like save_pretrained does


@dataclass(frozen=True)
class PresetSpec:
    """A named architecture with random weights.

    Attributes:
        family: qwen2 or qwen3 family spec.
        shape: the architecture numbers.
        init_std: std of the normal draw for matrices (norm weights are 1 + 0.1 * normal).
            HF initializes with 0.02; the tiny presets use more so their logits are not flat.
    """

    family: FamilySpec
    shape: ArchShape
    init_std: float = 0.02


_TINY_QWEN2 = ArchShape(128, 2, 4, 2, 32, 256, max_position_embeddings=4096)
_TINY_QWEN3 = ArchShape(128, 2, 4, 2, 48, 256, max_position_embeddings=4096)

PRESETS: dict[str, PresetSpec] = {
    "tiny-qwen2": PresetSpec(QWEN2, _TINY_QWEN2, init_std=0.15),
    "tiny-qwen3": PresetSpec(QWEN3, _TINY_QWEN3, init_std=0.15),
    **{name: PresetSpec(QWEN2, shape) for name, shape in QWEN2.shapes.items()},
    **{name: PresetSpec(QWEN3, shape) for name, shape in QWEN3.shapes.items()},
}


def preset_config(spec: PresetSpec, dtype: str = "bfloat16") -> dict[str, Any]:
    """config.json for a preset, with the keys transformers' Qwen2Config/Qwen3Config save."""
    s, fam = spec.shape, spec.family
    config: dict[str, Any] = {
        "architectures": list(fam.architectures),
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "dtype": dtype,
        "eos_token_id": 151645,
        "hidden_act": "silu",
        "hidden_size": s.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": s.intermediate_size,
        "layer_types": ["full_attention"] * s.num_hidden_layers,
        "max_position_embeddings": s.max_position_embeddings,
        "max_window_layers": s.num_hidden_layers,
        "model_type": fam.model_types[0],
        "num_attention_heads": s.num_attention_heads,
        "num_hidden_layers": s.num_hidden_layers,
        "num_key_value_heads": s.num_key_value_heads,
        "pad_token_id": None,
        "rms_norm_eps": 1e-06,
        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
        "sliding_window": None,
        "tie_word_embeddings": s.tie_word_embeddings,
        "transformers_version": TRANSFORMERS_VERSION,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": s.vocab_size,
    }
    if fam.qk_norm:
        # Qwen3Config carries head_dim and attention_bias; Qwen2Config derives head_dim.
        config["head_dim"] = s.head_dim
        config["attention_bias"] = False
    elif s.head_dim * s.num_attention_heads != s.hidden_size:
        raise AssertionError("Qwen2 presets need head_dim == hidden / heads")
    return dict(sorted(config.items()))


def preset_tensors(spec: PresetSpec) -> dict[str, tuple[int, ...]]:
    """Every weight name and shape in save_pretrained's order."""
    s = spec.shape
    cfg = DecoderConfig(
        family=spec.family,
        vocab_size=s.vocab_size,
        hidden_size=s.hidden_size,
        num_hidden_layers=s.num_hidden_layers,
        num_attention_heads=s.num_attention_heads,
        num_key_value_heads=s.num_key_value_heads,
        head_dim=s.head_dim,
        intermediate_size=s.intermediate_size,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        tie_word_embeddings=s.tie_word_embeddings,
        max_position_embeddings=s.max_position_embeddings,
        bos_token_id=151643,
        eos_token_id=[151645],
        raw={},
    )
    return expected_shapes(cfg)


def _draw(rng: np.random.Generator, name: str, shape: tuple[int, ...], std: float) -> np.ndarray:
    if "norm" in name:
        return (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)


def _shards(
    shapes: dict[str, tuple[int, ...]], itemsize: int, limit: int
) -> list[dict[str, tuple[int, ...]]]:
    shards: list[dict[str, tuple[int, ...]]] = [{}]
    size = 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = shape
        size += nbytes
    return shards


def write_preset(
    name: str,
    seed: int,
    out_dir: Path | str,
    dtype: str = "bfloat16",
    *,
    shard_bytes: int = SHARD_BYTES,
    tokenizer: bool = True,
) -> Path:
    """Write a random-weight model folder for preset `name`.

    Args:
        name: a key of `PRESETS`.
        seed: numpy seed; the same (name, seed, dtype) gives byte-identical weights.
        out_dir: folder to create (files in it are replaced).
        dtype: weight storage, "bfloat16" (like the real checkpoints), "float16" or "float32".
        shard_bytes: shard when the weights exceed this many bytes (HF's 2 GB by default).
        tokenizer: also write the real Qwen tokenizer files (edgepipe.arch.tokenizer).

    Returns:
        `out_dir`.

    Raises:
        InvalidInput: unknown preset or dtype.
    """
    if name not in PRESETS:
        raise InvalidInput(f"preset: {name!r} is not a preset; choose one of {sorted(PRESETS)}")
    itemsize = {"bfloat16": 2, "float16": 2, "float32": 4}.get(dtype)
    if itemsize is None:
        raise InvalidInput(f"preset dtype: {dtype!r}; allowed: bfloat16, float16, float32")
    spec = PRESETS[name]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(preset_config(spec, dtype), indent=2) + "\n")
    generation = {
        "bos_token_id": 151643,
        "eos_token_id": [151645, 151643],
        "pad_token_id": 151643,
        "transformers_version": TRANSFORMERS_VERSION,
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")

    rng = np.random.default_rng(seed)
    shapes = preset_tensors(spec)
    shards = _shards(shapes, itemsize, shard_bytes)

    def stream(part: dict[str, tuple[int, ...]]):
        for tensor_name, shape in part.items():
            yield tensor_name, _draw(rng, tensor_name, shape, spec.init_std)

    if len(shards) == 1:
        write_safetensors(out / SINGLE_FILE, stream(shapes), dtype, shapes=shapes)
    else:
        weight_map: dict[str, str] = {}
        total = 0
        for i, part in enumerate(shards, start=1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(out / file, stream(part), dtype, shapes=part)
            total += sum(int(np.prod(s)) * itemsize for s in part.values())
            weight_map.update(dict.fromkeys(part, file))
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    if tokenizer:
        _write_tokenizer(out, spec.family.name)
    return out


def _write_tokenizer(out: Path, family: str) -> None:
    try:
        from edgepipe.arch.tokenizer import write_tokenizer_files
    except ImportError:  # the tokenizer module is optional for weight-only presets
        return
    write_tokenizer_files(out, family)
