"""The streaming ONNX graph builder for Qwen2, Qwen2.5 and Qwen3 decoders (dynamic variant).

`build_decoder` reads config.json, checks every weight's name and shape from the safetensors
headers, then walks the model once: read a tensor, convert (or quantize) it, append it to
`model.onnx.data`, drop it; [vocab, hidden] tables stream in row chunks. Peak memory stays
near one layer's largest matrix, not the model (measured with benchmarks/export_memory.py:
161 MiB peak RSS for a shape-exact Qwen2.5-0.5B fp32 export vs 2.5 GiB for onnxruntime-genai's
builder, 317 MiB for Qwen3-4B). The graph follows docs/contracts.md ("Dynamic decoder graph") and
onnxruntime-genai's names, and a `genai_config.json` is written beside it. Each layer is written
by the pieces in `edgepipe.stages.export.layers` that the export's `Layout` selects; this module
holds the walk, the embedding and the lm_head.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from edgepipe.arch.families import read_config
from edgepipe.arch.spec import DecoderConfig, check_weights, expected_shapes
from edgepipe.errors import InvalidInput
from edgepipe.formats.onnx_writer import MS_DOMAIN, GraphWriter, ir_dtype, save_model, tensor_input
from edgepipe.formats.safetensors import SafetensorsModel, read_tensor
from edgepipe.stages.export import common
from edgepipe.stages.export.common import (
    DATA_FILE,
    Progress,
    Steps,
    copy_side_files,
    rotary_caches,
)
from edgepipe.stages.export.genai_config import FILE as GENAI_CONFIG
from edgepipe.stages.export.genai_config import genai_config
from edgepipe.stages.export.layers.attention import (
    Heads,
    group_query_attention,
    project_qkv,
    shared_inputs,
)
from edgepipe.stages.export.layers.dtypes import LayerDtypes, cast
from edgepipe.stages.export.layers.layout import Layout
from edgepipe.stages.export.layers.linear import Linears, quant_label
from edgepipe.stages.export.layers.logits import (
    KEPT_ROWS,
    fold_kept_positions,
    keep_last_positions,
    logits_to_keep_input,
)
from edgepipe.stages.export.layers.mlp import swiglu_mlp
from edgepipe.stages.export.layers.norms import skip_rms_norm
from edgepipe.stages.export.layers.qk_norm import branchwise_norm, head_rms_norm
from edgepipe.stages.export.layers.rotary import rotary_embedding
from edgepipe.stages.quantize.gptq_inputs import LayerCalibrator
from edgepipe.stages.quantize.plan import quantize_embedding

if TYPE_CHECKING:
    from edgepipe.stages.export.fp16guard import Fp16Guard
    from edgepipe.stages.quantize.plan import QuantPlan, QuantSpec


ACTIVATION_DTYPES = {"float32": np.float32, "float16": np.float16}
MODEL_FILE = "model.onnx"


@dataclass
class ExportResult:
    """What `build_decoder` wrote.

    Attributes:
        out_dir: the export folder.
        model_path: `model.onnx` (graph; weights are external).
        data_path: `model.onnx.data` (all weights).
        genai_config_path: `genai_config.json`.
        config: a summary of the model config (family, sizes).
        bytes_written: total bytes of model.onnx + model.onnx.data.
        activation_dtype: "float32" or "float16".
        quantized: HF weight names that were quantized, with "bits/block_size/method".
        files: every file written or copied into `out_dir`.
    """

    out_dir: Path
    model_path: Path
    data_path: Path
    genai_config_path: Path
    config: dict[str, Any]
    bytes_written: int
    activation_dtype: str
    quantized: dict[str, str] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class _QuantizedTable:
    """The quantized embedding as GatherBlockQuantized stores it; a tied lm_head reads it too."""

    data: ir.Value
    scales: ir.Value
    zero_points: ir.Value | None
    spec: QuantSpec
    bits: int
    block_size: int
    packed_shape: tuple[int, int, int]  # [vocab, n_blocks, blob]: MatMulNBits' 3-D view


class _DecoderBuilder:
    """One export: walks the model once, writing each layer with the pieces its layout picks."""

    def __init__(
        self,
        cfg: DecoderConfig,
        weights: SafetensorsModel,
        writer: GraphWriter,
        *,
        dtype: np.dtype,
        quant: QuantPlan | None,
        all_logits: bool,
        layout: Layout,
        context_length: int,
        progress: Progress | None,
        calibration_ids: np.ndarray | None = None,
        fp16_guard: Fp16Guard | None = None,
    ):
        self.cfg = cfg
        self.fam = cfg.family
        self.weights = weights
        self.writer = writer
        self.dtype = np.dtype(dtype)
        self.ir_dtype = ir_dtype(self.dtype)
        self.all_logits = all_logits
        self.layout = layout
        self.dtypes = LayerDtypes.of(self.dtype, fp16_guard)
        self.heads = Heads(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
        self.context_length = context_length
        self.steps = Steps(progress, cfg.num_hidden_layers)
        self.linears = Linears(
            writer, self._read, dtype=self.dtype, quant=quant, fused_bias=layout.fused_bias
        )
        self.quantized = self.linears.quantized
        # gptq only: the calibration tokens, and per layer the float weights they ran through.
        self.calibration_ids = calibration_ids
        self._calibrator: LayerCalibrator | None = None
        self._layer_cache: dict[str, np.ndarray] = {}

    # -- weights ---------------------------------------------------------------------------

    def _read(self, name: str) -> np.ndarray:
        if name in self._layer_cache:
            return self._layer_cache[name]
        return self.weights.read(name, np.float32)

    def _start_calibration(self) -> None:
        """Embed the calibration tokens (gptq) without loading the whole embedding table."""
        ids = np.asarray(self.calibration_ids, np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.cfg.vocab_size):
            raise InvalidInput(f"calibration ids must lie in [0, {self.cfg.vocab_size})")
        # Only the rows the calibration text uses: a small table plus remapped ids.
        unique, remapped = np.unique(ids, return_inverse=True)
        info = self.weights.info(self.fam.embed)
        rows = np.stack([read_tensor(info, (int(t), int(t) + 1))[0] for t in unique])
        self._calibrator = LayerCalibrator(self.cfg.raw, rows.astype(np.float32), remapped)

    def _calibrate_layer(self, i: int) -> None:
        """Run layer i's float forward on the calibration states; cache its weights."""
        names = [t.format(i=i) for t in self.fam.layer.values()]
        names += [t.format(i=i) for t in self.fam.bias.values()]
        names += [t.format(i=i) for t in self.fam.norms.values()]
        self._layer_cache = {n: self.weights.read(n, np.float32) for n in names}
        self.linears.calibration = self._calibrator.advance(self._layer_cache)

    # -- graph -----------------------------------------------------------------------------

    def build(self) -> ir.Model:
        """Write every node and weight; returns the model (weights stay in the data file)."""
        if self.calibration_ids is not None:
            self._start_calibration()
        cfg, writer = self.cfg, self.writer
        ids = tensor_input("input_ids", ir.DataType.INT64, ["batch_size", "sequence_length"])
        mask = tensor_input(
            "attention_mask", ir.DataType.INT64, ["batch_size", "total_sequence_length"]
        )
        pasts, presents = self._cache_values()
        cos, sin = rotary_caches(cfg.head_dim, cfg.rope_theta, self.context_length, self.dtype)
        self.shared = shared_inputs(writer, ids, mask, cos, sin, self.layout)

        hidden, table = self._embedding(ids)
        hidden = cast(writer, "embed_tokens", hidden, self.dtype, self.dtypes.residual)
        self.steps.tick("embedding")
        residual = None
        for layer in range(cfg.num_hidden_layers):
            hidden, residual = self._layer(layer, hidden, residual, pasts)
            self.steps.tick(f"layer {layer}")
        normed = self._skip_norm("final_norm", hidden, residual, self.fam.final_norm)[0]
        normed = cast(writer, "final_norm", normed, self.dtypes.residual, self.dtype)
        inputs = [ids, mask, *pasts]
        if self.all_logits:
            logits = self._lm_head(normed, table)
            logits_shape = ["batch_size", "sequence_length", cfg.vocab_size]
        else:
            keep = logits_to_keep_input(writer)
            inputs.append(keep)
            normed = keep_last_positions(writer, "lm_head", normed, keep)
            logits = self._lm_head(normed, table)
            logits = fold_kept_positions(writer, "lm_head", logits, cfg.vocab_size)
            logits_shape = [KEPT_ROWS, 1, cfg.vocab_size]
        self.steps.tick("lm_head")
        logits_out = tensor_input("logits", self.ir_dtype, logits_shape)
        writer.op("Identity", "logits/Identity", [logits], output_names=["logits"])
        # Rebind the graph outputs to the node outputs carrying their names.
        outputs = [self._named_output(logits_out)] + [self._named_output(p) for p in presents]
        return writer.model(inputs, outputs)

    def _cache_values(self) -> tuple[list[ir.Value], list[ir.Value]]:
        """The past_key_values inputs and the present outputs' templates, key then value."""
        cfg = self.cfg
        kv_shape = ["batch_size", cfg.num_key_value_heads, "past_sequence_length", cfg.head_dim]
        present_shape = [
            "batch_size",
            cfg.num_key_value_heads,
            "total_sequence_length",
            cfg.head_dim,
        ]
        pasts, presents = [], []
        for layer in range(cfg.num_hidden_layers):
            for kind in ("key", "value"):
                pasts.append(
                    tensor_input(f"past_key_values.{layer}.{kind}", self.ir_dtype, kv_shape)
                )
                presents.append(
                    tensor_input(f"present.{layer}.{kind}", self.ir_dtype, present_shape)
                )
        return pasts, presents

    def _named_output(self, template: ir.Value) -> ir.Value:
        for node in reversed(self.writer.nodes):
            for out in node.outputs:
                if out.name == template.name:
                    out.type, out.shape = template.type, template.shape
                    return out
        raise AssertionError(f"no node produces {template.name}")

    def _embedding(self, ids: ir.Value) -> tuple[ir.Value, _QuantizedTable | None]:
        name, cfg = self.fam.embed, self.cfg
        spec = self.linears.spec(name)
        if spec is None:
            shape = (cfg.vocab_size, cfg.hidden_size)
            chunks = self.weights.read_chunks(name, common.TABLE_CHUNK_ROWS, self.dtype)
            weight = self.writer.stream_weight("embed_tokens.weight", self.dtype, shape, chunks)
            self.embed_weight = weight
            return self.writer.op("Gather", "embed_tokens/Gather", [weight, ids], {"axis": 0}), None
        table = self._quantized_table(name, spec)
        attrs = {
            "bits": table.bits,
            "block_size": table.block_size,
            "gather_axis": 0,
            "quantize_axis": 1,
        }
        inputs = [table.data, ids, table.scales]
        inputs += [table.zero_points] if table.zero_points is not None else []
        out = self.writer.op(
            "GatherBlockQuantized",
            "embed_tokens/GatherBlockQuantized",
            inputs,
            attrs,
            domain=MS_DOMAIN,
        )
        return out, table

    def _quantized_table(self, name: str, spec: QuantSpec) -> _QuantizedTable:
        """Quantize and store the [vocab, hidden] table `name` chunk by chunk."""
        cfg = self.cfg
        # Rows are quantized independently (blocks run along hidden), so the table is quantized
        # chunk by chunk and never whole in memory; scales and zero points are small.
        scales_parts: list[np.ndarray] = []
        zp_parts: list[np.ndarray] = []
        layout: dict[str, Any] = {}

        def packed_chunks():
            for chunk in self.weights.read_chunks(name, common.TABLE_CHUNK_ROWS):
                qw = quantize_embedding(chunk, spec)
                layout.update(bits=qw.bits, block_size=qw.block_size, packed=qw.packed.shape[1:])
                scales_parts.append(qw.scales.astype(self.dtype))
                if qw.zero_points is not None:
                    zp_parts.append(qw.zero_points)
                yield qw.gather_data()

        blob = spec.block_size * spec.bits // 8
        n_blocks = -(-cfg.hidden_size // spec.block_size)
        data = self.writer.stream_weight(
            "embed_tokens.qweight", np.uint8, (cfg.vocab_size, n_blocks * blob), packed_chunks()
        )
        if layout["packed"] != (n_blocks, blob):
            raise AssertionError(f"unexpected embedding layout {layout}")
        self.quantized[name] = quant_label(spec)
        scales = self.writer.weight("embed_tokens.scales", np.concatenate(scales_parts))
        zp = None
        if zp_parts:
            zp = self.writer.weight("embed_tokens.zero_points", np.concatenate(zp_parts))
        return _QuantizedTable(
            data,
            scales,
            zp,
            spec,
            layout["bits"],
            layout["block_size"],
            (cfg.vocab_size, n_blocks, blob),
        )

    def _lm_head(self, x: ir.Value, table: _QuantizedTable | None) -> ir.Value:
        cfg, writer = self.cfg, self.writer
        if cfg.tie_word_embeddings and table is not None:
            # The tied lm_head reads the embedding's quantized bytes: one copy on disk, viewed
            # 3-D as MatMulNBits requires (its 8-bit prepack rejects the 2-D gather layout).
            # `QuantPlan.for_model` gave both sides the table's spec (the more precise one).
            if self.linears.spec(self.fam.lm_head) != table.spec:
                raise AssertionError("tied lm_head: pass the plan through QuantPlan.for_model")
            packed = writer.alias("lm_head.qweight", table.data, table.packed_shape)
            inputs: list[ir.Value | None] = [x, packed, table.scales, table.zero_points]
            while inputs[-1] is None:
                inputs.pop()
            attrs = {
                "K": cfg.hidden_size,
                "N": cfg.vocab_size,
                "bits": table.bits,
                "block_size": table.block_size,
                "accuracy_level": table.spec.accuracy_level,
            }
            return writer.op("MatMulNBits", "lm_head/MatMulNBits", inputs, attrs, domain=MS_DOMAIN)
        if cfg.tie_word_embeddings and self.linears.spec(self.fam.lm_head) is None:
            # Gemm with transB reads the [vocab, hidden] embedding as is: one copy, no transpose.
            return self._gemm_transposed(x, self.embed_weight)
        if cfg.tie_word_embeddings:
            # Float embedding, quantized lm_head: the quantized copy is a second, smaller one.
            return self.linears("lm_head", x, [self.fam.embed], spec_name=self.fam.lm_head)
        if self.linears.spec(self.fam.lm_head) is None:
            shape = (cfg.vocab_size, cfg.hidden_size)
            chunks = self.weights.read_chunks(self.fam.lm_head, common.TABLE_CHUNK_ROWS, self.dtype)
            weight = writer.stream_weight("lm_head.weight", self.dtype, shape, chunks)
            return self._gemm_transposed(x, weight)
        return self.linears("lm_head", x, [self.fam.lm_head])

    def _gemm_transposed(self, x: ir.Value, weight_vh: ir.Value) -> ir.Value:
        writer = self.writer
        shape = writer.op("Shape", "lm_head/x_shape", [x])
        flat_shape = np.array([-1, self.cfg.hidden_size], np.int64)
        flat = writer.op(
            "Reshape", "lm_head/flatten", [x, writer.const("lm_head/flat_shape", flat_shape)]
        )
        y = writer.op("Gemm", "lm_head/Gemm", [flat, weight_vh], {"transB": 1})
        batch_seq = writer.op(
            "Slice",
            "lm_head/batch_seq",
            [
                shape,
                writer.const("lm_head/s0", np.array([0], np.int64)),
                writer.const("lm_head/s2", np.array([2], np.int64)),
            ],
        )
        vocab = writer.const("lm_head/vocab", np.array([self.cfg.vocab_size], np.int64))
        out_shape = writer.op("Concat", "lm_head/out_shape", [batch_seq, vocab], {"axis": 0})
        return writer.op("Reshape", "lm_head/unflatten", [y, out_shape])

    def _skip_norm(
        self, name: str, x: ir.Value, residual: ir.Value | None, gamma_name: str
    ) -> tuple[ir.Value, ir.Value]:
        """RMSNorm(x + residual) in the residual dtype; returns (normed, new residual)."""
        residual_dtype = self.dtypes.residual
        gamma = self.linears.float_weight(f"{name}.weight", self._read(gamma_name), residual_dtype)
        return skip_rms_norm(self.writer, name, x, residual, gamma, self.cfg.rms_norm_eps)

    def _head_norm(self, name: str, x: ir.Value, heads: int, gamma_name: str) -> ir.Value:
        """q's or k's per-head RMSNorm in the profile's form (`Layout.branchwise_norm`)."""
        gamma = self.linears.float_weight(f"{name}.weight", self._read(gamma_name))
        eps = self.cfg.rms_norm_eps
        if self.layout.branchwise_norm:
            return branchwise_norm(self.writer, name, x, gamma, heads=heads, eps=eps)
        head_dim = self.cfg.head_dim
        return head_rms_norm(self.writer, name, x, gamma, heads=heads, head_dim=head_dim, eps=eps)

    def _layer(self, i: int, hidden, residual, pasts):
        if self._calibrator is not None:
            self._calibrate_layer(i)
        try:
            return self._layer_graph(i, hidden, residual, pasts)
        finally:
            self._layer_cache, self.linears.calibration = {}, None

    def _layer_graph(self, i: int, hidden, residual, pasts):
        """One decoder layer; the fp16 guard's dtypes decide where Casts go."""
        writer, dtypes, p = self.writer, self.dtypes, f"layers.{i}"
        names = {k: t.format(i=i) for k, t in self.fam.layer.items()}
        normed, residual = self._skip_norm(f"{p}.input_norm", hidden, residual, names["input_norm"])
        normed = cast(writer, f"{p}.input_norm", normed, dtypes.residual, self.dtype)
        attn = self._attention(i, normed, names, pasts)

        o_dtype = dtypes.o_proj(i)
        attn = cast(writer, f"{p}.attn", attn, self.dtype, o_dtype)
        attn_out = self.linears(f"{p}.attn.o_proj", attn, [names["o"]], dtype=o_dtype)
        attn_out = cast(writer, f"{p}.attn.o_proj", attn_out, o_dtype, dtypes.residual)

        normed, residual = self._skip_norm(f"{p}.post_norm", attn_out, residual, names["post_norm"])
        mlp_dtype = dtypes.mlp(i)
        normed = cast(writer, f"{p}.post_norm", normed, dtypes.residual, mlp_dtype)
        mlp_weights = (names["gate"], names["up"], names["down"])
        down = swiglu_mlp(writer, self.linears, f"{p}.mlp", normed, mlp_weights, mlp_dtype)
        return cast(writer, f"{p}.mlp.down_proj", down, mlp_dtype, dtypes.residual), residual

    def _attention(self, i: int, x: ir.Value, names: dict[str, str], pasts) -> ir.Value:
        """Layer i's attention up to (not including) o_proj, laid out per `self.layout`."""
        fam, layout, heads, p = self.fam, self.layout, self.heads, f"layers.{i}.attn"
        weights = [names["q"], names["k"], names["v"]]
        biases = [fam.bias[k].format(i=i) for k in ("q", "k", "v")] if fam.qkv_bias else None
        qkv = project_qkv(self.writer, self.linears, p, x, weights, biases, heads, layout)
        if layout.separate_qkv:
            q, k, v = qkv
            if layout.qk_norm:
                q = self._head_norm(f"{p}.q_norm", q, heads.q, fam.norms["q_norm"].format(i=i))
                k = self._head_norm(f"{p}.k_norm", k, heads.kv, fam.norms["k_norm"].format(i=i))
            if not layout.rotary_in_attention:
                q = self._rotary(f"{p}.q_rotary", q, heads.q)
                k = self._rotary(f"{p}.k_rotary", k, heads.kv)
            qkv = [q, k, v]
        past = (pasts[2 * i], pasts[2 * i + 1])
        present = (f"present.{i}.key", f"present.{i}.value")
        return group_query_attention(self.writer, p, qkv, past, present, self.shared, heads, layout)

    def _rotary(self, name: str, x: ir.Value, heads: int) -> ir.Value:
        shared = self.shared
        return rotary_embedding(
            self.writer,
            name,
            x,
            shared.positions,
            shared.cos,
            shared.sin,
            heads=heads,
            head_dim=self.cfg.head_dim,
        )


def _checked_inputs(
    model_dir: Path,
    activation_dtype: str,
    quant: QuantPlan | None,
    context_length: int | None,
    weights: SafetensorsModel | None = None,
) -> tuple[DecoderConfig, SafetensorsModel, int, QuantPlan | None]:
    """The model's config, its weights (names and shapes checked), the context length and the
    plan as this model gets it (`QuantPlan.for_model`); `weights` (e.g. a merged LoRA adapter)
    replaces `model_dir`'s safetensors."""
    if activation_dtype not in ACTIVATION_DTYPES:
        raise InvalidInput(
            f"activation_dtype: {activation_dtype!r}; allowed: {list(ACTIVATION_DTYPES)}"
        )
    cfg = read_config(model_dir)
    weights = weights if weights is not None else SafetensorsModel(model_dir)
    check_weights(cfg, weights)
    if cfg.head_dim % 16:
        # ORT's GroupQueryAttention kernels reject other head sizes at run time; say so now.
        raise InvalidInput(
            f"{model_dir / 'config.json'}: head_dim {cfg.head_dim} is not supported: "
            "GroupQueryAttention needs a multiple of 16 (every Qwen2.5/Qwen3 size is 64 or 128)"
        )
    if quant is not None:
        quant.check_patterns(expected_shapes(cfg))
        # A tied model's one table takes the more precise of embedding / lm_head.
        quant = quant.for_model(cfg.tie_word_embeddings)
    ctx = int(context_length or cfg.max_position_embeddings)
    if ctx < 1:
        raise InvalidInput(f"context_length: {ctx}; must be a positive number of tokens")
    return cfg, weights, ctx, quant


def _calibration_ids(quant: QuantPlan | None, ids: np.ndarray | None) -> np.ndarray | None:
    """The calibration tokens the export runs: None unless `quant` uses a calibrated method."""
    if quant is None or not quant.needs_calibration:
        return None
    if ids is None:
        raise InvalidInput(
            "quant: a calibrated method (gptq) needs calibration_ids (token ids of "
            "calibration text); pass them, or use method rtn or hqq"
        )
    return ids


def _write_graph(
    cfg: DecoderConfig, weights: SafetensorsModel, out_dir: Path, **options: Any
) -> tuple[_DecoderBuilder, int]:
    """Write model.onnx and model.onnx.data; returns the builder (what it quantized) and the
    bytes of both files. `options` are `_DecoderBuilder`'s keyword arguments."""
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = GraphWriter(out_dir / DATA_FILE, DATA_FILE)
    try:
        builder = _DecoderBuilder(cfg, weights, writer, **options)
        model = builder.build()
    finally:
        writer.close()
    return builder, save_model(model, out_dir / MODEL_FILE) + writer.bytes_written


def build_decoder(
    model_dir: Path | str,
    out_dir: Path | str,
    *,
    activation_dtype: str = "float32",
    quant: QuantPlan | None = None,
    all_logits: bool = False,
    rotary_in_attention: bool = True,
    context_length: int | None = None,
    progress: Progress | None = None,
    calibration_ids: np.ndarray | None = None,
    packed_qkv: bool = True,
    fused_bias: bool = True,
    branchwise_norm: bool = True,
    fp16_guard: Fp16Guard | None = None,
    weights: SafetensorsModel | None = None,
) -> ExportResult:
    """Export a Qwen2/Qwen2.5/Qwen3 model folder to an ONNX Runtime decoder, streaming.

    Args:
        model_dir: folder with config.json and safetensors weights (single or sharded).
        out_dir: export folder (created; existing files of the same names are replaced).
        activation_dtype: "float32" or "float16" (weights, inputs/outputs and KV cache).
        quant: which weights become MatMulNBits / GatherBlockQuantized; None keeps all float.
        all_logits: return logits for every position (perplexity) instead of the last one.
        rotary_in_attention, packed_qkv, fused_bias, branchwise_norm: the profile's layout
            (`BuildPlan.decoder_switches`); `Layout` documents each, the defaults are the CPU's.
        context_length: longest sequence (sizes the rotary caches and genai's max_length);
            default config.json's max_position_embeddings.
        progress: called as progress(step_name, done, total).
        calibration_ids: token ids of calibration text, 1-D; required when `quant` uses a
            calibrated method (gptq). Each layer's linears are quantized with the inputs the
            float model gives them on these tokens (see edgepipe.stages.quantize.gptq_inputs).
        fp16_guard: float16 only: which parts stay in float32 (edgepipe.stages.export.fp16guard).
        weights: read instead of `model_dir`'s safetensors (a LoRA merged: edgepipe.stages.lora).

    Returns:
        ExportResult with paths, a config summary and bytes written.

    Raises:
        InvalidInput: bad folder, config, weights or arguments (every problem listed).
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    cfg, weights, ctx, quant = _checked_inputs(
        model_dir, activation_dtype, quant, context_length, weights
    )
    family_norm = cfg.family.qk_norm
    layout = Layout(packed_qkv, rotary_in_attention, fused_bias, family_norm, branchwise_norm)
    builder, bytes_written = _write_graph(
        cfg,
        weights,
        out_dir,
        dtype=ACTIVATION_DTYPES[activation_dtype],
        quant=quant,
        all_logits=all_logits,
        layout=layout,
        context_length=ctx,
        progress=progress,
        calibration_ids=_calibration_ids(quant, calibration_ids),
        fp16_guard=fp16_guard if activation_dtype == "float16" else None,
    )
    gc_path = out_dir / GENAI_CONFIG
    gc_path.write_text(json.dumps(genai_config(cfg, context_length=ctx), indent=4) + "\n")
    files = [out_dir / MODEL_FILE, out_dir / DATA_FILE, gc_path]
    files += copy_side_files(model_dir, out_dir)
    return ExportResult(
        out_dir=out_dir,
        model_path=out_dir / MODEL_FILE,
        data_path=out_dir / DATA_FILE,
        genai_config_path=gc_path,
        config=cfg.summary(),
        bytes_written=bytes_written,
        activation_dtype=activation_dtype,
        quantized=builder.quantized,
        files=files,
    )
