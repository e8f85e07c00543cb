"""Qwen3 family spec (data only).

Qwen3 differs from Qwen2 in three ways the builder cares about: no bias on q/k/v, an RMSNorm
over each head of q and of k (`q_norm`, `k_norm`, weight [head_dim]) applied before rotary,
and head_dim read from config.json (0.6B and 4B have head_dim != hidden / heads). Real configs:
https://huggingface.co/Qwen/Qwen3-0.6B/blob/main/config.json (and -1.7B, -4B).
"""

from __future__ import annotations

from edgepipe.arch.spec import ArchShape, FamilySpec

QWEN3 = FamilySpec(
    name="qwen3",
    architectures=("Qwen3ForCausalLM",),
    model_types=("qwen3",),
    qkv_bias=False,
    qk_norm=True,
    norms={
        "q_norm": "model.layers.{i}.self_attn.q_norm.weight",
        "k_norm": "model.layers.{i}.self_attn.k_norm.weight",
    },
    head_dim_fallback=False,
    shapes={
        "qwen3-0.6b": ArchShape(
            1024,
            28,
            16,
            8,
            128,
            3072,
            max_position_embeddings=40960,
            config_url="https://huggingface.co/Qwen/Qwen3-0.6B",
        ),
        "qwen3-1.7b": ArchShape(
            2048,
            28,
            16,
            8,
            128,
            6144,
            max_position_embeddings=40960,
            config_url="https://huggingface.co/Qwen/Qwen3-1.7B",
        ),
        "qwen3-4b": ArchShape(
            2560,
            36,
            32,
            8,
            128,
            9728,
            max_position_embeddings=40960,
            config_url="https://huggingface.co/Qwen/Qwen3-4B",
        ),
    },
)
