"""Half-quadratic quantization (HQQ): calibration-free, asymmetric, per-block zero/scale fitting.

HQQ (Badri & Shaji, 2023) treats quantization error as sparse-ish: it minimises an lp-norm
(p < 1) of `W - dequant(quant(W))` by half-quadratic splitting. An auxiliary error variable
`E` is found in closed form by generalised soft-thresholding (the lp proximal step), then the
zero point is the least-squares fit given `E`; the penalty `beta` grows each iteration.

By default the zero point is then rounded to an integer so it packs as MatMulNBits' uint8
zero points (two per byte at 4 bits, and GatherBlockQuantized accepts them too): the codes are
recomputed and the scale is refit by least squares with the integer zero fixed. With
`QuantSpec(float_zero_points=True)` the fractional zero point is kept as float32 (MatMulNBits
accepts zero points of the scales' type), as published HQQ does: lower error (on Gaussian
blocks of 32 with outliers: 7.6% below rtn's weight error vs 2.8% with integer zeros) for a
float per block instead of half a byte. Either way each block keeps whichever of (HQQ, the
min-max starting point) has the lower squared error, so HQQ never loses to its own RTN start.

Work is done on chunks of blocks so the temporaries stay in cache; one 2048x11008 int4 matrix
takes about 3-6 s on two shared cores.
"""

from __future__ import annotations

import numpy as np

from edgepipe.stages.quantize.blocks import QuantizedWeight, QuantSpec, from_codes, padded_nk

# Defaults from the HQQ paper's weight-only setting.
LP_NORM = 0.7
BETA = 10.0
KAPPA = 1.01
ITERS = 20
# Least-squares scale refits after rounding the zero point to an integer.
REFIT_ROUNDS = 3
# Blocks processed together: 16384 blocks x 32 values x 4 B = 2 MiB per temporary.
_CHUNK_VALUES = 1 << 19


def shrink_lp(x: np.ndarray, beta: float, p: float) -> np.ndarray:
    """Generalised soft-thresholding, the proximal operator of the lp-norm (p < 1).

    `sign(x) * max(|x| - |x|**(p-1) / beta, 0)`: large errors pass through, small ones vanish.
    """
    ax = np.abs(x)
    # |x|**(p-1) is infinite at 0; the clamp keeps it finite and the result is 0 there anyway.
    thresh = np.power(np.maximum(ax, 1e-12), p - 1.0) / beta
    return np.sign(x) * np.maximum(ax - thresh, 0.0)


