"""Tests for edgepipe.stages.quantize.gptq: exact packing, lower error than rtn, Hessian factor."""

from __future__ import annotations

import numpy as np
import pytest

from edgepipe.stages.quantize.blocks import QuantSpec
from edgepipe.stages.quantize.gptq import hessian, inverse_cholesky_upper
from edgepipe.stages.quantize.plan import quantize_weight
from tests.fixtures.quantize import (
    correlated_inputs,
    correlation_mix,
    matmul_nbits_session,
    output_error,
)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_packing_matches_matmul_nbits(bits, symmetric):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((72, 10)).astype(np.float32)
    x = correlated_inputs(rng, 200, 72)
    qw = quantize_weight(w, QuantSpec(bits, 16, symmetric, "gptq"), calibration=x)
    y = matmul_nbits_session(qw).run(None, {"A": x[:5]})[0]
    np.testing.assert_allclose(y, x[:5] @ qw.dequantize(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("bits", "block_size"), [(4, 32), (4, 128), (8, 64)])
def test_gptq_has_lower_output_error_than_rtn_on_held_out_tokens(bits, block_size, symmetric):
    rng = np.random.default_rng(11)
    k = 256
    w = (rng.standard_normal((k, 96)) * 0.02).astype(np.float32)
    mix = correlation_mix(rng, k)
    calib, held_out = (correlated_inputs(rng, n, k, mix) for n in (1024, 512))
    spec = QuantSpec(bits, block_size, symmetric, "rtn")
    rtn = quantize_weight(w, spec)
    gptq = quantize_weight(w, QuantSpec(bits, block_size, symmetric, "gptq"), calibration=calib)
    assert output_error(held_out, w, gptq) < 0.9 * output_error(held_out, w, rtn)


def test_gptq_survives_dead_inputs_and_rank_deficient_calibration():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((64, 8)).astype(np.float32)
    x = rng.standard_normal((10, 64)).astype(np.float32)  # 10 tokens: H has rank 10
    x[:, 5] = 0.0  # an input that never fires
    qw = quantize_weight(w, QuantSpec(4, 32, False, "gptq"), calibration=x)
    assert np.isfinite(qw.dequantize()).all()


def test_inverse_cholesky_factor_reconstructs_inverse_hessian():
    rng = np.random.default_rng(0)
    h = hessian(rng.standard_normal((700, 300)))
    u = inverse_cholesky_upper(h, damp=0.0)
    np.testing.assert_allclose(np.triu(u), u)
    np.testing.assert_allclose(u.T @ u, np.linalg.inv(h), atol=1e-12, rtol=1e-7)
