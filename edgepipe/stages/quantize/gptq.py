"""GPTQ: calibrated block quantization with Hessian-aware error feedback (Frantar et al., 2022).

For a linear layer with inputs X `[tokens, K]`, the output error of a weight perturbation is
governed by `H = 2 XᵀX / tokens`. GPTQ quantizes one input column (one K index) at a time and
pushes its rounding error onto the not-yet-quantized columns through the upper Cholesky factor
of `H⁻¹`, so later columns compensate for earlier rounding. Columns are processed in lazy
batches of `batch_cols` with one matrix product per batch for the rest of the matrix.

Group (block_size) scales and zero points are computed from the *updated* weights when the
first column of each block is reached, matching MatMulNBits' static blocks along K. The grid
per block is the same as rtn's: asymmetric min-max to [0, 2**bits-1] with an integer zero
point, or symmetric with the largest-magnitude value mapped to `-2**(bits-1)`.

numpy only (no torch): the Cholesky factorisations run in float64 for stability and the
column updates in float32. A 2048x11008 matrix takes tens of seconds on two cores, dominated
by the K x K inverse.
"""

from __future__ import annotations

import numpy as np

from edgepipe.errors import BuildFailed
from edgepipe.stages.quantize.blocks import QuantizedWeight, QuantSpec, from_codes, padded_nk

#: Dampening added to H's diagonal, as a fraction of its mean diagonal.
DAMP = 0.01
#: Columns per lazy batch (rounded up to whole blocks).
BATCH_COLS = 128


def hessian(calibration: np.ndarray) -> np.ndarray:
    """`2 XᵀX / tokens` in float64 for activations X `[tokens, K]`."""
    x = np.asarray(calibration, dtype=np.float64)
    return 2.0 * (x.T @ x) / max(1, x.shape[0])


def _lower_triangular_inverse(lower: np.ndarray) -> np.ndarray:
    """Inverse of a lower-triangular matrix by 2x2 block recursion (n³/3 flops in matmuls).

    numpy has no triangular inverse and a general `inv` costs six times as much, which is the
    difference between seconds and minutes for an 11008-wide down_proj.
    """
    n = lower.shape[0]
    if n <= 256:
        return np.linalg.inv(lower)
    m = n // 2
    a_inv = _lower_triangular_inverse(lower[:m, :m])
    c_inv = _lower_triangular_inverse(lower[m:, m:])
    out = np.zeros_like(lower)
    out[:m, :m] = a_inv
    out[m:, m:] = c_inv
    out[m:, :m] = -(c_inv @ (lower[m:, :m] @ a_inv))
    return out


def inverse_cholesky_upper(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor U of `(H + damp·mean(diag H)·I)⁻¹` (so `H⁻¹ = UᵀU`).

    With J the order-reversing permutation, `chol(J H J) = J U⁻¹ J`, so one Cholesky and one
    triangular inverse give U without forming H⁻¹. The damping grows on failure.
    """
    mean_diag = float(np.mean(np.diag(h))) or 1.0
    idx = np.arange(h.shape[0])
    for attempt in range(6):
        hd = h[::-1, ::-1].copy()
        hd[idx, idx] += (damp * 10**attempt) * mean_diag
        try:
            lower = np.linalg.cholesky(hd)
        except np.linalg.LinAlgError:
            continue
        return _lower_triangular_inverse(lower)[::-1, ::-1]
    raise BuildFailed(
        "gptq: the calibration Hessian is not positive definite even with heavy dampening; "
        "use more calibration text or method rtn/hqq"
    )


def _group_params(w: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scale and integer zero point per row of `w` `[N, block]`, on rtn's grid."""
    qmax = (1 << bits) - 1
    if symmetric:
        idx = np.argmax(np.abs(w), axis=1)
        peak = w[np.arange(w.shape[0]), idx]
        scale = peak / -(1 << (bits - 1))
        scale[scale == 0] = 1.0
        return scale.astype(np.float32), np.full(w.shape[0], 1 << (bits - 1), np.float32)
    wmin = np.minimum(w.min(axis=1), 0.0)
    wmax = np.maximum(w.max(axis=1), 0.0)
    scale = (wmax - wmin) / qmax
    scale[scale == 0] = 1.0
    zero = np.clip(np.round(-wmin / scale), 0, qmax)
    return scale.astype(np.float32), zero.astype(np.float32)


def quantize_gptq(
    w_kn: np.ndarray,
    spec: QuantSpec,
    calibration: np.ndarray,
    *,
    damp: float = DAMP,
    batch_cols: int = BATCH_COLS,
) -> QuantizedWeight:
    """Quantize a `[K, N]` weight with GPTQ and pack it for MatMulNBits.

    Args:
        w_kn: Float weight `[K, N]`.
        spec: Bits, block size and symmetry.
        calibration: The layer's input activations `[tokens, K]`.
        damp: Diagonal dampening as a fraction of H's mean diagonal.
        batch_cols: Columns per lazy update batch.
    """
    k, n = w_kn.shape
    bs = spec.block_size
    qmax = (1 << spec.bits) - 1
    w = padded_nk(w_kn, bs)  # [N, Kp]: one row per output, columns along K
    kp = w.shape[1]
    h = np.zeros((kp, kp))
    h[:k, :k] = hessian(calibration)
    # Inputs that never fire (and the padding) carry no information: give them a unit
    # curvature so H stays invertible; their weights are quantized as rtn would.
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    u = inverse_cholesky_upper(h, damp).astype(np.float32)

    nb = kp // bs
    codes = np.empty((n, kp), dtype=np.uint8)
    scales = np.empty((n, nb), dtype=np.float32)
    zeros = np.empty((n, nb), dtype=np.float32)
    step = max(bs, -(-batch_cols // bs) * bs)
    for i1 in range(0, kp, step):
        i2 = min(i1 + step, kp)
        w1 = w[:, i1:i2].copy()
        err1 = np.empty_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % bs == 0:
                g = col // bs
                scales[:, g], zeros[:, g] = _group_params(
                    w1[:, i : i + bs], spec.bits, spec.symmetric
                )
            g = col // bs
            q = np.clip(np.round(w1[:, i] / scales[:, g] + zeros[:, g]), 0, qmax)
            codes[:, col] = q
            e = (w1[:, i] - (q - zeros[:, g]) * scales[:, g]) / u1[i, i]
            w1[:, i + 1 :] -= np.outer(e, u1[i, i + 1 :])
            err1[:, i] = e
        if i2 < kp:
            w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return from_codes(
        codes, scales, None if spec.symmetric else zeros.astype(np.uint8), k, spec.bits, bs
    )
