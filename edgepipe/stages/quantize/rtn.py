"""Round-to-nearest block quantization with onnxruntime's native (MLAS) quantizer."""

from __future__ import annotations

import numpy as np

from edgepipe.stages.quantize.blocks import QuantizedWeight, QuantSpec


def quantize_rtn(w_kn: np.ndarray, spec: QuantSpec) -> QuantizedWeight:
    """Round-to-nearest with onnxruntime's native (MLAS) block quantizer.

    Symmetric: the value of largest magnitude in a block maps to `-2**(bits-1)` (so scales may
    be negative). Asymmetric: the block's range, widened to include 0, maps onto [0, 2**bits-1].
    """
    from onnxruntime.capi import _pybind_state as ort_c

    k, n = w_kn.shape
    bs = spec.block_size
    nb = -(-k // bs)
    w = np.zeros((nb * bs, n), dtype=np.float32)
    w[:k] = w_kn
    packed = np.zeros((n, nb, bs * spec.bits // 8), dtype=np.uint8)
    scales = np.zeros((n, nb), dtype=np.float32)
    zero_points = np.zeros((n, -(-nb * spec.bits // 8)), dtype=np.uint8)
    kernel = ort_c.quantize_matmul_4bits if spec.bits == 4 else ort_c.quantize_matmul_8bits
    # The kernel reads a row-major [K, N] float matrix and writes [N, n_blocks, blob] blocks.
    kernel(packed, w, scales, zero_points, bs, n, nb * bs, spec.symmetric)
    return QuantizedWeight(
        K=k,
        N=n,
        bits=spec.bits,
        block_size=bs,
        packed=packed,
        scales=scales,
        zero_points=None if spec.symmetric else zero_points,
    )
