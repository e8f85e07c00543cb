"""Attention: the q/k/v projections and com.microsoft.GroupQueryAttention over the KV cache.

Layout switches: `packed_qkv` (one MatMul, split only when q and k need work of their own,
or three MatMuls) and `rotary_in_attention` (GQA applies rotary from the cos/sin caches, or
`rotary` nodes did it before).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from edgepipe.formats.onnx_writer import MS_DOMAIN, GraphWriter
from edgepipe.stages.export.layers.layout import Layout
from edgepipe.stages.export.layers.linear import Linear
from edgepipe.stages.export.layers.rotary import position_ids


@dataclass(frozen=True)
class Heads:
    """Attention sizes: query heads, key/value heads and the head size."""

    q: int
    kv: int
    dim: int


@dataclass(frozen=True)
class SharedInputs:
    """What every layer's attention reads.

    Attributes:
        seqlens_k: int32 `[batch]`, attended tokens minus one (GQA's contract).
        total_len: int32 scalar, total sequence length.
        cos: rotary cos cache `[context, head_dim / 2]`.
        sin: rotary sin cache.
        positions: position ids for `rotary` nodes; None when rotary is inside GQA.
    """

    seqlens_k: ir.Value
    total_len: ir.Value
    cos: ir.Value
    sin: ir.Value
    positions: ir.Value | None


def shared_inputs(
    writer: GraphWriter,
    ids: ir.Value,
    mask: ir.Value,
    cos: np.ndarray,
    sin: np.ndarray,
    layout: Layout,
) -> SharedInputs:
    """Write the attention bookkeeping every layer shares (both int32, from the mask).

    Args:
        writer: the graph.
        ids: `input_ids`.
        mask: `attention_mask`, int64 `[batch, total_sequence_length]`.
        cos: the rotary cos cache (`common.rotary_caches`), stored as `rotary.cos_cache`.
        sin: the sin cache, stored as `rotary.sin_cache`.
        layout: whether rotary runs inside attention (else position ids are computed).

    Returns:
        The shared values.
    """
    mask_sum = writer.op(
        "ReduceSum",
        "mask/ReduceSum",
        [mask, writer.const("mask/axes", np.array([1], np.int64))],
        {"keepdims": 0},
    )
    seqlens = writer.op(
        "Sub", "mask/Sub", [mask_sum, writer.const("mask/one", np.array(1, np.int64))]
    )
    seqlens_k = writer.op("Cast", "mask/seqlens_k", [seqlens], {"to": ir.DataType.INT32})
    mask_shape = writer.op("Shape", "mask/Shape", [mask])
    total = writer.op(
        "Gather",
        "mask/total_gather",
        [mask_shape, writer.const("mask/idx1", np.array(1, np.int64))],
        {"axis": 0},
    )
    total_len = writer.op("Cast", "mask/total_sequence_length", [total], {"to": ir.DataType.INT32})
    positions = None if layout.rotary_in_attention else position_ids(writer, ids, mask)
    return SharedInputs(
        seqlens_k,
        total_len,
        writer.weight("rotary.cos_cache", cos),
        writer.weight("rotary.sin_cache", sin),
        positions,
    )


def project_qkv(
    writer: GraphWriter,
    linear: Linear,
    prefix: str,
    x: ir.Value,
    weights: list[str],
    biases: list[str] | None,
    heads: Heads,
    layout: Layout,
) -> list[ir.Value]:
    """The q, k and v projections.

    Args:
        writer: the graph.
        linear: writes each projection (`linear.Linears`).
        prefix: the nodes' prefix (`layers.{i}.attn`).
        x: the normed hidden states.
        weights: HF names of the q, k and v weights.
        biases: HF names of their biases (Qwen2), or None.
        heads: attention sizes.
        layout: `packed_qkv`, and whether q, k and v must come apart (`Layout.separate_qkv`).

    Returns:
        [q, k, v], or [qkv] packed when nothing runs between the projection and attention.
    """
    if not layout.packed_qkv:  # three projections and no Split (DirectML's GQA takes q, k, v)
        return [
            linear(f"{prefix}.{kind}_proj", x, [n], b and [b])
            for kind, n, b in zip("qkv", weights, biases or [None] * 3, strict=True)
        ]
    qkv = linear(f"{prefix}.qkv_proj", x, weights, biases)
    if not layout.separate_qkv:
        return [qkv]
    q_dim, kv_dim = heads.q * heads.dim, heads.kv * heads.dim
    sizes = writer.const(f"{prefix}.qkv_sizes", np.array([q_dim, kv_dim, kv_dim], np.int64))
    return writer.op("Split", f"{prefix}.qkv_split", [qkv, sizes], {"axis": -1}, num_outputs=3)


def group_query_attention(
    writer: GraphWriter,
    prefix: str,
    qkv: list[ir.Value],
    past: tuple[ir.Value, ir.Value],
    present_names: tuple[str, str],
    shared: SharedInputs,
    heads: Heads,
    layout: Layout,
) -> ir.Value:
    """com.microsoft.GroupQueryAttention over the KV cache.

    Args:
        writer: the graph.
        prefix: the node's prefix (`layers.{i}.attn`).
        qkv: [q, k, v], or [qkv] packed (`project_qkv`).
        past: this layer's past key and value inputs.
        present_names: the graph output names of the present key and value.
        shared: the values every layer reads (`shared_inputs`).
        heads: attention sizes.
        layout: `rotary_in_attention`.

    Returns:
        The attention output `[batch, seq, heads.q * heads.dim]`.
    """
    qkv_inputs = list(qkv) if len(qkv) == 3 else [qkv[0], None, None]
    inputs = [*qkv_inputs, *past, shared.seqlens_k, shared.total_len]
    if layout.rotary_in_attention:
        inputs += [shared.cos, shared.sin]
    attn, _, _ = writer.op(
        "GroupQueryAttention",
        f"{prefix}.GroupQueryAttention",
        inputs,
        {
            "num_heads": heads.q,
            "kv_num_heads": heads.kv,
            "do_rotary": int(layout.rotary_in_attention),
            "rotary_interleaved": 0,
            "scale": float(heads.dim**-0.5),
        },
        domain=MS_DOMAIN,
        output_names=[f"{prefix}/output_0", *present_names],
    )
    return attn
