"""Qwen3's q/k norm: an RMSNorm over each attention head, before rotary.

Two forms, chosen by the profile (`decoder.head_norm`, `Layout.branchwise_norm`):

* `branchwise_norm`: com.microsoft.BranchwiseRMSNorm normalizes each `head_dim` slice of a
  flat `[b, s, heads * head_dim]` tensor in one node (onnxruntime registers it for the CPU
  provider), so q and k need no Reshape. Measured on the shape-exact Qwen3-0.6B int4 build
  (`profile_step` of benchmarks/kernel_costs.py: 512-token prompt, 64 decode steps, two runs
  of the builds before and after): the q/k norms cost Reshape 690-770 + SimplifiedLayer-
  Normalization 560 us of kernel time per decode step before, BranchwiseRMSNorm 580-650 us
  after (nodes per step 488 -> 376); the prompt's kernels are unchanged (1.68-1.79 s before,
  1.68-1.69 s after). One node over [q | k] with a scale row per head (`scale` of shape
  [heads, head_dim]) would drop the Split too, but onnxruntime 1.32 takes a slow path for such
  a scale: 10.8 ms vs 0.41 ms for a 512-token prompt's 24 heads, on the kernel alone.
* `head_rms_norm`: Reshape to `[b, s, heads, head_dim]`, SimplifiedLayerNormalization, Reshape
  back, on q and on k (DirectML).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgepipe.formats.onnx_writer import MS_DOMAIN, GraphWriter
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


def branchwise_norm(
    writer: GraphWriter, name: str, x: ir.Value, gamma: ir.Value, *, heads: int, eps: float
) -> ir.Value:
    """RMSNorm over each of the `heads` equal slices of x's last axis, in one node.

    Args:
        writer: the graph.
        name: the node's name.
        x: `[batch, seq, heads * head_dim]`.
        gamma: `[head_dim]`, shared by every head.
        heads: the number of slices.
        eps: config.json's `rms_norm_eps`.

    Returns:
        The normed x, x's shape.
    """
    attrs = {"num_branches": heads, "epsilon": float(eps)}
    return writer.op("BranchwiseRMSNorm", name, [x, gamma], attrs, domain=MS_DOMAIN)
