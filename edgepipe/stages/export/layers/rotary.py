"""Rotary as com.microsoft.RotaryEmbedding nodes before attention (layout `rotary_in_attention`
False), for execution providers whose GroupQueryAttention cannot apply rotary itself."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgepipe.formats.onnx_writer import MS_DOMAIN, GraphWriter


def position_ids(writer: GraphWriter, ids: ir.Value, mask: ir.Value) -> ir.Value:
    """Positions of the new tokens `[batch, sequence_length]`, from the attention mask.

    Position of each new token = (number of attended tokens up to it) - 1, taken over the last
    sequence_length columns of the mask; padded slots clamp to 0.

    Args:
        writer: the graph.
        ids: `input_ids` `[batch, sequence_length]`.
        mask: `attention_mask` `[batch, total_sequence_length]`, int64.

    Returns:
        int64 positions.
    """
    cum = writer.op("CumSum", "pos/CumSum", [mask, writer.const("pos/axis", np.array(1, np.int64))])
    pos = writer.op("Sub", "pos/Sub", [cum, writer.const("pos/one", np.array(1, np.int64))])
    pos = writer.op("Max", "pos/Max", [pos, writer.const("pos/zero", np.array(0, np.int64))])
    seq = writer.op(
        "Gather",
        "pos/seq_len",
        [
            writer.op("Shape", "pos/ids_shape", [ids]),
            writer.const("pos/idx1", np.array([1], np.int64)),
        ],
        {"axis": 0},
    )
    neg = writer.op("Neg", "pos/neg_seq", [seq])
    return writer.op(
        "Slice",
        "pos/last",
        [
            pos,
            neg,
            writer.const("pos/end", np.array([np.iinfo(np.int64).max], np.int64)),
            writer.const("pos/slice_axis", np.array([1], np.int64)),
        ],
    )


def rotary_embedding(
    writer: GraphWriter,
    name: str,
    x: ir.Value,
    positions: ir.Value,
    cos: ir.Value,
    sin: ir.Value,
    *,
    heads: int,
    head_dim: int,
) -> ir.Value:
    """Non-interleaved rotary on q or k `[batch, seq, heads * head_dim]`.

    Args:
        writer: the graph.
        name: the node's prefix.
        x: q or k.
        positions: `position_ids`.
        cos: cos cache `[max_positions, head_dim / 2]`.
        sin: sin cache, the same shape.
        heads: number of heads in x.
        head_dim: the head size (rotary covers all of it).

    Returns:
        x rotated, x's shape.
    """
    return writer.op(
        "RotaryEmbedding",
        f"{name}/RotaryEmbedding",
        [x, positions, cos, sin],
        {"interleaved": 0, "num_heads": heads, "rotary_embedding_dim": head_dim},
        domain=MS_DOMAIN,
    )
