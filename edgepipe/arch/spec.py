"""The architecture-family machinery every family shares: its description and config checks.

A family (`edgepipe.arch.qwen2`, `edgepipe.arch.qwen3`) is a `FamilySpec`: data the builder
reads instead of branching on the family's name. `decoder_config` checks a config.json against
its family; `expected_shapes` and `check_weights` check the weights against the config. The
registry of families and `read_config` live in `edgepipe.arch.families`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edgepipe.errors import InvalidInput

if TYPE_CHECKING:
    from edgepipe.formats.safetensors import SafetensorsModel

# Rope types the builder implements: plain rotary with one theta.
SUPPORTED_ROPE_TYPES = ("default",)


@dataclass(frozen=True)
class ArchShape:
    """The numbers that fix a model's shape (one row of a family's `shapes`).

    Attributes:
        config_url: the real model's Hub page, whose config.json the row copies (empty for a
            shape read from a config on disk).
    """

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    tie_word_embeddings: bool = True
    vocab_size: int = 151936
    max_position_embeddings: int = 32768
    config_url: str = ""


@dataclass(frozen=True)
class FamilySpec:
    """What differs between architecture families, as data the builder reads."""

    name: str  # also onnxruntime-genai's model.type
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    qkv_bias: bool
    qk_norm: bool
    # Weight names; `{i}` is the layer index.
    embed: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    lm_head: str = "lm_head.weight"
    layer: dict[str, str] = field(
        default_factory=lambda: {
            "input_norm": "model.layers.{i}.input_layernorm.weight",
            "post_norm": "model.layers.{i}.post_attention_layernorm.weight",
            "q": "model.layers.{i}.self_attn.q_proj.weight",
            "k": "model.layers.{i}.self_attn.k_proj.weight",
            "v": "model.layers.{i}.self_attn.v_proj.weight",
            "o": "model.layers.{i}.self_attn.o_proj.weight",
            "gate": "model.layers.{i}.mlp.gate_proj.weight",
            "up": "model.layers.{i}.mlp.up_proj.weight",
            "down": "model.layers.{i}.mlp.down_proj.weight",
        }
    )
    bias: dict[str, str] = field(default_factory=dict)
    norms: dict[str, str] = field(default_factory=dict)
    # Whether head_dim may be absent from config.json (then hidden_size / num_attention_heads).
    head_dim_fallback: bool = True
    shapes: dict[str, ArchShape] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class DecoderConfig(ArchShape):
    """The fields of config.json the builder uses, checked: the shape plus what runs it."""

    family: FamilySpec
    rms_norm_eps: float
    rope_theta: float
    bos_token_id: int | None
    eos_token_id: list[int]
    raw: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        """A small JSON-able summary (for ExportResult and manifests)."""
        return {
            "family": self.family.name,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
        }


# Keys a rope block may hold that the plain rotary the builder implements honours.
_ROPE_KEYS = frozenset({"rope_type", "type", "rope_theta"})


def rope_theta(config: Mapping[str, Any], where: str) -> float:
    """rope_theta, after refusing any rope setting the exporter does not implement.

    transformers 5 writes `rope_parameters` ({rope_theta, rope_type}); older configs write
    `rope_theta` and `rope_scaling` at the top level. Both blocks are checked on their own: a
    default `rope_parameters` does not make a `rope_scaling` entry beside it go away, and a
    scaling key (`factor`, ...) under a default type would still be silently ignored.
    """
    theta = config.get("rope_theta", 10000.0)
    for name in ("rope_parameters", "rope_scaling"):
        block = config.get(name)
        if block is None or block == {}:
            continue
        if not isinstance(block, dict):
            raise InvalidInput(f"{where}: {name}: expected an object, got {block!r}")
        rope_type = block.get("rope_type", block.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise InvalidInput(
                f"{where}: {name}: rope type {rope_type!r} is not implemented; supported: "
                f"{list(SUPPORTED_ROPE_TYPES)} (use a model without rope scaling)"
            )
        extra = sorted(set(block) - _ROPE_KEYS)
        if extra:
            raise InvalidInput(
                f"{where}: {name}: {extra} not implemented (plain rotary takes only rope_type "
                "'default' and rope_theta); use a model without rope scaling"
            )
        theta = block.get("rope_theta", theta)
    try:
        return float(theta)
    except (TypeError, ValueError):
        raise InvalidInput(f"{where}: rope_theta: expected a number, got {theta!r}") from None


def decoder_config(config: dict[str, Any], family: FamilySpec, where: str) -> DecoderConfig:
    """Check a parsed config.json of `family` and keep the fields the builder uses.

    Args:
        config: the parsed config.json.
        family: its family (see `edgepipe.arch.families.family_for`).
        where: the file, for messages.

    Raises:
        InvalidInput: missing fields, a missing head_dim the family needs, rope scaling.
    """
    required = (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
    )
    missing = [k for k in required if k not in config]
    if missing:
        raise InvalidInput(
            f"{where}: missing fields {missing}", [f"{where}: {k}: missing" for k in missing]
        )
    heads = int(config["num_attention_heads"])
    head_dim = config.get("head_dim")
    if head_dim is None:
        if not family.head_dim_fallback:
            raise InvalidInput(
                f"{where}: head_dim: missing ({family.name} needs it in config.json)"
            )
        head_dim = int(config["hidden_size"]) // heads
    eos = config.get("eos_token_id")
    eos_list = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    return DecoderConfig(
        family=family,
        vocab_size=int(config["vocab_size"]),
        hidden_size=int(config["hidden_size"]),
        num_hidden_layers=int(config["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        intermediate_size=int(config["intermediate_size"]),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta(config, where),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        max_position_embeddings=int(config.get("max_position_embeddings", 32768)),
        bos_token_id=config.get("bos_token_id"),
        eos_token_id=eos_list,
        raw=config,
    )


def expected_shapes(cfg: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """Every weight the builder reads, with the shape config.json implies."""
    fam = cfg.family
    h, d, i_size = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q_dim, kv_dim = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    per_layer = {
        "input_norm": (h,),
        "post_norm": (h,),
        "q": (q_dim, h),
        "k": (kv_dim, h),
        "v": (kv_dim, h),
        "o": (h, q_dim),
        "gate": (i_size, h),
        "up": (i_size, h),
        "down": (h, i_size),
    }
    shapes: dict[str, tuple[int, ...]] = {fam.embed: (cfg.vocab_size, h)}
    for layer in range(cfg.num_hidden_layers):
        for key, shape in per_layer.items():
            shapes[fam.layer[key].format(i=layer)] = shape
        if fam.qkv_bias:
            for key, dim in (("q", q_dim), ("k", kv_dim), ("v", kv_dim)):
                shapes[fam.bias[key].format(i=layer)] = (dim,)
        if fam.qk_norm:
            for key in ("q_norm", "k_norm"):
                shapes[fam.norms[key].format(i=layer)] = (d,)
    shapes[fam.final_norm] = (h,)
    if not cfg.tie_word_embeddings:
        shapes[fam.lm_head] = (cfg.vocab_size, h)
    return shapes


def check_weights(cfg: DecoderConfig, weights: SafetensorsModel) -> None:
    """Raise InvalidInput listing every missing tensor and every shape mismatch."""
    problems: list[str] = []
    expected = expected_shapes(cfg)
    missing = [name for name in expected if name not in weights]
    if missing:
        shown = ", ".join(missing[:20]) + (
            f" (+{len(missing) - 20} more)" if len(missing) > 20 else ""
        )
        problems.append(
            f"{weights.folder}: {len(missing)} tensors missing from the weights: {shown}"
        )
    for name, shape in expected.items():
        if name in weights and weights.info(name).shape != shape:
            problems.append(
                f"{weights.folder}: {name}: shape {list(weights.info(name).shape)}, expected "
                f"{list(shape)} from config.json"
            )
    if problems:
        raise InvalidInput(problems[0], problems)
