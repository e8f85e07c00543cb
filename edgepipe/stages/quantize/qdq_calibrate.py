"""Activation QDQ for static NPU graphs: calibrate on text, add the activation pairs.

The weights already carry their DequantizeLinear nodes (`edgepipe.stages.quantize.qdq`, written
as they stream through the static export). This module runs the recipe's calibration text
through the prefill graph (`calibration_feeds`), lets onnxruntime's `quantize_static` with its
QNN configuration helper add 16-bit (or 8-bit) activation pairs, quantizes the decode graph with
the same ranges, and writes both graphs over one shared data file (`share_weights`).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from edgepipe.errors import InvalidInput

ACTIVATION_TYPES = {"uint16": ("QUInt16", False), "uint8": ("QUInt8", False)}


def calibration_schedule(n_tokens: int, chunk: int) -> list[int]:
    """How many tokens each calibration prefill call feeds: full chunks, a half chunk, single
    tokens, so the ranges cover every fill of the graph (left padding included) as the runtime
    uses it. Sums to `n_tokens`."""
    pattern = [chunk, max(1, chunk // 2), 1, chunk, max(1, chunk - 1), 3]
    sizes, left, i = [], n_tokens, 0
    while left > 0:
        size = min(pattern[i % len(pattern)], left)
        sizes.append(size)
        left -= size
        i += 1
    return sizes


def calibration_feeds(pipeline, ids: list[int]) -> Iterator[dict[str, np.ndarray]]:
    """Inputs of the prefill graph for the calibration text, produced as the float (weight-DQ)
    graphs run it: each call's past keys/values are what the earlier calls wrote. Lazy, so only
    one call's inputs exist at a time.

    Args:
        pipeline: an `edgepipe.runtime.engines.static.StaticPipeline` over the export's
            graphs on CPU.
        ids: calibration token ids (at most the pipeline's capacity).
    """
    cache = pipeline.new_cache()
    graph = pipeline.prefill_graph
    begin = 0
    for size in calibration_schedule(len(ids), pipeline.chunk):
        part = ids[begin : begin + size]
        feeds = pipeline.feeds(graph, cache, part)
        yield {name: np.array(value, copy=True) for name, value in feeds.items()}
        pipeline.run(graph, cache, part)
        begin += size


def _feed_reader_class():
    from onnxruntime.quantization import CalibrationDataReader

    class FeedReader(CalibrationDataReader):
        """onnxruntime's calibration reader over `calibration_feeds`, reporting progress."""

        def __init__(self, pipeline, ids: list[int], calls: int, progress):
            self._feeds = calibration_feeds(pipeline, ids)
            self.done, self.calls, self.progress = 0, calls, progress

        def get_next(self):
            feeds = next(self._feeds, None)
            if feeds is not None:
                self.done += 1
                if self.progress and self.done % 4 == 0:
                    self.progress(f"calibration call {self.done}/{self.calls}")
            return feeds

    return FeedReader


def _feed_reader(pipeline, ids: list[int], calls: int, progress):
    """A `FeedReader` (its class is made here: onnxruntime.quantization imports slowly)."""
    return _feed_reader_class()(pipeline, ids, calls, progress)


def _quantize_graph(source: Path, target: Path, reader, act_name: str, symmetric: bool, ranges):
    """`quantize_static` of one graph with the QNN QDQ config: calibrating with `reader`, or
    (reader None) reusing the ranges the first graph wrote to `ranges`."""
    from onnxruntime.quantization import QuantType, quantize_static
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    act = getattr(QuantType, act_name)
    config = get_qnn_qdq_config(
        str(source),
        reader,
        activation_type=act,
        weight_type=QuantType.QInt8,
        activation_symmetric=symmetric,
        init_overrides=_attention_overrides(str(source), act_name) or None,
    )
    quantize_static(
        str(source),
        str(target),
        config.calibration_data_reader,
        calibrate_method=config.calibrate_method,
        quant_format=config.quant_format,
        activation_type=config.activation_type,
        weight_type=config.weight_type,
        op_types_to_quantize=config.op_types_to_quantize,
        nodes_to_exclude=config.nodes_to_exclude,
        per_channel=config.per_channel,
        use_external_data_format=True,
        extra_options=config.extra_options,
        calibration_cache_path=ranges,
    )


def calibrate_and_quantize(
    export_dir,
    out_dir,
    calibration_ids: list[int],
    *,
    files: tuple[str, str],
    num_layers: int,
    pad_token_id: int,
    activation_type: str = "uint16",
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Add calibrated activation QDQ pairs to the export's prefill and decode graphs.

    The ranges come from the prefill graph running the calibration text
    (`calibration_feeds`); the decode graph computes the same tensors (same names) one token at
    a time and is quantized with the same ranges, so both graphs agree on every scale, the
    KV-cache inputs and outputs included. onnxruntime's `get_qnn_qdq_config` sets the
    QNN-specific overrides (e.g. the 16-bit Sigmoid output scale).

    Args:
        export_dir: the static export (graphs with weight DequantizeLinear nodes).
        out_dir: where the QDQ graphs go, with one shared `model.onnx.data` (created).
        calibration_ids: token ids of the recipe's calibration text.
        files: the (prefill, decode) graph file names.
        num_layers: decoder layers.
        pad_token_id: id fed in padding slots.
        activation_type: "uint16" (w8a16 / w4a16) or "uint8".
        progress: called with a short status line.

    Returns:
        A record for the manifest: activation type, calibration calls and tokens, ranges count.
    """
    import onnxruntime as ort

    from edgepipe.runtime.engines.static import StaticPipeline

    if activation_type not in ACTIVATION_TYPES:
        raise InvalidInput(
            f"qnn.activation_quantization: {activation_type!r}; allowed: {list(ACTIVATION_TYPES)}"
        )
    export_dir, out_dir = Path(export_dir), Path(out_dir)
    sessions = [
        ort.InferenceSession(str(export_dir / name), providers=["CPUExecutionProvider"])
        for name in files
    ]
    pipeline = StaticPipeline(*sessions, num_layers=num_layers, pad_token_id=pad_token_id)
    ids = [int(t) for t in calibration_ids[: pipeline.capacity]]
    if len(ids) < 2:
        raise InvalidInput("calibration: the text has fewer than 2 tokens")
    calls = len(calibration_schedule(len(ids), pipeline.chunk))

    act_name, symmetric = ACTIVATION_TYPES[activation_type]
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".qdq-") as tmp:
        tmp = Path(tmp)
        ranges = tmp / "ranges.json"
        for i, name in enumerate(files):
            reader = _feed_reader(pipeline, ids, calls, progress) if i == 0 else None
            if progress:
                progress(f"quantizing {name}" + (" (calibrating)" if i == 0 else " (same ranges)"))
            _quantize_graph(export_dir / name, tmp / name, reader, act_name, symmetric, ranges)
        count = len(json.loads(ranges.read_text()).get("data", {})) if ranges.is_file() else None
        share_weights(tmp, out_dir, files)
    return {
        "activation_type": activation_type,
        "calibration_calls": calls,
        "calibration_tokens": len(ids),
        "calibrated_tensors": count,
        "ranges_from": files[0],
    }


def _attention_overrides(model_path, act_name: str) -> dict:
    """16-bit *symmetric* types for the inputs and outputs of activation x activation MatMuls
    (the attention scores and context): the HTP multiplies two uint16 tensors at lower precision
    (0.35% of the output range off the CPU result, measured) but two int16 ones exactly."""
    import onnx
    from onnxruntime.quantization import QuantType

    if act_name != "QUInt16":
        return {}
    model = onnx.load(str(model_path), load_external_data=False)
    constants = {init.name for init in model.graph.initializer}
    produced_by_dq = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    spec = [{"quant_type": QuantType.QInt16, "symmetric": True}]
    overrides = {}
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        if any(x in constants or x in produced_by_dq for x in node.input):
            continue
        for name in (*node.input, *node.output):
            overrides[name] = [dict(spec[0])]
    return overrides


def share_weights(
    src_dir, dst_dir, files: tuple[str, ...], data_file: str = "model.onnx.data"
) -> int:
    """Save the graphs `files` of `src_dir` into `dst_dir` with one external-data file: an
    initializer with the same name and bytes in several graphs is stored once (small ones stay
    inside each graph). Returns the bytes of the shared data file."""
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    models = [ir.load(src_dir / name) for name in files]
    offsets: dict[tuple[str, bytes], tuple[int, int]] = {}
    path = dst_dir / data_file
    with open(path, "wb") as handle:
        offset = 0
        for model in models:
            for value in model.graph.initializers.values():
                tensor = value.const_value
                if tensor is None:
                    continue
                if tensor.nbytes < 1024:
                    # Inline: the source folder (and any external file it names) goes away.
                    value.const_value = ir.Tensor(tensor.numpy(), name=value.name)
                    continue
                data = tensor.tobytes()
                key = (value.name, hashlib.sha256(data).digest())
                if key not in offsets:
                    offset += -offset % 64
                    handle.seek(offset)
                    handle.write(data)
                    offsets[key] = (offset, len(data))
                    offset += len(data)
                start, length = offsets[key]
                value.const_value = ir.ExternalTensor(
                    data_file,
                    start,
                    length,
                    tensor.dtype,
                    shape=tensor.shape,
                    name=value.name,
                    base_dir=dst_dir,
                )
    for model, name in zip(models, files, strict=True):
        proto = ir.to_proto(model)
        (dst_dir / name).write_bytes(proto.SerializeToString(deterministic=True))
    return path.stat().st_size
