"""Qwen3's q/k norm: an RMSNorm over each attention head, before rotary."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgepipe.formats.onnx_writer import GraphWriter
from edgepipe.stages.export.layers.norms import rms_norm


def head_rms_norm(
    writer: GraphWriter,
    name: str,
    x: ir.Value,
    gamma: ir.Value,
    *,
    heads: int,
    head_dim: int,
    eps: float,
) -> ir.Value:
    """RMSNorm over each head of x: reshape to `[b, s, heads, head_dim]`, norm, reshape back.

    Args:
        writer: the graph.
        name: the nodes' prefix.
        x: q or k, `[batch, seq, heads * head_dim]`.
        gamma: `[head_dim]`, shared by every head.
        heads: number of heads in x.
        head_dim: the head size.
        eps: config.json's `rms_norm_eps`.

    Returns:
        The normed x, x's shape.
    """
    split = writer.op(
        "Reshape",
        f"{name}/split_heads",
        [x, writer.const(f"{name}/heads_shape", np.array([0, 0, heads, head_dim], np.int64))],
    )
    normed = rms_norm(writer, name, split, gamma, eps)
    return writer.op(
        "Reshape",
        f"{name}/merge_heads",
        [
            normed,
            writer.const(f"{name}/merged_shape", np.array([0, 0, heads * head_dim], np.int64)),
        ],
    )
