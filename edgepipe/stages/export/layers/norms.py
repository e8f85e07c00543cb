"""RMSNorm with ORT's fused kernels: SimplifiedLayerNormalization, and its Skip variant that
adds the residual first and returns the sum as the next residual."""

from __future__ import annotations

import onnx_ir as ir

from edgepipe.formats.onnx_writer import MS_DOMAIN, GraphWriter


def rms_norm(writer: GraphWriter, name: str, x: ir.Value, gamma: ir.Value, eps: float) -> ir.Value:
    """RMSNorm(x) * gamma over the last axis, accumulated in float32 (`stash_type` 1).

    Args:
        writer: the graph.
        name: the node's prefix (`{name}/SimplifiedLayerNorm`).
        x: `[..., hidden]`.
        gamma: `[hidden]`, x's dtype.
        eps: config.json's `rms_norm_eps`.

    Returns:
        The normed x.
    """
    return writer.op(
        "SimplifiedLayerNormalization",
        f"{name}/SimplifiedLayerNorm",
        [x, gamma],
        {"epsilon": eps, "axis": -1, "stash_type": 1},
    )


def skip_rms_norm(
    writer: GraphWriter,
    name: str,
    x: ir.Value,
    residual: ir.Value | None,
    gamma: ir.Value,
    eps: float,
) -> tuple[ir.Value, ir.Value]:
    """RMSNorm(x + residual) * gamma; the first layer (no residual yet) norms x alone.

    Args:
        writer: the graph.
        name: the node's prefix.
        x: the sublayer output `[..., hidden]`.
        residual: the residual stream so far, or None before the first layer.
        gamma: `[hidden]`.
        eps: config.json's `rms_norm_eps`.

    Returns:
        (normed, new residual), the new residual being x + residual.
    """
    if residual is None:
        return rms_norm(writer, name, x, gamma, eps), x
    out_names = [f"{name}/SkipSimplifiedLayerNorm/output_{k}" for k in range(4)]
    # mean and inv_std_var stay unused: DirectML's kernel refuses the node when they are.
    out_names[1] = out_names[2] = ""
    outs = writer.op(
        "SkipSimplifiedLayerNormalization",
        f"{name}/SkipSimplifiedLayerNorm",
        [x, residual, gamma],
        {"epsilon": eps},
        domain=MS_DOMAIN,
        output_names=out_names,
    )
    return outs[0], outs[3]
