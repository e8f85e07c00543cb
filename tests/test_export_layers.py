"""Each graph piece of the dynamic exporter (edgepipe.stages.export.layers) on its own: build a
small graph with it, run onnxruntime, check the expected ops, compare with a numpy reference."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from edgepipe.formats.onnx_writer import GraphWriter, ir_dtype, save_model, tensor_input
from edgepipe.stages.export.common import rotary_caches
from edgepipe.stages.export.fp16guard import Fp16Guard
from edgepipe.stages.export.layers.attention import (
    Heads,
    group_query_attention,
    project_qkv,
    shared_inputs,
)
from edgepipe.stages.export.layers.dtypes import LayerDtypes, cast
from edgepipe.stages.export.layers.layout import Layout
from edgepipe.stages.export.layers.linear import Linears
from edgepipe.stages.export.layers.logits import (
    fold_kept_positions,
    keep_last_positions,
    logits_to_keep_input,
)
from edgepipe.stages.export.layers.mlp import swiglu_mlp
from edgepipe.stages.export.layers.norms import rms_norm, skip_rms_norm
from edgepipe.stages.export.layers.qk_norm import head_rms_norm
from edgepipe.stages.export.layers.rotary import position_ids, rotary_embedding
from edgepipe.stages.quantize.plan import QuantPlan, QuantSpec, quantize_weight

EPS = 1e-6
RNG = np.random.default_rng(0)

Build = Callable[[GraphWriter, dict[str, ir.Value]], list[ir.Value]]


def run_piece(
    tmp_path: Path, build: Build, feeds: dict[str, np.ndarray], out_dtype=np.float32
) -> tuple[list[np.ndarray], list[str]]:
    """Build a graph from `build(writer, inputs)`, run it on `feeds`; (outputs, op types)."""
    writer = GraphWriter(tmp_path / "piece.onnx.data", "piece.onnx.data")
    inputs = {
        name: tensor_input(name, ir_dtype(array.dtype), list(array.shape))
        for name, array in feeds.items()
    }
    outputs = []
    for k, value in enumerate(build(writer, inputs)):
        out = writer.op("Identity", f"out{k}/Identity", [value], output_names=[f"out{k}"])
        out.type = ir.TensorType(ir_dtype(out_dtype))
        outputs.append(out)
    model = writer.model(list(inputs.values()), outputs)
    writer.close()
    save_model(model, tmp_path / "piece.onnx")
    session = ort.InferenceSession(str(tmp_path / "piece.onnx"), providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "piece.onnx")).graph.node]
    return session.run(None, feeds), ops


def np_rms_norm(x: np.ndarray, gamma: np.ndarray) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + EPS) * gamma


def np_rotary(x: np.ndarray, positions: np.ndarray, head_dim: int) -> np.ndarray:
    """Non-interleaved rotary on `[seq, heads, head_dim]` at `positions`."""
    cos, sin = rotary_caches(head_dim, 10000.0, 64, np.float32)
    c, s = cos[positions][:, None, :], sin[positions][:, None, :]
    a, b = np.split(x, 2, axis=-1)
    return np.concatenate([a * c - b * s, b * c + a * s], axis=-1)


# ---------------------------------------------------------------------------------------------
# layout


@pytest.mark.parametrize(
    ("layout", "separate"),
    [
        (Layout(), False),
        (Layout(qk_norm=True), True),
        (Layout(rotary_in_attention=False), True),
        (Layout(packed_qkv=False), True),
    ],
)
def test_q_k_v_come_apart_only_when_something_runs_between_projection_and_attention(
    layout, separate
):
    assert layout.separate_qkv is separate


# ---------------------------------------------------------------------------------------------
# linear


def test_float_linear_is_a_matmul_plus_bias(tmp_path):
    weights = {"w": RNG.normal(size=(24, 32)).astype(np.float32), "b": RNG.normal(size=24)}
    x = RNG.normal(size=(1, 3, 32)).astype(np.float32)

    def build(writer, inputs):
        linears = Linears(writer, weights.__getitem__, dtype=np.float32, quant=None)
        return [linears("proj", inputs["x"], ["w"], ["b"])]

    (y,), ops = run_piece(tmp_path, build, {"x": x})
    assert ops[:2] == ["MatMul", "Add"]
    np.testing.assert_allclose(y, x @ weights["w"].T + weights["b"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused_bias", [True, False])
def test_int4_linear_computes_with_the_dequantized_weight_and_its_bias(fused_bias, tmp_path):
    weights = {"w": RNG.normal(size=(24, 64)).astype(np.float32), "b": RNG.normal(size=24)}
    spec = QuantSpec(4, 32, symmetric=True)
    x = RNG.normal(size=(1, 3, 64)).astype(np.float32)

    def build(writer, inputs):
        linears = Linears(
            writer,
            weights.__getitem__,
            dtype=np.float32,
            quant=QuantPlan(default=spec),
            fused_bias=fused_bias,
        )
        y = linears("proj", inputs["x"], ["w"], ["b"])
        assert linears.quantized == {"w": "int4/b32/rtn"}
        return [y]

    (y,), ops = run_piece(tmp_path, build, {"x": x})
    # DirectML's MatMulNBits takes no bias: the unfused layout adds it after the node.
    assert ops[:2] == (["MatMulNBits", "Identity"] if fused_bias else ["MatMulNBits", "Add"])
    reference = x @ quantize_weight(weights["w"].T, spec).dequantize() + weights["b"]
    np.testing.assert_allclose(y, reference, rtol=1e-4, atol=1e-4)


def test_weights_of_different_specs_are_projected_apart_and_concatenated(tmp_path):
    weights = {n: RNG.normal(size=(16, 32)).astype(np.float32) for n in ("a", "b")}
    plan = QuantPlan(default=QuantSpec(4, 32, symmetric=True), exclude=("b",))
    x = RNG.normal(size=(1, 2, 32)).astype(np.float32)

    def build(writer, inputs):
        linears = Linears(writer, weights.__getitem__, dtype=np.float32, quant=plan)
        return [linears("ab", inputs["x"], ["a", "b"])]

    (y,), ops = run_piece(tmp_path, build, {"x": x})
    assert {"MatMulNBits", "MatMul", "Concat"} <= set(ops)
    a = quantize_weight(weights["a"].T, QuantSpec(4, 32, symmetric=True)).dequantize()
    reference = np.concatenate([x @ a, x @ weights["b"].T], axis=-1)
    np.testing.assert_allclose(y, reference, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# norms and the q/k norm


def test_skip_rms_norm_norms_the_sum_and_returns_it_as_the_residual(tmp_path):
    x, residual = (RNG.normal(size=(1, 3, 32)).astype(np.float32) for _ in range(2))
    gamma = RNG.normal(size=32).astype(np.float32)

    def build(writer, inputs):
        g = writer.weight("gamma", gamma)
        first = rms_norm(writer, "first", inputs["x"], g, EPS)
        normed, total = skip_rms_norm(writer, "skip", inputs["x"], inputs["residual"], g, EPS)
        return [first, normed, total]

    (first, normed, total), ops = run_piece(tmp_path, build, {"x": x, "residual": residual})
    assert {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"} <= set(ops)
    np.testing.assert_allclose(first, np_rms_norm(x, gamma), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(normed, np_rms_norm(x + residual, gamma), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(total, x + residual, rtol=1e-6)


def test_head_norm_norms_each_head_with_one_shared_gamma(tmp_path):
    heads, head_dim = 3, 16
    x = RNG.normal(size=(1, 4, heads * head_dim)).astype(np.float32)
    gamma = RNG.normal(size=head_dim).astype(np.float32)

    def build(writer, inputs):
        g = writer.weight("gamma", gamma)
        return [head_rms_norm(writer, "qn", inputs["x"], g, heads=heads, head_dim=16, eps=EPS)]

    (y,), ops = run_piece(tmp_path, build, {"x": x})
    assert ops[:3] == ["Reshape", "SimplifiedLayerNormalization", "Reshape"]
    reference = np_rms_norm(x.reshape(1, 4, heads, head_dim), gamma).reshape(x.shape)
    np.testing.assert_allclose(y, reference, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# rotary nodes


def test_rotary_nodes_rotate_at_the_positions_the_mask_gives(tmp_path):
    heads, head_dim, seq = 2, 16, 3
    x = RNG.normal(size=(1, seq, heads * head_dim)).astype(np.float32)
    # Two cached tokens, one left-padded slot, three new tokens: positions 2, 3, 4.
    mask = np.array([[0, 1, 1, 1, 1, 1]], np.int64)
    ids = np.zeros((1, seq), np.int64)
    cos, sin = rotary_caches(head_dim, 10000.0, 64, np.float32)

    def build(writer, inputs):
        positions = position_ids(writer, inputs["ids"], inputs["mask"])
        c, s = writer.weight("cos", cos), writer.weight("sin", sin)
        rotated = rotary_embedding(
            writer, "rot", inputs["x"], positions, c, s, heads=heads, head_dim=head_dim
        )
        return [rotated]

    (y,), ops = run_piece(tmp_path, build, {"x": x, "ids": ids, "mask": mask})
    assert "RotaryEmbedding" in ops and "CumSum" in ops
    reference = np_rotary(x.reshape(seq, heads, head_dim), np.array([2, 3, 4]), head_dim)
    np.testing.assert_allclose(y, reference.reshape(x.shape), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# attention: q/k/v projections and GroupQueryAttention, in every layout


def np_attention(x, w, b, heads: Heads) -> np.ndarray:
    """Causal GQA with rotary over a fresh sequence (no past), batch 1."""
    seq = x.shape[1]
    q, k, v = ((x[0] @ w[n].T + b[n]).reshape(seq, -1, heads.dim) for n in "qkv")
    q, k = (np_rotary(t, np.arange(seq), heads.dim) for t in (q, k))
    group = heads.q // heads.kv
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scores = np.einsum("shd,thd->hst", q, k) / np.sqrt(heads.dim)
    scores = np.where(np.tril(np.ones((seq, seq), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("hst,thd->shd", probs, v).reshape(1, seq, -1)


@pytest.mark.parametrize(
    ("layout", "expected", "absent"),
    [
        (Layout(), {"GroupQueryAttention"}, {"Split", "RotaryEmbedding"}),
        (Layout(rotary_in_attention=False), {"Split", "RotaryEmbedding"}, set()),
        (
            Layout(packed_qkv=False, rotary_in_attention=False, fused_bias=False),
            {"RotaryEmbedding"},
            {"Split"},
        ),
    ],
    ids=["packed-rotary-in-gqa", "rotary-nodes", "directml"],
)
def test_attention_matches_numpy_in_every_layout(layout, expected, absent, tmp_path):
    heads, hidden, seq = Heads(4, 2, 16), 48, 5
    sizes = {"q": heads.q * heads.dim, "k": heads.kv * heads.dim, "v": heads.kv * heads.dim}
    w = {n: RNG.normal(scale=0.2, size=(sizes[n], hidden)).astype(np.float32) for n in "qkv"}
    b = {n: RNG.normal(scale=0.2, size=sizes[n]).astype(np.float32) for n in "qkv"}
    weights = {**{f"w{n}": w[n] for n in "qkv"}, **{f"b{n}": b[n] for n in "qkv"}}
    cos, sin = rotary_caches(heads.dim, 10000.0, 64, np.float32)
    feeds = {
        "x": RNG.normal(size=(1, seq, hidden)).astype(np.float32),
        "ids": np.zeros((1, seq), np.int64),
        "mask": np.ones((1, seq), np.int64),
        "past_key": np.zeros((1, heads.kv, 0, heads.dim), np.float32),
        "past_value": np.zeros((1, heads.kv, 0, heads.dim), np.float32),
    }

    def build(writer, inputs):
        shared = shared_inputs(writer, inputs["ids"], inputs["mask"], cos, sin, layout)
        linears = Linears(writer, weights.__getitem__, dtype=np.float32, quant=None)
        qkv = project_qkv(
            writer, linears, "attn", inputs["x"], ["wq", "wk", "wv"], ["bq", "bk", "bv"],
            heads, layout,
        )  # fmt: skip
        if not layout.rotary_in_attention:
            q, k, v = qkv
            q, k = (
                rotary_embedding(writer, f"{n}_rot", t, shared.positions, shared.cos,
                                 shared.sin, heads=h, head_dim=heads.dim)
                for n, t, h in (("q", q, heads.q), ("k", k, heads.kv))
            )  # fmt: skip
            qkv = [q, k, v]
        past = (inputs["past_key"], inputs["past_value"])
        present = ("present.key", "present.value")
        return [group_query_attention(writer, "attn", qkv, past, present, shared, heads, layout)]

    (y,), ops = run_piece(tmp_path, build, feeds)
    assert expected <= set(ops) and not absent & set(ops)
    assert ops.count("MatMul") == (1 if layout.packed_qkv else 3)
    np.testing.assert_allclose(y, np_attention(feeds["x"], w, b, heads), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# mlp


def test_swiglu_mlp_matches_numpy(tmp_path):
    hidden, inter = 32, 48
    weights = {
        "gate": RNG.normal(scale=0.2, size=(inter, hidden)).astype(np.float32),
        "up": RNG.normal(scale=0.2, size=(inter, hidden)).astype(np.float32),
        "down": RNG.normal(scale=0.2, size=(hidden, inter)).astype(np.float32),
    }
    x = RNG.normal(size=(1, 3, hidden)).astype(np.float32)

    def build(writer, inputs):
        linears = Linears(writer, weights.__getitem__, dtype=np.float32, quant=None)
        return [swiglu_mlp(writer, linears, "mlp", inputs["x"], ("gate", "up", "down"), np.float32)]

    (y,), ops = run_piece(tmp_path, build, {"x": x})
    assert ops.count("MatMul") == 3 and "Sigmoid" in ops  # gate and up stay two MatMuls
    gate, up = x @ weights["gate"].T, x @ weights["up"].T
    reference = (gate / (1 + np.exp(-gate)) * up) @ weights["down"].T
    np.testing.assert_allclose(y, reference, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# fp16 guard dtypes


def test_guard_dtypes_follow_the_guard():
    plain = LayerDtypes.of(np.float16, None)
    assert plain.residual == np.float16 and plain.mlp(0) == np.float16
    guard = Fp16Guard(residual=True, fp32_attention=(1,), fp32_mlp=(0,))
    guarded = LayerDtypes.of(np.float16, guard)
    assert guarded.residual == np.float32
    assert (guarded.o_proj(0), guarded.o_proj(1)) == (np.float16, np.float32)
    assert (guarded.mlp(0), guarded.mlp(1)) == (np.float32, np.float16)


def test_cast_is_a_node_only_where_the_dtypes_differ(tmp_path):
    x = RNG.normal(size=(2, 3)).astype(np.float16)

    def build(writer, inputs):
        same = cast(writer, "same", inputs["x"], np.float16, np.float16)
        assert same is inputs["x"]
        return [cast(writer, "up", inputs["x"], np.float16, np.float32)]

    (y,), ops = run_piece(tmp_path, build, {"x": x})
    assert ops == ["Cast", "Identity"]
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, x.astype(np.float32))


# ---------------------------------------------------------------------------------------------
# logits (which positions reach the lm_head)


@pytest.fixture()
def kept_rows_graph(tmp_path) -> ort.InferenceSession:
    """x [batch, seq, 4] -> its last `logits_to_keep` rows, folded to [batch * kept, 1, 4]."""
    writer = GraphWriter(tmp_path / "keep.onnx.data", "keep.onnx.data")
    x = tensor_input("x", ir.DataType.FLOAT, ["batch", "seq", 4])
    keep = logits_to_keep_input(writer)
    kept = keep_last_positions(writer, "head", x, keep)
    rows = fold_kept_positions(writer, "head", kept, 4)
    out = writer.op("Identity", "y/Identity", [rows], output_names=["y"])
    out.type, out.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(["rows", 1, 4])
    model = writer.model([x, keep], [out])
    writer.close()
    save_model(model, tmp_path / "keep.onnx")
    return ort.InferenceSession(str(tmp_path / "keep.onnx"), providers=["CPUExecutionProvider"])


def test_logits_to_keep_is_an_overridable_initializer_holding_one(kept_rows_graph):
    assert [i.name for i in kept_rows_graph.get_inputs()] == ["x"]  # callers need not feed it
    (keep,) = kept_rows_graph.get_overridable_initializers()
    assert (keep.name, keep.type, keep.shape) == ("logits_to_keep", "tensor(int64)", [])
    x = RNG.normal(size=(2, 5, 4)).astype(np.float32)
    (y,) = kept_rows_graph.run(None, {"x": x})
    np.testing.assert_array_equal(y, x[:, -1:, :])  # [batch, 1, 4]: the last position


@pytest.mark.parametrize(("keep", "kept"), [(1, 1), (3, 3), (5, 5), (9, 5), (0, 5)])
def test_kept_rows_are_the_last_positions_batch_major(kept_rows_graph, keep, kept):
    x = RNG.normal(size=(2, 5, 4)).astype(np.float32)
    for value in (np.array(keep, np.int64), np.array([keep], np.int64)):  # scalar or [1]
        (y,) = kept_rows_graph.run(None, {"x": x, "logits_to_keep": value})
        assert y.shape == (2 * kept, 1, 4)  # 0 keeps all, more than fed keeps what was fed
        np.testing.assert_array_equal(y.reshape(2, kept, 4), x[:, 5 - kept :, :])
