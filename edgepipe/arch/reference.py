"""A numpy reference forward of one Qwen2/Qwen2.5/Qwen3 decoder layer, capturing what each
linear sees.

The forward follows transformers' decoder layers exactly (checked in tests/test_calibrate.py):
RMSNorm → q/k/v (+bias on Qwen2) → Qwen3's per-head q/k RMSNorm → rotary (half-rotation
layout, default rope) → causal grouped-query attention → o_proj → residual → RMSNorm → SwiGLU
MLP → residual. GPTQ's calibration (`edgepipe.stages.quantize.gptq_inputs`) runs it layer by
layer; it needs numpy only, no torch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from edgepipe.arch.spec import rope_theta
from edgepipe.errors import InvalidInput

_LAYER_PREFIX = re.compile(r"^(?:.*\.)?layers\.\d+\.")

# Which captured activation feeds which linear.
_INPUT_OF = {
    "self_attn.q_proj": "attn_in",
    "self_attn.k_proj": "attn_in",
    "self_attn.v_proj": "attn_in",
    "self_attn.o_proj": "o_proj_in",
    "mlp.gate_proj": "mlp_in",
    "mlp.up_proj": "mlp_in",
    "mlp.down_proj": "down_proj_in",
}


@dataclass(frozen=True)
class LayerConfig:
    """The few config values one decoder layer needs.

    Attributes:
        hidden_size: Model width.
        num_attention_heads: Query heads.
        num_key_value_heads: Key/value heads (GQA).
        head_dim: Per-head width; read from the config, not hidden/heads (Qwen3 differs).
        rms_norm_eps: RMSNorm epsilon.
        rope_theta: Rotary base.
        qk_norm: Qwen3's per-head RMSNorm on q and k before rotary.
    """

    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    qk_norm: bool = False

    @classmethod
    def from_hf_config(cls, config: Mapping) -> LayerConfig:
        """Read a Hugging Face `config.json` dict (Qwen2, Qwen2.5 or Qwen3)."""
        heads = config["num_attention_heads"]
        theta = rope_theta({"rope_theta": 1e6, **config}, "config.json")
        return cls(
            hidden_size=config["hidden_size"],
            num_attention_heads=heads,
            num_key_value_heads=config.get("num_key_value_heads", heads),
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            qk_norm=config.get("model_type") == "qwen3",
        )


@dataclass
class LayerActivations:
    """What one decoder layer saw and produced, all `[batch, seq, features]` float32.

    Attributes:
        attn_in: Input of q_proj, k_proj and v_proj (after input_layernorm).
        o_proj_in: Input of o_proj (attention output, heads concatenated).
        mlp_in: Input of gate_proj and up_proj (after post_attention_layernorm).
        down_proj_in: Input of down_proj (`silu(gate) * up`).
        hidden_out: The hidden states leaving the layer (input of the next one).
    """

    attn_in: np.ndarray
    o_proj_in: np.ndarray
    mlp_in: np.ndarray
    down_proj_in: np.ndarray
    hidden_out: np.ndarray

    def for_weight(self, name: str) -> np.ndarray:
        """Calibration activations `[tokens, K]` for a linear weight name (HF naming).

        Raises:
            InvalidInput: The name is not one of the layer's seven linears.
        """
        key = _LAYER_PREFIX.sub("", name).removesuffix(".weight")
        if key not in _INPUT_OF:
            raise InvalidInput(
                f"{name}: not a decoder-layer linear; expected one of "
                f"{', '.join(k + '.weight' for k in _INPUT_OF)}"
            )
        act = getattr(self, _INPUT_OF[key])
        return act.reshape(-1, act.shape[-1])


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm over the last axis, in float32 like transformers."""
    var = np.mean(np.square(x, dtype=np.float32), axis=-1, keepdims=True)
    return (x / np.sqrt(var + eps)).astype(np.float32) * weight.astype(np.float32)


