"""The fp16 guard's dtypes: which parts of a float16 graph run in float32, and the Casts between.

A float16 decoder whose residual stream (or one layer's attention output or MLP) leaves the
float16 range produces inf; `edgepipe.stages.export.fp16guard.plan_guard` names the parts that
do, and this piece keeps them in float32 with a Cast at each edge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from edgepipe.formats.onnx_writer import GraphWriter, ir_dtype

if TYPE_CHECKING:
    from edgepipe.stages.export.fp16guard import Fp16Guard

FLOAT32 = np.dtype(np.float32)


@dataclass(frozen=True)
class LayerDtypes:
    """The dtype of each part of the graph.

    Attributes:
        activation: the graph's activation dtype (inputs, outputs, KV cache, most layers).
        residual: the residual stream and its norms (float32 under the fp16 guard).
        fp32_attention: layers whose o_proj runs in float32.
        fp32_mlp: layers whose MLP runs in float32.
    """

    activation: np.dtype
    residual: np.dtype
    fp32_attention: tuple[int, ...] = ()
    fp32_mlp: tuple[int, ...] = ()

    @classmethod
    def of(cls, activation: np.dtype | type, guard: Fp16Guard | None) -> LayerDtypes:
        """The dtypes of an export in `activation` dtype under `guard` (None: no guard)."""
        activation = np.dtype(activation)
        if guard is None:
            return cls(activation, activation)
        residual = FLOAT32 if guard.residual else activation
        return cls(activation, residual, tuple(guard.fp32_attention), tuple(guard.fp32_mlp))

    def o_proj(self, layer: int) -> np.dtype:
        """The dtype layer `layer`'s o_proj runs in."""
        return FLOAT32 if layer in self.fp32_attention else self.activation

    def mlp(self, layer: int) -> np.dtype:
        """The dtype layer `layer`'s MLP runs in."""
        return FLOAT32 if layer in self.fp32_mlp else self.activation


def cast(writer: GraphWriter, name: str, x: ir.Value, src: np.dtype, dst: np.dtype) -> ir.Value:
    """x cast from `src` to `dst` (a guard edge); x itself when they agree.

    Args:
        writer: the graph.
        name: the node's prefix (`{name}/to_fp32` or `{name}/to_fp16`).
        x: the value, in `src`.
        src: x's dtype.
        dst: the wanted dtype.

    Returns:
        x in `dst`.
    """
    if np.dtype(src) == np.dtype(dst):
        return x
    suffix = "to_fp32" if np.dtype(dst) == FLOAT32 else "to_fp16"
    return writer.op("Cast", f"{name}/{suffix}", [x], {"to": ir_dtype(dst)})