def _fit_blocks(
    w: np.ndarray,
    qmax: int,
    iters: int,
    p: float,
    beta: float,
    kappa: float,
    integer_zero: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HQQ on rows of `w` (one block per row): integer codes, scales and zero points (integer
    valued unless `integer_zero` is False)."""
    # The range includes 0, as in onnxruntime's rtn, so a constant block is represented exactly.
    wmin = np.minimum(w.min(axis=1, keepdims=True), 0.0)
    wmax = np.maximum(w.max(axis=1, keepdims=True), 0.0)
    scale = (wmax - wmin) / qmax
    scale[scale == 0] = 1.0  # an all-zero block (the range includes 0): any scale works
    inv = 1.0 / scale
    zero = -wmin * inv
    rtn_zero = np.clip(np.round(zero), 0, qmax)

    best_zero = zero.copy()
    best_err = np.full(zero.shape, np.inf, dtype=np.float32)
    for _ in range(iters):
        q = w * inv
        q += zero
        np.clip(np.round(q, out=q), 0, qmax, out=q)
        err = w - (q - zero) * scale
        ax = np.abs(err)
        # |err|**(p-1) serves both the lp loss (|err| * it) and the shrinkage threshold, so the
        # costly power is taken once per iteration; the clamp keeps it finite at 0.
        pw = np.power(np.maximum(ax, 1e-12), p - 1.0)
        # Keep each block's best zero by the lp objective; stopping globally would let one
        # badly-behaved block end the iterations for all.
        loss = np.mean(ax * pw, axis=1, keepdims=True)
        better = loss < best_err
        best_err = np.where(better, loss, best_err)
        best_zero = np.where(better, zero, best_zero)
        # e = shrink_lp(err, beta, p), reusing pw.
        ax -= pw / beta
        np.maximum(ax, 0.0, out=ax)
        e = np.copysign(ax, err)
        zero = np.mean(q - (w - e) * inv, axis=1, keepdims=True)
        beta *= kappa

    if not integer_zero:
        # HQQ as published: min-max scale, the optimized fractional zero point.
        q = np.clip(np.round(w * inv + best_zero), 0, qmax)
        hqq_err = np.sum((w - (q - best_zero) * scale) ** 2, axis=1, keepdims=True)
        return _keep_better(w, q, scale, best_zero, hqq_err, inv, rtn_zero, qmax)

    z = np.clip(np.round(best_zero), 0, qmax)
    ls_scale = scale
    for _ in range(REFIT_ROUNDS):
        # Codes for the current grid, then the least-squares scale for those codes with the
        # integer zero fixed (a Lloyd step on the uniform grid).
        q = np.clip(np.round(w / ls_scale + z), 0, qmax)
        d = q - z
        denom = np.sum(d * d, axis=1, keepdims=True)
        num = np.sum(w * d, axis=1, keepdims=True)
        ls_scale = np.where(denom > 0, num / np.maximum(denom, 1e-30), ls_scale)
        ls_scale = np.where(ls_scale > 0, ls_scale, scale)
    q = np.clip(np.round(w / ls_scale + z), 0, qmax)
    d = q - z
    hqq_err = np.sum((w - d * ls_scale) ** 2, axis=1, keepdims=True)
    return _keep_better(w, q, ls_scale, z, hqq_err, inv, rtn_zero, qmax)


def _keep_better(w, q, scale, zero, hqq_err, inv, rtn_zero, qmax):
    """Per block, HQQ's result or the min-max rtn start, whichever has the lower squared error."""
    rtn_scale = 1.0 / inv
    q_rtn = np.clip(np.round(w * inv + rtn_zero), 0, qmax)
    rtn_err = np.sum((w - (q_rtn - rtn_zero) * rtn_scale) ** 2, axis=1, keepdims=True)
    use_hqq = hqq_err <= rtn_err
    codes = np.where(use_hqq, q, q_rtn)
    scales = np.where(use_hqq, scale, rtn_scale)
    zeros = np.where(use_hqq, zero, rtn_zero)
    return codes, scales[:, 0], zeros[:, 0]


def quantize_hqq(
    w_kn: np.ndarray,
    spec: QuantSpec,
    *,
    iters: int = ITERS,
    p: float = LP_NORM,
    beta: float = BETA,
    kappa: float = KAPPA,
) -> QuantizedWeight:
    """Quantize a `[K, N]` weight with HQQ and pack it for MatMulNBits (always asymmetric).

    Args:
        w_kn: Float weight `[K, N]`.
        spec: Bits, block size and `float_zero_points` (HQQ is asymmetric by nature).
        iters: Proximal iterations.
        p: The lp-norm exponent, < 1.
        beta: Initial half-quadratic penalty.
        kappa: Penalty growth per iteration.
    """
    k, n = w_kn.shape
    bs = spec.block_size
    qmax = (1 << spec.bits) - 1
    blocks = padded_nk(w_kn, bs).reshape(-1, bs)
    codes = np.empty(blocks.shape, dtype=np.uint8)
    scales = np.empty(blocks.shape[0], dtype=np.float32)
    zeros = np.empty(blocks.shape[0], np.float32 if spec.float_zero_points else np.uint8)
    step = max(1, _CHUNK_VALUES // bs)
    for start in range(0, blocks.shape[0], step):
        sl = slice(start, start + step)
        c, s, z = _fit_blocks(
            blocks[sl], qmax, iters, p, beta, kappa, integer_zero=not spec.float_zero_points
        )
        codes[sl], scales[sl], zeros[sl] = c, s, z
    nb = blocks.shape[0] // n
    return from_codes(
        codes.reshape(n, nb * bs), scales.reshape(n, nb), zeros.reshape(n, nb), k, spec.bits, bs
    )
