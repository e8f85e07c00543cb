"""Linear layers y = x Wᵀ (+ b) from HF weights `[N, K]`: a float MatMul, or MatMulNBits over
int4/int8 codes quantized as the weight streams past.

Layout switch `fused_bias`: the bias is MatMulNBits' sixth input (CPU, CUDA) or an Add after a
four-input MatMulNBits (DirectML's kernel takes no bias).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
import onnx_ir as ir

from edgepipe.formats.onnx_writer import MS_DOMAIN, GraphWriter
from edgepipe.stages.quantize.plan import QuantizedWeight, QuantPlan, QuantSpec, quantize_weight


class Linear(Protocol):
    """What the layer pieces call to write one linear (`Linears.__call__`)."""

    def __call__(
        self,
        name: str,
        x: ir.Value,
        hf_names: list[str],
        bias_names: list[str] | None = None,
        spec_name: str | None = None,
        dtype: np.dtype | None = None,
    ) -> ir.Value: ...


class Calibration(Protocol):
    """The current layer's calibration inputs (`edgepipe.stages.quantize.gptq_inputs`)."""

    def for_weight(self, name: str) -> np.ndarray: ...


def quant_label(spec: QuantSpec) -> str:
    """How `ExportResult.quantized` describes a weight quantized with `spec`."""
    return f"int{spec.bits}/b{spec.block_size}/{spec.method}"


class Linears:
    """Writes the linears of one export.

    Args:
        writer: the graph.
        read: HF weight name -> float32 array.
        dtype: the activation dtype (of float weights, scales and biases by default).
        quant: which weights are quantized; None keeps every weight float.
        fused_bias: the `fused_bias` layout switch.

    Attributes:
        quantized: HF weight name -> `quant_label` of every weight quantized so far.
        calibration: the current layer's calibration inputs (gptq), or None.
    """

    def __init__(
        self,
        writer: GraphWriter,
        read: Callable[[str], np.ndarray],
        *,
        dtype: np.dtype | type,
        quant: QuantPlan | None,
        fused_bias: bool = True,
    ):
        self.writer = writer
        self.read = read
        self.dtype = np.dtype(dtype)
        self.quant = quant
        self.fused_bias = fused_bias
        self.quantized: dict[str, str] = {}
        self.calibration: Calibration | None = None

    def spec(self, hf_name: str) -> QuantSpec | None:
        """The quantization spec of weight `hf_name`; None keeps it float."""
        return None if self.quant is None else self.quant.spec_for(hf_name)

    def float_weight(self, name: str, array: np.ndarray, dtype=None) -> ir.Value:
        """Store `array` in `dtype` (default: the activation dtype) as initializer `name`."""
        return self.writer.weight(name, array.astype(dtype or self.dtype, copy=False))

    def __call__(
        self,
        name: str,
        x: ir.Value,
        hf_names: list[str],
        bias_names: list[str] | None = None,
        spec_name: str | None = None,
        dtype=None,
    ) -> ir.Value:
        """y = x @ Wᵀ (+ b), the weights packed along N when several are given.

        Args:
            name: the nodes' and initializers' prefix.
            x: the input `[..., K]`.
            hf_names: HF weight names, each `[N_i, K]`.
            bias_names: their biases, or None.
            spec_name: look the quantization spec up under this name (the tied lm_head).
            dtype: x's and y's dtype (default: the activation dtype).

        Returns:
            y `[..., sum(N_i)]`.
        """
        spec = self.spec(spec_name or hf_names[0])
        if spec_name is None and any(self.spec(n) != spec for n in hf_names[1:]):
            # Packing needs one spec; quantize each part on its own and concatenate outputs.
            parts = [
                self(
                    f"{name}_{k}", x, [n], None if not bias_names else [bias_names[k]], None, dtype
                )
                for k, n in enumerate(hf_names)
            ]
            return self.writer.op("Concat", f"{name}/concat", parts, {"axis": -1})
        w_kn = np.concatenate([self.read(n).T for n in hf_names], axis=1)
        bias = None
        if bias_names:
            b = np.concatenate([self.read(n) for n in bias_names])
            bias = self.float_weight(f"{name}.bias", b, dtype)
        if spec is None:
            weight = self.float_weight(f"{name}.weight", w_kn, dtype)
            del w_kn
            y = self.writer.op("MatMul", f"{name}/MatMul", [x, weight])
            return y if bias is None else self.writer.op("Add", f"{name}/Add", [y, bias])
        calibration = None
        if self.calibration is not None and spec_name is None:
            calibration = self.calibration.for_weight(hf_names[0])  # packed parts share one input
        qw = quantize_weight(w_kn, spec, name=spec_name or hf_names[0], calibration=calibration)
        del w_kn
        for n in [spec_name] if spec_name else hf_names:
            self.quantized[n] = quant_label(spec)
        packed = self.writer.weight(f"{name}.qweight", qw.packed)
        if not self.fused_bias:
            y = self._matmul_nbits(name, x, packed, qw, spec, None, dtype)
            return y if bias is None else self.writer.op("Add", f"{name}/Add", [y, bias])
        return self._matmul_nbits(name, x, packed, qw, spec, bias, dtype)

    def _matmul_nbits(
        self,
        name: str,
        x: ir.Value,
        packed: ir.Value,
        qw: QuantizedWeight,
        spec: QuantSpec,
        bias: ir.Value | None,
        dtype=None,
    ) -> ir.Value:
        scales = self.writer.weight(f"{name}.scales", qw.scales.astype(dtype or self.dtype))
        zp = None
        if qw.zero_points is not None:
            zp = self.writer.weight(f"{name}.zero_points", qw.zero_points)
        inputs: list[ir.Value | None] = [x, packed, scales, zp]
        if bias is not None:
            inputs += [None, bias]  # g_idx unused
        attrs = {
            "K": qw.K,
            "N": qw.N,
            "bits": qw.bits,
            "block_size": qw.block_size,
            "accuracy_level": spec.accuracy_level,
        }
        # DirectML's MatMulNBits (the unfused-bias layout) takes exactly four inputs: keep the
        # zero-point slot even when it is empty (symmetric weights).
        keep = 1 if self.fused_bias else 4
        while len(inputs) > keep and inputs[-1] is None:
            inputs.pop()
        return self.writer.op("MatMulNBits", f"{name}/MatMulNBits", inputs, attrs, domain=MS_DOMAIN)
