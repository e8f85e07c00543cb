"""PEFT LoRA adapter folders: `adapter_config.json` + `adapter_model.safetensors`, read lazily.

A folder written by `PeftModel.save_pretrained` holds the adapter's config and, per target
module, `base_model.model.<module>.lora_A.weight` (r x in) and `.lora_B.weight` (out x r); a
module listed in `modules_to_save` is stored whole as `base_model.model.<module>.weight`. This
module reads the config, refuses every feature the streaming merge does not implement (naming
the config field), and lists the tensors by base-model name; it knows nothing about Qwen (the
merge, which checks names and shapes against a base model, is `edgepipe.stages.lora`).

Only the header of the safetensors file is read here; A and B are read when a merge needs them.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from edgepipe.errors import InvalidInput
from edgepipe.formats.safetensors import TensorInfo, read_header

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
# How PEFT prefixes every saved key (the PeftModel wraps the base model as `base_model.model`).
KEY_PREFIX = "base_model.model."
CONVERT_HINT = (
    "edgepipe reads safetensors only (pickle files can run arbitrary code); convert it with "
    "`PeftModel.from_pretrained(base, folder).save_pretrained(out, safe_serialization=True)`"
)

# Config fields whose non-default values change what the adapter computes in ways the merge
# does not implement: field -> (the value that is fine, why it is refused).
_REFUSED = {
    "use_dora": (False, "DoRA rescales each weight's columns by a learned magnitude"),
    "lora_bias": (False, "a LoRA bias on lora_B is not merged by edgepipe"),
    "use_qalora": (False, "QA-LoRA pools the input groups"),
    "target_parameters": (None, "LoRA on raw parameters (MoE experts) is not supported"),
    "trainable_token_indices": (None, "trainable token rows are not merged by edgepipe"),
    "layer_replication": (None, "layer replication changes the number of layers"),
    "use_bdlora": (None, "block-diagonal LoRA is not supported"),
}


@dataclass
class LoraPair:
    """One target module's low-rank update: W' = W + scale * (B @ A)."""

    module: str  # base-model module name, e.g. model.layers.0.self_attn.q_proj
    a: TensorInfo  # (r, in_features)
    b: TensorInfo  # (out_features, r)
    scale: float

    @property
    def weight(self) -> str:
        """The base tensor this pair updates."""
        return f"{self.module}.weight"


@dataclass
class PeftAdapter:
    """A LoRA adapter folder, checked and indexed by base-model tensor names.

    Attributes:
        folder: the adapter folder.
        config: `adapter_config.json` as a dict.
        pairs: base weight name (e.g. `model.layers.0.mlp.up_proj.weight`) -> its `LoraPair`.
        saved: base tensor name -> the adapter's full replacement (`modules_to_save`).
    """

    folder: Path
    config: dict
    pairs: dict[str, LoraPair] = field(default_factory=dict)
    saved: dict[str, TensorInfo] = field(default_factory=dict)

    @property
    def target_modules(self) -> list[str] | str:
        """`target_modules` as PEFT stores it: a list of names or one regex string."""
        value = self.config.get("target_modules") or []
        return value if isinstance(value, str) else sorted(value)

    @property
    def ties_embeddings(self) -> bool:
        """True when the adapter was saved with `ensure_weight_tying` (head and table stay one)."""
        return bool(self.config.get("ensure_weight_tying"))


def _problem(folder: Path, field_name: str, message: str) -> str:
    return f"{folder / CONFIG_FILE}: {field_name}: {message}"


def check_config(folder: Path, config: dict) -> list[str]:
    """Every reason the streaming merge cannot apply this adapter config (empty: it can)."""
    problems = []
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        problems.append(
            _problem(folder, "peft_type", f"{peft_type!r}; edgepipe merges LORA adapters only")
        )
    for name, (fine, why) in _REFUSED.items():
        value = config.get(name)
        if value not in (fine, None, False, [], {}):
            problems.append(_problem(folder, name, f"{value!r}: not supported ({why})"))
    bias = config.get("bias", "none")
    if bias != "none":
        problems.append(
            _problem(
                folder, "bias", f"{bias!r}: trained biases are not merged; train with bias='none'"
            )
        )
    r = config.get("r")
    if not isinstance(r, int) or r < 1:
        problems.append(_problem(folder, "r", f"{r!r}: must be a positive integer"))
    if not isinstance(config.get("lora_alpha", 8), int | float):
        problems.append(_problem(folder, "lora_alpha", "must be a number"))
    if not config.get("target_modules"):
        problems.append(_problem(folder, "target_modules", "empty; nothing to merge"))
    return problems


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's `get_pattern_key` lookup: the first key that matches the module name's tail."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def lora_scale(config: dict, module: str) -> tuple[int, float]:
    """(rank, scale) of `module`: `rank_pattern`/`alpha_pattern` as PEFT resolves them;
    scale = alpha / r, or alpha / sqrt(r) with `use_rslora`."""
    r = int(_pattern_value(config.get("rank_pattern") or {}, module, config["r"]))
    alpha = float(
        _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    )
    return r, alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def read_adapter(folder: Path | str) -> PeftAdapter:
    """Read and check a PEFT LoRA adapter folder (config + safetensors header, no weights).

    Raises:
        InvalidInput: missing config, pickle-only weights, unsupported config fields, tensors
            that are neither LoRA pairs nor `modules_to_save` (every problem listed).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidInput(f"source.adapter: {folder}: adapter folder not found")
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise InvalidInput(
            f"source.adapter: {folder}: no {CONFIG_FILE}; point it at a folder written by "
            "PeftModel.save_pretrained"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"{config_path}: unreadable JSON ({exc})") from exc
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        if (folder / PICKLE_FILE).is_file():
            raise InvalidInput(
                f"source.adapter: {folder}: found only {PICKLE_FILE}; {CONVERT_HINT}"
            )
        raise InvalidInput(f"source.adapter: {folder}: no {WEIGHTS_FILE}")
    problems = check_config(folder, config)
    if problems:
        raise InvalidInput(problems[0], problems)
    adapter = PeftAdapter(folder, config)
    halves: dict[str, dict[str, TensorInfo]] = {}
    for key, info in read_header(weights).items():
        name = key.removeprefix(KEY_PREFIX)
        match = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", name)
        if match:
            halves.setdefault(match[1], {})[match[2]] = info
        elif ".lora_" in name:  # lora_embedding_A/B, lora_magnitude_vector, ...
            problems.append(f"{weights}: {key}: not a LoRA linear pair; not supported")
        else:
            adapter.saved[name] = info
    for module, pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            problems.append(f"{weights}: {module}: has lora_{''.join(pair)} only")
            continue
        r, scale = lora_scale(config, module)
        if pair["A"].shape[0] != r or pair["B"].shape[-1] != r:
            problems.append(
                f"{weights}: {module}: lora_A {list(pair['A'].shape)} / lora_B "
                f"{list(pair['B'].shape)} do not have rank r={r} (r / rank_pattern)"
            )
            continue
        adapter.pairs[f"{module}.weight"] = LoraPair(module, pair["A"], pair["B"], scale)
    if problems:
        raise InvalidInput(problems[0], problems)
    return adapter
