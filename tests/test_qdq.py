"""QDQ quantization for static graphs: weight codes and scales, the precision mapping, the
calibration schedule, and calibrated activation QDQ on the prefill + decode graphs (CPU)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgepipe.errors import InvalidInput
from edgepipe.runtime.engines.static import StaticPipeline
from edgepipe.schema import Override, ResolvedPrecision
from edgepipe.stages.export.static import DATA_FILE, DECODE_FILE, PREFILL_FILE, build_static_decoder
from edgepipe.stages.quantize.qdq import (
    StaticQuant,
    WeightQuant,
    quantize_linear,
    quantize_rows,
    quantize_table,
    unpack_stored,
)
from edgepipe.stages.quantize.qdq_calibrate import calibrate_and_quantize, calibration_schedule

FILES = (PREFILL_FILE, DECODE_FILE)
RNG = np.random.default_rng(0)
W = (RNG.standard_normal((48, 256)) * 0.1).astype(np.float32)  # [N, K]


@pytest.mark.parametrize("bits", [8, 4])
def test_per_channel_codes_reconstruct_within_half_a_step(bits):
    q = quantize_linear(W, WeightQuant(bits))
    assert q.kind == "channel" and q.op == "Gemm"
    step = q.tensors["scale"].data  # one per output row
    assert step.shape == (48,)
    assert np.all(np.abs(q.dequantize() - W) <= step[:, None] / 2 + 1e-7)
    codes = unpack_stored(q.tensors["q"])
    assert codes.min() >= -(2 ** (bits - 1) - 1) and codes.max() <= 2 ** (bits - 1) - 1
    assert np.all(np.abs(codes).max(axis=1) == 2 ** (bits - 1) - 1), "each row uses its range"


def test_int4_codes_pack_two_per_byte_low_nibble_first():
    q = quantize_linear(W[:1, :4], WeightQuant(4))
    codes = unpack_stored(q.tensors["q"]).reshape(-1)
    packed = q.tensors["q"].data
    assert q.tensors["q"].packed and packed.shape == (2,)
    assert (packed[0] & 0x0F) == (codes[0] & 0x0F) and (packed[0] >> 4) == (codes[1] & 0x0F)


def test_lpbq_is_4_bit_block_integers_times_a_channel_scale():
    q = quantize_linear(W, WeightQuant(4, 32))
    assert q.kind == "lpbq" and q.op == "MatMul"
    block_int = q.tensors["block_int"].data
    assert block_int.shape == (256 // 32, 48) and block_int.dtype == np.uint8
    assert block_int.min() >= 1 and block_int.max() == 15
    assert q.tensors["q"].shape == (256, 48)  # [K, N] for MatMul
    # Each block's effective step is its integer times the channel scale; no weight is clipped.
    effective = block_int * q.tensors["scale"].data[None, :]
    step = np.repeat(effective, 32, axis=0).T
    assert np.all(np.abs(q.dequantize() - W) <= step / 2 + 1e-7)
    # Blocks beat one scale per channel on the same 4 bits.
    per_channel = quantize_linear(W, WeightQuant(4)).dequantize()
    assert np.abs(q.dequantize() - W).mean() < np.abs(per_channel - W).mean()


def test_int8_ignores_lpbq_blocks_the_htp_refuses():
    assert quantize_linear(W, WeightQuant(8, 32)).kind == "channel"


def test_block_size_must_divide_the_inputs():
    with pytest.raises(InvalidInput, match="block_size 64 does not divide the input size 96"):
        quantize_linear(W[:, :96], WeightQuant(4, 64))


@pytest.mark.parametrize("spec", [WeightQuant(8), WeightQuant(4, 32), None])
def test_rows_quantized_in_chunks_equal_the_whole_table(spec):
    whole = quantize_linear(W, spec)
    chunked = quantize_rows(lambda: iter([W[:20], W[20:33], W[33:]]), spec)
    assert chunked.kind == whole.kind
    for part, stored in whole.tensors.items():
        np.testing.assert_array_equal(unpack_stored(chunked.tensors[part]), unpack_stored(stored))


def test_gather_table_has_one_scale_for_all_rows():
    q = quantize_table(lambda: iter([W[:10], W[10:]]), WeightQuant(8))
    assert q.kind == "tensor" and q.tensors["scale"].data.shape == ()
    assert np.abs(q.dequantize() - W).max() <= float(q.tensors["scale"].data) / 2 + 1e-7


def _resolved(**changes) -> ResolvedPrecision:
    fields = dict(
        profile="qnn-htp", weights="int8", method="rtn", block_size=None, symmetric=True,
        accuracy_level=0, embedding="int8", lm_head="int8",
    )  # fmt: skip
    return ResolvedPrecision(**{**fields, **changes})


def test_resolved_precision_maps_to_static_weight_specs():
    quant = StaticQuant.from_resolved(
        _resolved(
            weights="int4",
            block_size=64,
            lm_head="int8",
            overrides=(Override(pattern="*.down_proj.*", weights="int8"),),
        )
    )
    assert quant.weights == WeightQuant(4, 64)
    assert quant.lm_head == WeightQuant(8)  # int8 stays per channel
    assert quant.embedding == WeightQuant(8)
    assert quant.for_weight("model.layers.0.mlp.down_proj.weight") == WeightQuant(8)
    assert quant.for_weight("model.layers.0.mlp.up_proj.weight") == WeightQuant(4, 64)


def test_static_precision_refuses_what_the_htp_cannot_run():
    with pytest.raises(InvalidInput) as info:
        StaticQuant.from_resolved(_resolved(method="gptq", weights="fp16", exclude=("*.o_proj.*",)))
    problems = "\n".join(info.value.problems)
    assert "method 'gptq'" in problems and "weights fp16; allowed: int8, int4" in problems
    assert "exclude" in problems


@pytest.mark.parametrize("tokens", [1, 7, 64, 257])
def test_calibration_schedule_covers_every_fill_of_the_chunk(tokens):
    sizes = calibration_schedule(tokens, 64)
    assert sum(sizes) == tokens and max(sizes) <= 64
    if tokens > 200:
        assert {64, 32, 1} <= set(sizes), "full, half and single-token (left-padded) calls"


@pytest.fixture(scope="module")
def qdq(make_tiny_model, tmp_path_factory):
    """(fp32 export, weight-quantized export, QDQ folder, calibration record) of a tiny qwen2."""
    model = make_tiny_model("qwen2", vocab_size=1000)
    root = tmp_path_factory.mktemp("qdq")
    ref = build_static_decoder(model, root / "fp32", chunk=8, kv_capacity=64)
    quant = StaticQuant(WeightQuant(8), WeightQuant(8), WeightQuant(8))
    export = build_static_decoder(model, root / "w8", chunk=8, kv_capacity=64, quant=quant)
    ids = [int(i) for i in np.random.default_rng(1).integers(0, 1000, 48)]
    record = calibrate_and_quantize(
        export.out_dir, root / "qdq", ids, files=FILES, num_layers=2, pad_token_id=0
    )
    return ref.out_dir, export.out_dir, root / "qdq", record


def _graph(folder, name):
    return onnx.load(str(folder / name), load_external_data=False).graph


def test_qdq_adds_16_bit_activation_pairs_and_keeps_the_weight_codes(qdq):
    _, export, out, record = qdq
    assert record["activation_type"] == "uint16" and record["calibration_tokens"] == 48
    graph = _graph(out, PREFILL_FILE)
    quantize_types = {i.data_type for i in graph.initializer if i.name.endswith("_zero_point")}
    assert onnx.TensorProto.UINT16 in quantize_types
    # Attention MatMuls multiply two activations: int16 symmetric (exact on the HTP).
    assert onnx.TensorProto.INT16 in quantize_types
    source = onnx.load(str(export / PREFILL_FILE))
    done = onnx.load(str(out / PREFILL_FILE))
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in source.graph.initializer}
    for init in done.graph.initializer:
        if init.name.endswith(".q"):
            np.testing.assert_array_equal(onnx.numpy_helper.to_array(init), weights[init.name])


def test_both_qdq_graphs_share_the_data_file_and_every_scale(qdq):
    out = qdq[2]
    prefill, decode = (_graph(out, f) for f in FILES)

    def scales(graph):
        return {
            i.name: onnx.numpy_helper.to_array(i).tolist()
            for i in graph.initializer
            if i.name.endswith("_scale")
        }

    assert scales(prefill) == scales(decode), "decode uses the ranges calibrated on prefill"
    assert sorted(p.name for p in out.glob("*.data")) == [DATA_FILE]
    external = [
        {e.key: e.value for e in i.external_data}
        for g in (prefill, decode)
        for i in g.initializer
        if i.data_location == onnx.TensorProto.EXTERNAL
    ]
    assert external and {e["location"] for e in external} == {DATA_FILE}
    stored = {(e["offset"], e["length"]) for e in external}
    assert len(stored) == len(external) // 2, "each weight stored once for both graphs"


def test_qdq_logits_on_cpu_stay_close_to_fp32(qdq):
    ref, _, out, _ = qdq

    def rows(folder):
        sessions = [
            ort.InferenceSession(str(folder / f), providers=["CPUExecutionProvider"]) for f in FILES
        ]
        pipeline = StaticPipeline(*sessions, num_layers=2, pad_token_id=0)
        cache = pipeline.new_cache()
        ids = list(range(200, 230))
        return np.stack(
            [pipeline.prefill(cache, ids[:11])] + [pipeline.step(cache, t) for t in ids[11:]]
        )

    a, b = rows(out), rows(ref)
    cosine = float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))
    assert cosine > 0.99, "w8a16 on random weights (measured 0.998)"
    assert np.mean(a.argmax(-1) == b.argmax(-1)) >= 0.5
