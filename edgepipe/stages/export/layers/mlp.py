"""The SwiGLU MLP: down(silu(gate(x)) * up(x)), gate and up as two linears.

Why two MatMuls and not one packed gate_up MatMul + Split: packing was measured on a
shape-exact Qwen2.5-0.5B and is no win. fp32 (1 thread, best of 4): prefill of 128 tokens
923-1023 ms packed vs 952-1061 ms apart, decode 94.5-102 vs 93.3-103 ms per token, within
noise; int4 (block 32, accuracy_level 4, 2 threads): decode 31.5 vs 29.7 tok/s packed, prefill
187 vs 196 tok/s, a trade. Apart, per-weight quantization overrides stay simple.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgepipe.formats.onnx_writer import GraphWriter
from edgepipe.stages.export.layers.linear import Linear


def swiglu_mlp(
    writer: GraphWriter,
    linear: Linear,
    prefix: str,
    x: ir.Value,
    weights: tuple[str, str, str],
    dtype: np.dtype,
) -> ir.Value:
    """The MLP of one layer.

    Args:
        writer: the graph.
        linear: writes each projection (`linear.Linears`).
        prefix: the nodes' prefix (`layers.{i}.mlp`).
        x: the normed hidden states, in `dtype`.
        weights: HF names of the gate, up and down weights.
        dtype: the MLP's dtype (float32 for a layer the fp16 guard names).

    Returns:
        The MLP output, in `dtype`.
    """
    gate_name, up_name, down_name = weights
    gate = linear(f"{prefix}.gate_proj", x, [gate_name], dtype=dtype)
    up = linear(f"{prefix}.up_proj", x, [up_name], dtype=dtype)
    sigmoid = writer.op("Sigmoid", f"{prefix}.sigmoid", [gate])
    silu = writer.op("Mul", f"{prefix}.silu", [gate, sigmoid])
    act = writer.op("Mul", f"{prefix}.act", [silu, up])
    return linear(f"{prefix}.down_proj", act, [down_name], dtype=dtype)