def rotary_cos_sin(positions: np.ndarray, head_dim: int, theta: float) -> tuple[np.ndarray, ...]:
    """cos and sin `[..., seq, head_dim]` in the half-rotation layout (`rotary_interleaved=0`)."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    freqs = positions[..., None].astype(np.float64) * inv_freq
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


def _rotate_half(x: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _linear(x: np.ndarray, weights: Mapping[str, np.ndarray], key: str) -> np.ndarray:
    y = x @ weights[key + ".weight"].astype(np.float32).T
    bias = weights.get(key + ".bias")
    return y if bias is None else y + bias.astype(np.float32)


def _normalize_names(weights: Mapping[str, np.ndarray], cfg: LayerConfig) -> dict:
    out = {_LAYER_PREFIX.sub("", k): np.asarray(v) for k, v in weights.items()}
    needed = [
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
        *(k + ".weight" for k in _INPUT_OF),
    ]
    if cfg.qk_norm:
        needed += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
    missing = [k for k in needed if k not in out]
    if missing:
        raise InvalidInput(f"layer weights: missing {', '.join(missing)}")
    return out


def layer_forward(
    hidden: np.ndarray,
    weights: Mapping[str, np.ndarray],
    config: LayerConfig,
    positions: np.ndarray | None = None,
) -> LayerActivations:
    """Run one Qwen decoder layer on `hidden` and capture every linear's input.

    Args:
        hidden: Hidden states entering the layer, `[seq, hidden]` or `[batch, seq, hidden]`;
            each row of a batch is an independent, unpadded sequence.
        weights: This layer's weights by HF name, with or without the `model.layers.{i}.`
            prefix; linear weights are `[out, in]` as in the checkpoint.
        config: The layer's shape (see `LayerConfig.from_hf_config`).
        positions: Token positions `[seq]` or `[batch, seq]`; default 0..seq-1.

    Returns:
        The captured activations and the hidden states leaving the layer, `[batch, seq, ...]`.
    """
    x = np.asarray(hidden, dtype=np.float32)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or x.shape[-1] != config.hidden_size:
        raise InvalidInput(
            f"hidden: expected [batch, seq, {config.hidden_size}], got {np.shape(hidden)}"
        )
    w = _normalize_names(weights, config)
    b, t, _ = x.shape
    h, kvh, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    if positions is None:
        positions = np.arange(t)
    positions = np.broadcast_to(np.asarray(positions), (b, t))

    attn_in = rms_norm(x, w["input_layernorm.weight"], config.rms_norm_eps)
    q = _linear(attn_in, w, "self_attn.q_proj").reshape(b, t, h, d).transpose(0, 2, 1, 3)
    k = _linear(attn_in, w, "self_attn.k_proj").reshape(b, t, kvh, d).transpose(0, 2, 1, 3)
    v = _linear(attn_in, w, "self_attn.v_proj").reshape(b, t, kvh, d).transpose(0, 2, 1, 3)
    if config.qk_norm:
        q = rms_norm(q, w["self_attn.q_norm.weight"], config.rms_norm_eps)
        k = rms_norm(k, w["self_attn.k_norm.weight"], config.rms_norm_eps)
    cos, sin = rotary_cos_sin(positions, d, config.rope_theta)
    cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin

    # Grouped-query attention: each kv head serves h // kvh consecutive query heads.
    k = np.repeat(k, h // kvh, axis=1)
    v = np.repeat(v, h // kvh, axis=1)
    scores = (q @ k.transpose(0, 1, 3, 2)).astype(np.float64) / np.sqrt(d)
    causal = positions[:, None, :, None] >= positions[:, None, None, :]
    scores = np.where(causal, scores, -np.inf)
    scores -= scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    attn = (probs.astype(np.float32) @ v).transpose(0, 2, 1, 3).reshape(b, t, h * d)
    o_proj_in = np.ascontiguousarray(attn)
    x = x + _linear(o_proj_in, w, "self_attn.o_proj")

    mlp_in = rms_norm(x, w["post_attention_layernorm.weight"], config.rms_norm_eps)
    gate = _linear(mlp_in, w, "mlp.gate_proj")
    up = _linear(mlp_in, w, "mlp.up_proj")
    # silu(g) = g * sigmoid(g); the tanh form cannot overflow for very negative g.
    down_proj_in = (gate * (0.5 * (1.0 + np.tanh(0.5 * gate)))) * up
    hidden_out = x + _linear(down_proj_in, w, "mlp.down_proj")
    return LayerActivations(attn_in, o_proj_in, mlp_in, down_proj_in, hidden_out)
