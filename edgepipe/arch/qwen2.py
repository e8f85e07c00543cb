"""Qwen2 / Qwen2.5 family spec (data only).

Qwen2 is a Llama-style decoder: RMSNorm, rotary attention with grouped KV heads and a bias
on q/k/v (not on o_proj), SwiGLU MLP. Real configs:
https://huggingface.co/Qwen/Qwen2.5-0.5B/blob/main/config.json (and -1.5B, -3B).
"""

from __future__ import annotations

from edgepipe.arch.spec import ArchShape, FamilySpec

QWEN2 = FamilySpec(
    name="qwen2",
    architectures=("Qwen2ForCausalLM",),
    model_types=("qwen2",),
    qkv_bias=True,
    qk_norm=False,
    bias={
        "q": "model.layers.{i}.self_attn.q_proj.bias",
        "k": "model.layers.{i}.self_attn.k_proj.bias",
        "v": "model.layers.{i}.self_attn.v_proj.bias",
    },
    shapes={
        "qwen2.5-0.5b": ArchShape(
            896, 24, 14, 2, 64, 4864, config_url="https://huggingface.co/Qwen/Qwen2.5-0.5B"
        ),
        "qwen2.5-1.5b": ArchShape(
            1536, 28, 12, 2, 128, 8960, config_url="https://huggingface.co/Qwen/Qwen2.5-1.5B"
        ),
        "qwen2.5-3b": ArchShape(
            2048, 36, 16, 2, 128, 11008, config_url="https://huggingface.co/Qwen/Qwen2.5-3B"
        ),
    },
)
