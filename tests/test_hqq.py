"""Tests for edgepipe.stages.quantize.hqq: exact MatMulNBits packing and lower error than rtn."""

from __future__ import annotations

import numpy as np
import pytest

from edgepipe.errors import InvalidInput
from edgepipe.stages.quantize.blocks import QuantSpec
from edgepipe.stages.quantize.hqq import quantize_hqq, shrink_lp
from edgepipe.stages.quantize.plan import quantize_weight
from tests.fixtures.quantize import correlated_inputs, matmul_nbits_session, output_error


@pytest.mark.parametrize("block_size", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("bits", [4, 8])
def test_hqq_packing_matches_matmul_nbits(bits, block_size):
    rng = np.random.default_rng(bits + block_size)
    k = 2 * block_size + 8
    w = rng.standard_normal((k, 12)).astype(np.float32)
    qw = quantize_weight(w, QuantSpec(bits, block_size, False, "hqq"))
    assert qw.zero_points is not None
    x = rng.standard_normal((4, k)).astype(np.float32)
    y = matmul_nbits_session(qw).run(None, {"A": x})[0]
    np.testing.assert_allclose(y, x @ qw.dequantize(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("bits", "block_size"), [(4, 32), (4, 128), (8, 64)])
def test_hqq_has_lower_output_error_than_rtn(bits, block_size):
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((256, 128)) * 0.02).astype(np.float32)
    w[rng.random(w.shape) < 0.003] *= 8  # a few outliers, as real weights have
    x = correlated_inputs(rng, 512, 256)
    rtn = quantize_weight(w, QuantSpec(bits, block_size, False, "rtn"))
    hqq = quantize_weight(w, QuantSpec(bits, block_size, False, "hqq"))
    assert output_error(x, w, hqq) < 0.99 * output_error(x, w, rtn)


def test_hqq_handles_constant_and_zero_blocks():
    w = np.zeros((64, 4), np.float32)
    w[:, 1] = 0.5
    w[:32, 2] = -3.0
    qw = quantize_hqq(w, QuantSpec(4, 32, False, "hqq"))
    np.testing.assert_allclose(qw.dequantize(), w, atol=1e-6)


def test_shrink_lp_zeroes_small_errors_and_keeps_large_ones():
    x = np.array([-5.0, -1e-3, 0.0, 1e-3, 5.0], np.float32)
    out = shrink_lp(x, beta=10.0, p=0.7)
    assert out[1] == out[2] == out[3] == 0
    assert 4.5 < out[4] < 5.0 and out[0] == -out[4]


@pytest.mark.parametrize("accuracy_level", [0, 4])
def test_hqq_float_zero_points_run_in_matmul_nbits_and_cut_error_further(accuracy_level):
    rng = np.random.default_rng(9)
    w = (rng.standard_normal((256, 64)) * 0.02).astype(np.float32)
    w[rng.random(w.shape) < 0.003] *= 8
    spec = QuantSpec(4, 32, False, "hqq", accuracy_level, float_zero_points=True)
    qw = quantize_weight(w, spec)
    assert qw.float_zero_points and qw.zero_points.shape == (64, 8)
    assert qw.zero_points.dtype == np.float32
    x = rng.standard_normal((4, 256)).astype(np.float32)
    y = matmul_nbits_session(qw, accuracy_level).run(None, {"A": x})[0]
    ref = x @ qw.dequantize()
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < (1e-5 if accuracy_level == 0 else 2e-2)
    integer = quantize_weight(w, QuantSpec(4, 32, False, "hqq"))
    err = [np.linalg.norm(q.dequantize() - w) for q in (qw, integer)]
    assert err[0] < err[1]


def test_float_zero_points_need_hqq():
    with pytest.raises(InvalidInput, match="float_zero_points"):
        QuantSpec(4, 32, False, "rtn", float_zero_points=True)
