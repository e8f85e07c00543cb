"""The streaming ONNX graph builder for Qwen2, Qwen2.5 and Qwen3 decoders (dynamic variant).

`build_decoder` reads config.json, checks every weight's name and shape from the safetensors
headers, then walks the model once: read a tensor, convert (or quantize) it, append it to
`model.onnx.data`, drop it; [vocab, hidden] tables stream in row chunks. Peak memory stays
near one layer's largest matrix, not the model (measured with benchmarks/export_memory.py:
161 MiB peak RSS for a shape-exact Qwen2.5-0.5B fp32 export vs 2.5 GiB for onnxruntime-genai's
builder, 317 MiB for Qwen3-4B). The graph follows docs/contracts.md ("Dynamic decoder graph") and
onnxruntime-genai's names, and a `genai_config.json` is written beside it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from edgepipe.arch.spec import DecoderConfig, check_weights, expected_shapes, read_config
from edgepipe.errors import InvalidInput
from edgepipe.formats.onnx_writer import MS_DOMAIN, GraphWriter, ir_dtype, save_model, tensor_input
from edgepipe.formats.safetensors import SafetensorsModel, read_tensor
from edgepipe.stages.export.genai_config import FILE as GENAI_CONFIG
from edgepipe.stages.export.genai_config import genai_config

if TYPE_CHECKING:
    from edgepipe.stages.export.fp16guard import Fp16Guard
    from edgepipe.stages.quantize.plan import QuantizedWeight, QuantPlan, QuantSpec

ACTIVATION_DTYPES = {"float32": np.float32, "float16": np.float16}
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
)

# gate_proj and up_proj as one MatMul + Split (True) or two MatMuls (False). Measured on a
# shape-exact Qwen2.5-0.5B, fp32, 1 ORT thread, best of 4 (shared 2-core box): prefill of 128
# tokens 923-1023 ms packed vs 952-1061 ms separate, decode 94.5-102 vs 93.3-103 ms per token:
# within noise. int4 (block 32, accuracy_level 4, 2 threads, quiet machine, 10 alternating
# rounds of 128 + 64 tokens): decode 31.5 vs 29.7 tok/s packed, prefill 187 vs 196 tok/s - a
# trade, not a win, so the two MatMuls stay (per-weight quantization overrides stay simple).
PACK_MLP = False
# Rows per chunk when streaming [vocab, hidden] tables (8192 x 2560 fp32 = 80 MiB).
TABLE_CHUNK_ROWS = 8192

Progress = Callable[[str, int, int], None]


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


def rotary_caches(
    head_dim: int, theta: float, length: int, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin caches `[length, head_dim / 2]` for non-interleaved rotary.

    Computed in float32 the way transformers does (inv_freq, then position * inv_freq), so the
    angles match the reference bit for bit before the final cast.
    """
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)
    freqs = np.outer(np.arange(length, dtype=np.float32), inv_freq).astype(np.float32)
    # cos/sin of the float32 angles evaluated in float64: float32 libm kernels differ by a few
    # ulps between numpy and torch at large angles; this is the exact value of the same angle.
    angles = freqs.astype(np.float64)
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


class _DecoderBuilder:
    """One export: holds the writer, the config and the per-dtype constants."""

    def __init__(
        self,
        cfg: DecoderConfig,
        weights: SafetensorsModel,
        writer: GraphWriter,
        *,
        dtype: np.dtype,
        quant: QuantPlan | None,
        all_logits: bool,
        rotary_in_attention: bool,
        context_length: int,
        progress: Progress | None,
        calibration_ids: np.ndarray | None = None,
        packed_qkv: bool = True,
        fused_bias: bool = True,
        fp16_guard: Fp16Guard | None = None,
    ):
        self.cfg = cfg
        self.fam = cfg.family
        self.weights = weights
        self.w = writer
        self.dtype = np.dtype(dtype)
        self.ir_dtype = ir_dtype(self.dtype)
        self.quant = quant
        self.all_logits = all_logits
        self.rotary_in_attention = rotary_in_attention
        self.context_length = context_length
        self.progress = progress
        self.pack_mlp = PACK_MLP
        self.packed_qkv = packed_qkv
        self.fused_bias = fused_bias
        self.guard = fp16_guard
        residual32 = fp16_guard is not None and fp16_guard.residual
        # The residual stream and its norms: float32 under the fp16 guard.
        self.norm_dtype = np.dtype(np.float32) if residual32 else self.dtype
        self.quantized: dict[str, str] = {}
        self._step = 0
        self._steps = cfg.num_hidden_layers + 2
        self.calibration_ids = calibration_ids
        self._calibrator = None
        self._acts = None  # the current layer's calibration activations (gptq)
        self._layer_cache: dict[str, np.ndarray] = {}

    # -- weights ---------------------------------------------------------------------------

    def _read(self, name: str) -> np.ndarray:
        if name in self._layer_cache:
            return self._layer_cache[name]
        return self.weights.read(name, np.float32)

    def _start_calibration(self) -> None:
        """Embed the calibration tokens (gptq) without loading the whole embedding table."""
        from edgepipe.stages.quantize.gptq_inputs import LayerCalibrator

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
        self._acts = self._calibrator.advance(self._layer_cache)

    def _float_weight(self, name: str, array: np.ndarray, dtype=None) -> ir.Value:
        return self.w.weight(name, array.astype(dtype or self.dtype, copy=False))

    def _spec(self, hf_name: str) -> QuantSpec | None:
        return None if self.quant is None else self.quant.spec_for(hf_name)

    def _quantized_inputs(
        self, prefix: str, qw: QuantizedWeight, dtype=None
    ) -> list[ir.Value | None]:
        scales = self.w.weight(f"{prefix}.scales", qw.scales.astype(dtype or self.dtype))
        zp = None
        if qw.zero_points is not None:
            zp = self.w.weight(f"{prefix}.zero_points", qw.zero_points)
        return [scales, zp]

    def linear(
        self,
        name: str,
        x: ir.Value,
        hf_names: list[str],
        bias_names: list[str] | None = None,
        spec_name: str | None = None,
        dtype=None,
    ) -> ir.Value:
        """y = x @ Wᵀ (+ b) for HF weights `[N, K]`, packed along N when several are given.

        `spec_name` looks the quantization spec up under another name (tied lm_head); `dtype`
        is x's and y's dtype (default: the activation dtype).
        """
        spec = self._spec(spec_name or hf_names[0])
        if spec_name is None and any(self._spec(n) != spec for n in hf_names[1:]):
            # Packing needs one spec; quantize each part on its own and concatenate outputs.
            parts = [
                self.linear(
                    f"{name}_{k}", x, [n], None if not bias_names else [bias_names[k]], None, dtype
                )
                for k, n in enumerate(hf_names)
            ]
            return self.w.op("Concat", f"{name}/concat", parts, {"axis": -1})
        w_kn = np.concatenate([self._read(n).T for n in hf_names], axis=1)
        bias = None
        if bias_names:
            b = np.concatenate([self._read(n) for n in bias_names])
            bias = self._float_weight(f"{name}.bias", b, dtype)
        if spec is None:
            weight = self._float_weight(f"{name}.weight", w_kn, dtype)
            del w_kn
            y = self.w.op("MatMul", f"{name}/MatMul", [x, weight])
            return y if bias is None else self.w.op("Add", f"{name}/Add", [y, bias])
        from edgepipe.stages.quantize.plan import quantize_weight

        calibration = None
        if self._acts is not None and spec_name is None:
            calibration = self._acts.for_weight(hf_names[0])  # packed parts share one input
        qw = quantize_weight(w_kn, spec, name=spec_name or hf_names[0], calibration=calibration)
        del w_kn
        for n in [spec_name] if spec_name else hf_names:
            self.quantized[n] = f"int{spec.bits}/b{spec.block_size}/{spec.method}"
        packed = self.w.weight(f"{name}.qweight", qw.packed)
        if not self.fused_bias:
            y = self._matmul_nbits(name, x, packed, qw, spec, None, dtype)
            return y if bias is None else self.w.op("Add", f"{name}/Add", [y, bias])
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
        scales, zp = self._quantized_inputs(name, qw, dtype)
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
        return self.w.op("MatMulNBits", f"{name}/MatMulNBits", inputs, attrs, domain=MS_DOMAIN)

    def _to(self, name: str, x: ir.Value, src: np.dtype, dst: np.dtype) -> ir.Value:
        """x cast from `src` to `dst` (the fp16 guard's edges); x itself when they agree."""
        if np.dtype(src) == np.dtype(dst):
            return x
        suffix = "to_fp32" if np.dtype(dst) == np.float32 else "to_fp16"
        return self.w.op("Cast", f"{name}/{suffix}", [x], {"to": ir_dtype(dst)})

    def _tick(self, what: str) -> None:
        self._step += 1
        if self.progress is not None:
            self.progress(what, self._step, self._steps)

    # -- graph -----------------------------------------------------------------------------

    def build(self) -> ir.Model:
        cfg, w = self.cfg, self.w
        ids = tensor_input("input_ids", ir.DataType.INT64, ["batch_size", "sequence_length"])
        mask = tensor_input(
            "attention_mask", ir.DataType.INT64, ["batch_size", "total_sequence_length"]
        )
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

        # Attention bookkeeping shared by every layer (contract: both int32, from the mask).
        mask_sum = w.op(
            "ReduceSum",
            "mask/ReduceSum",
            [mask, w.const("mask/axes", np.array([1], np.int64))],
            {"keepdims": 0},
        )
        seqlens = w.op("Sub", "mask/Sub", [mask_sum, w.const("mask/one", np.array(1, np.int64))])
        self.seqlens_k = w.op("Cast", "mask/seqlens_k", [seqlens], {"to": ir.DataType.INT32})
        mask_shape = w.op("Shape", "mask/Shape", [mask])
        total = w.op(
            "Gather",
            "mask/total_gather",
            [mask_shape, w.const("mask/idx1", np.array(1, np.int64))],
            {"axis": 0},
        )
        self.total_len = w.op(
            "Cast", "mask/total_sequence_length", [total], {"to": ir.DataType.INT32}
        )
        if not self.rotary_in_attention:
            self.position_ids = self._position_ids(ids, mask)
        cos, sin = rotary_caches(cfg.head_dim, cfg.rope_theta, self.context_length, self.dtype)
        self.cos = w.weight("rotary.cos_cache", cos)
        self.sin = w.weight("rotary.sin_cache", sin)

        hidden, embed_q = self._embedding(ids)
        hidden = self._to("embed_tokens", hidden, self.dtype, self.norm_dtype)
        self._tick("embedding")
        residual = None
        for layer in range(cfg.num_hidden_layers):
            hidden, residual = self._layer(layer, hidden, residual, pasts, presents)
            self._tick(f"layer {layer}")
        normed = self._skip_norm("final_norm", hidden, residual, self.fam.final_norm)[0]
        normed = self._to("final_norm", normed, self.norm_dtype, self.dtype)
        if not self.all_logits:
            normed = w.op(
                "Slice",
                "lm_head/last_position",
                [
                    normed,
                    w.const("lm_head/starts", np.array([-1], np.int64)),
                    w.const("lm_head/ends", np.array([np.iinfo(np.int64).max], np.int64)),
                    w.const("lm_head/axes", np.array([1], np.int64)),
                ],
            )
        logits = self._lm_head(normed, embed_q)
        self._tick("lm_head")
        out_seq = "sequence_length" if self.all_logits else 1
        logits_out = tensor_input("logits", self.ir_dtype, ["batch_size", out_seq, cfg.vocab_size])
        w.op("Identity", "logits/Identity", [logits], output_names=["logits"])
        # Rebind the graph outputs to the node outputs carrying their names.
        outputs = [self._named_output(logits_out)] + [self._named_output(p) for p in presents]
        return w.model([ids, mask, *pasts], outputs)

    def _named_output(self, template: ir.Value) -> ir.Value:
        for node in reversed(self.w.nodes):
            for out in node.outputs:
                if out.name == template.name:
                    out.type, out.shape = template.type, template.shape
                    return out
        raise AssertionError(f"no node produces {template.name}")

    def _position_ids(self, ids: ir.Value, mask: ir.Value) -> ir.Value:
        # Position of each new token = (number of attended tokens up to it) - 1, taken over the
        # last sequence_length columns of the mask; padded slots clamp to 0.
        w = self.w
        cum = w.op("CumSum", "pos/CumSum", [mask, w.const("pos/axis", np.array(1, np.int64))])
        pos = w.op("Sub", "pos/Sub", [cum, w.const("pos/one", np.array(1, np.int64))])
        pos = w.op("Max", "pos/Max", [pos, w.const("pos/zero", np.array(0, np.int64))])
        seq = w.op(
            "Gather",
            "pos/seq_len",
            [w.op("Shape", "pos/ids_shape", [ids]), w.const("pos/idx1", np.array([1], np.int64))],
            {"axis": 0},
        )
        neg = w.op("Neg", "pos/neg_seq", [seq])
        return w.op(
            "Slice",
            "pos/last",
            [
                pos,
                neg,
                w.const("pos/end", np.array([np.iinfo(np.int64).max], np.int64)),
                w.const("pos/slice_axis", np.array([1], np.int64)),
            ],
        )

    def _embedding(self, ids: ir.Value) -> tuple[ir.Value, Any]:
        name, cfg = self.fam.embed, self.cfg
        shape = (cfg.vocab_size, cfg.hidden_size)
        spec = self._spec(name)
        if spec is None:
            chunks = self.weights.read_chunks(name, TABLE_CHUNK_ROWS, self.dtype)
            weight = self.w.stream_weight("embed_tokens.weight", self.dtype, shape, chunks)
            self.embed_weight = weight
            return self.w.op("Gather", "embed_tokens/Gather", [weight, ids], {"axis": 0}), None
        from edgepipe.stages.quantize.plan import quantize_embedding

        # Rows are quantized independently (blocks run along hidden), so the table is quantized
        # chunk by chunk and never whole in memory; scales and zero points are small.
        scales_parts: list[np.ndarray] = []
        zp_parts: list[np.ndarray] = []
        layout: dict[str, Any] = {}

        def packed_chunks():
            for chunk in self.weights.read_chunks(name, TABLE_CHUNK_ROWS):
                qw = quantize_embedding(chunk, spec)
                layout.update(bits=qw.bits, block_size=qw.block_size, packed=qw.packed.shape[1:])
                scales_parts.append(qw.scales.astype(self.dtype))
                if qw.zero_points is not None:
                    zp_parts.append(qw.zero_points)
                yield qw.gather_data()

        blob = spec.block_size * spec.bits // 8
        n_blocks = -(-cfg.hidden_size // spec.block_size)
        data = self.w.stream_weight(
            "embed_tokens.qweight", np.uint8, (cfg.vocab_size, n_blocks * blob), packed_chunks()
        )
        if layout["packed"] != (n_blocks, blob):
            raise AssertionError(f"unexpected embedding layout {layout}")
        self.quantized[name] = f"int{spec.bits}/b{spec.block_size}/{spec.method}"
        scales = self.w.weight("embed_tokens.scales", np.concatenate(scales_parts))
        zp = (
            self.w.weight("embed_tokens.zero_points", np.concatenate(zp_parts))
            if zp_parts
            else None
        )
        attrs = {
            "bits": layout["bits"],
            "block_size": layout["block_size"],
            "gather_axis": 0,
            "quantize_axis": 1,
        }
        inputs = [data, ids, scales] + ([zp] if zp is not None else [])
        out = self.w.op(
            "GatherBlockQuantized",
            "embed_tokens/GatherBlockQuantized",
            inputs,
            attrs,
            domain=MS_DOMAIN,
        )
        packed_shape = (cfg.vocab_size, n_blocks, blob)
        return out, (
            cfg.hidden_size,
            cfg.vocab_size,
            layout["bits"],
            layout["block_size"],
            packed_shape,
            spec,
            data,
            scales,
            zp,
        )

    def _lm_head(self, x: ir.Value, embed_q: Any) -> ir.Value:
        cfg, w = self.cfg, self.w
        if cfg.tie_word_embeddings and embed_q is not None:
            k, n, bits, block_size, shape, spec, data, scales, zp = embed_q
            # The tied lm_head reads the embedding's quantized bytes: one copy on disk, viewed
            # 3-D as MatMulNBits requires (its 8-bit prepack rejects the 2-D gather layout).
            packed = w.alias("lm_head.qweight", data, shape)
            inputs: list[ir.Value | None] = [x, packed, scales, zp]
            while inputs[-1] is None:
                inputs.pop()
            attrs = {
                "K": k,
                "N": n,
                "bits": bits,
                "block_size": block_size,
                "accuracy_level": spec.accuracy_level,
            }
            return w.op("MatMulNBits", "lm_head/MatMulNBits", inputs, attrs, domain=MS_DOMAIN)
        if cfg.tie_word_embeddings and self._spec(self.fam.lm_head) is None:
            # Gemm with transB reads the [vocab, hidden] embedding as is: one copy, no transpose.
            return self._gemm_transposed(x, self.embed_weight)
        if cfg.tie_word_embeddings:
            # Float embedding, quantized lm_head: the quantized copy is a second, smaller one.
            return self.linear("lm_head", x, [self.fam.embed], spec_name=self.fam.lm_head)
        if self._spec(self.fam.lm_head) is None:
            shape = (cfg.vocab_size, cfg.hidden_size)
            chunks = self.weights.read_chunks(self.fam.lm_head, TABLE_CHUNK_ROWS, self.dtype)
            weight = self.w.stream_weight("lm_head.weight", self.dtype, shape, chunks)
            return self._gemm_transposed(x, weight)
        return self.linear("lm_head", x, [self.fam.lm_head])

    def _gemm_transposed(self, x: ir.Value, weight_vh: ir.Value) -> ir.Value:
        w = self.w
        shape = w.op("Shape", "lm_head/x_shape", [x])
        flat = w.op(
            "Reshape",
            "lm_head/flatten",
            [x, w.const("lm_head/flat_shape", np.array([-1, self.cfg.hidden_size], np.int64))],
        )
        y = w.op("Gemm", "lm_head/Gemm", [flat, weight_vh], {"transB": 1})
        out_shape = w.op(
            "Concat",
            "lm_head/out_shape",
            [
                w.op(
                    "Slice",
                    "lm_head/batch_seq",
                    [
                        shape,
                        w.const("lm_head/s0", np.array([0], np.int64)),
                        w.const("lm_head/s2", np.array([2], np.int64)),
                    ],
                ),
                w.const("lm_head/vocab", np.array([self.cfg.vocab_size], np.int64)),
            ],
            {"axis": 0},
        )
        return w.op("Reshape", "lm_head/unflatten", [y, out_shape])

    def _skip_norm(
        self, name: str, x: ir.Value, residual: ir.Value | None, gamma_name: str
    ) -> tuple[ir.Value, ir.Value]:
        """RMSNorm(x + residual) in the norm dtype; returns (normed, new residual)."""
        gamma = self._float_weight(f"{name}.weight", self._read(gamma_name), self.norm_dtype)
        eps = self.cfg.rms_norm_eps
        if residual is None:
            out = self.w.op(
                "SimplifiedLayerNormalization",
                f"{name}/SimplifiedLayerNorm",
                [x, gamma],
                {"epsilon": eps, "axis": -1, "stash_type": 1},
            )
            return out, x
        out_names = [f"{name}/SkipSimplifiedLayerNorm/output_{k}" for k in range(4)]
        # mean and inv_std_var stay unused: DirectML's kernel refuses the node when they are.
        out_names[1] = out_names[2] = ""
        outs = self.w.op(
            "SkipSimplifiedLayerNormalization",
            f"{name}/SkipSimplifiedLayerNorm",
            [x, residual, gamma],
            {"epsilon": eps},
            domain=MS_DOMAIN,
            output_names=out_names,
        )
        return outs[0], outs[3]

    def _head_norm(self, name: str, x: ir.Value, heads: int, gamma_name: str) -> ir.Value:
        """Qwen3's RMSNorm over each head: reshape to [..., heads, head_dim], norm, reshape back."""
        w, d = self.w, self.cfg.head_dim
        gamma = self._float_weight(f"{name}.weight", self._read(gamma_name))
        split = w.op(
            "Reshape",
            f"{name}/split_heads",
            [x, w.const(f"{name}/heads_shape", np.array([0, 0, heads, d], np.int64))],
        )
        normed = w.op(
            "SimplifiedLayerNormalization",
            f"{name}/SimplifiedLayerNorm",
            [split, gamma],
            {"epsilon": self.cfg.rms_norm_eps, "axis": -1, "stash_type": 1},
        )
        return w.op(
            "Reshape",
            f"{name}/merge_heads",
            [normed, w.const(f"{name}/merged_shape", np.array([0, 0, heads * d], np.int64))],
        )

    def _rotary(self, name: str, x: ir.Value, heads: int) -> ir.Value:
        return self.w.op(
            "RotaryEmbedding",
            f"{name}/RotaryEmbedding",
            [x, self.position_ids, self.cos, self.sin],
            {"interleaved": 0, "num_heads": heads, "rotary_embedding_dim": self.cfg.head_dim},
            domain=MS_DOMAIN,
        )

    def _layer(self, i: int, hidden, residual, pasts, presents):
        if self._calibrator is not None:
            self._calibrate_layer(i)
        try:
            return self._layer_graph(i, hidden, residual, pasts, presents)
        finally:
            self._layer_cache, self._acts = {}, None

    def _layer_graph(self, i: int, hidden, residual, pasts, presents):
        cfg, fam, w = self.cfg, self.fam, self.w
        p = f"layers.{i}"
        names = {k: t.format(i=i) for k, t in fam.layer.items()}
        normed, residual = self._skip_norm(f"{p}.input_norm", hidden, residual, names["input_norm"])
        normed = self._to(f"{p}.input_norm", normed, self.norm_dtype, self.dtype)

        qkv_names = [names["q"], names["k"], names["v"]]
        bias_names = [fam.bias[k].format(i=i) for k in ("q", "k", "v")] if fam.qkv_bias else None
        q_dim = cfg.num_attention_heads * cfg.head_dim
        kv_dim = cfg.num_key_value_heads * cfg.head_dim
        separate = fam.qk_norm or not self.rotary_in_attention or not self.packed_qkv
        if self.packed_qkv:
            qkv = self.linear(f"{p}.attn.qkv_proj", normed, qkv_names, bias_names)
        else:  # three projections and no Split (DirectML's GQA takes q, k and v apart)
            biases = bias_names or [None, None, None]
            q, k, v = (
                self.linear(f"{p}.attn.{kind}_proj", normed, [n], b and [b])
                for kind, n, b in zip("qkv", qkv_names, biases, strict=True)
            )
        if separate and self.packed_qkv:
            q, k, v = w.op(
                "Split",
                f"{p}.attn.qkv_split",
                [qkv, w.const(f"{p}.attn.qkv_sizes", np.array([q_dim, kv_dim, kv_dim], np.int64))],
                {"axis": -1},
                num_outputs=3,
            )
        if separate:
            if fam.qk_norm:
                q = self._head_norm(
                    f"{p}.attn.q_norm", q, cfg.num_attention_heads, fam.norms["q_norm"].format(i=i)
                )
                k = self._head_norm(
                    f"{p}.attn.k_norm", k, cfg.num_key_value_heads, fam.norms["k_norm"].format(i=i)
                )
            if not self.rotary_in_attention:
                q = self._rotary(f"{p}.attn.q_rotary", q, cfg.num_attention_heads)
                k = self._rotary(f"{p}.attn.k_rotary", k, cfg.num_key_value_heads)
            qkv_inputs = [q, k, v]
        else:
            qkv_inputs = [qkv, None, None]
        gqa_inputs = [
            *qkv_inputs,
            pasts[2 * i],
            pasts[2 * i + 1],
            self.seqlens_k,
            self.total_len,
        ]
        if self.rotary_in_attention:
            gqa_inputs += [self.cos, self.sin]
        attn, _, _ = w.op(
            "GroupQueryAttention",
            f"{p}.attn.GroupQueryAttention",
            gqa_inputs,
            {
                "num_heads": cfg.num_attention_heads,
                "kv_num_heads": cfg.num_key_value_heads,
                "do_rotary": int(self.rotary_in_attention),
                "rotary_interleaved": 0,
                "scale": float(cfg.head_dim**-0.5),
            },
            domain=MS_DOMAIN,
            output_names=[f"{p}.attn/output_0", f"present.{i}.key", f"present.{i}.value"],
        )
        # The fp16 guard runs o_proj and the MLP of layers it names in float32.
        guard, f32 = self.guard, np.dtype(np.float32)
        o_dtype = f32 if guard and i in guard.fp32_attention else self.dtype
        attn = self._to(f"{p}.attn", attn, self.dtype, o_dtype)
        attn_out = self.linear(f"{p}.attn.o_proj", attn, [names["o"]], dtype=o_dtype)
        attn_out = self._to(f"{p}.attn.o_proj", attn_out, o_dtype, self.norm_dtype)

        normed, residual = self._skip_norm(f"{p}.post_norm", attn_out, residual, names["post_norm"])
        mlp_dtype = f32 if guard and i in guard.fp32_mlp else self.dtype
        normed = self._to(f"{p}.post_norm", normed, self.norm_dtype, mlp_dtype)
        if self.pack_mlp:
            gate_up = self.linear(
                f"{p}.mlp.gate_up_proj", normed, [names["gate"], names["up"]], dtype=mlp_dtype
            )
            size = w.const(f"{p}.mlp.split_sizes", np.array([cfg.intermediate_size] * 2, np.int64))
            gate, up = w.op(
                "Split", f"{p}.mlp.gate_up_split", [gate_up, size], {"axis": -1}, num_outputs=2
            )
        else:
            gate = self.linear(f"{p}.mlp.gate_proj", normed, [names["gate"]], dtype=mlp_dtype)
            up = self.linear(f"{p}.mlp.up_proj", normed, [names["up"]], dtype=mlp_dtype)
        silu = w.op("Mul", f"{p}.mlp.silu", [gate, w.op("Sigmoid", f"{p}.mlp.sigmoid", [gate])])
        act = w.op("Mul", f"{p}.mlp.act", [silu, up])
        down = self.linear(f"{p}.mlp.down_proj", act, [names["down"]], dtype=mlp_dtype)
        return self._to(f"{p}.mlp.down_proj", down, mlp_dtype, self.norm_dtype), residual


def copy_side_files(model_dir: Path, out_dir: Path) -> list[Path]:
    """Copy the tokenizer files and generation_config.json of `model_dir` that exist."""
    copied = []
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        src = model_dir / name
        if src.is_file() and src.resolve() != (out_dir / name).resolve():
            shutil.copyfile(src, out_dir / name)
            copied.append(out_dir / name)
    return copied


def _needs_calibration(quant: QuantPlan) -> bool:
    from edgepipe.stages.quantize.plan import gptq_needs_calibration

    return gptq_needs_calibration(quant)


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
        rotary_in_attention: rotary inside GroupQueryAttention; False emits
            com.microsoft.RotaryEmbedding nodes before it (for EPs without GQA rotary).
        context_length: longest sequence (sizes the rotary caches and genai's max_length);
            default config.json's max_position_embeddings.
        progress: called as progress(step_name, done, total).
        calibration_ids: token ids of calibration text, 1-D; required when `quant` uses a
            calibrated method (gptq). Each layer's linears are quantized with the inputs the
            float model gives them on these tokens (see edgepipe.stages.quantize.gptq_inputs).
        packed_qkv: q, k and v as one MatMul (True) or three (False: no Split; DirectML).
        fused_bias: Qwen2's q/k/v bias as MatMulNBits' bias input (True) or an Add after a
            four-input MatMulNBits (False: DirectML's kernel takes no bias).
        fp16_guard: float16 only: which parts stay in float32 (see edgepipe.stages.export.fp16guard).
        weights: the tensors to read instead of `model_dir`'s safetensors, with the same read
            interface (a LoRA adapter merged as it streams: `edgepipe.stages.lora`).

    Returns:
        ExportResult with paths, a config summary and bytes written.

    Raises:
        InvalidInput: bad folder, config, weights or arguments (every problem listed).
    """
    if activation_dtype not in ACTIVATION_DTYPES:
        raise InvalidInput(
            f"activation_dtype: {activation_dtype!r}; allowed: {list(ACTIVATION_DTYPES)}"
        )
    model_dir, out_dir = Path(model_dir), Path(out_dir)
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
    ctx = int(context_length or cfg.max_position_embeddings)
    if ctx < 1:
        raise InvalidInput(f"context_length: {ctx}; must be a positive number of tokens")
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = GraphWriter(out_dir / DATA_FILE, DATA_FILE)
    try:
        builder = _DecoderBuilder(
            cfg,
            weights,
            writer,
            dtype=ACTIVATION_DTYPES[activation_dtype],
            quant=quant,
            all_logits=all_logits,
            rotary_in_attention=rotary_in_attention,
            context_length=ctx,
            progress=progress,
            calibration_ids=calibration_ids,
            packed_qkv=packed_qkv,
            fused_bias=fused_bias,
            fp16_guard=fp16_guard if activation_dtype == "float16" else None,
        )
        if quant is not None and _needs_calibration(quant):
            if calibration_ids is None:
                raise InvalidInput(
                    "quant: a calibrated method (gptq) needs calibration_ids (token ids of "
                    "calibration text); pass them, or use method rtn or hqq"
                )
            builder._start_calibration()
        model = builder.build()
    finally:
        writer.close()
    graph_bytes = save_model(model, out_dir / MODEL_FILE)
    gc_path = out_dir / GENAI_CONFIG
    gc = genai_config(cfg, context_length=ctx)
    gc_path.write_text(json.dumps(gc, indent=4) + "\n")
    files = [out_dir / MODEL_FILE, out_dir / DATA_FILE, gc_path]
    files += copy_side_files(model_dir, out_dir)
    return ExportResult(
        out_dir=out_dir,
        model_path=out_dir / MODEL_FILE,
        data_path=out_dir / DATA_FILE,
        genai_config_path=gc_path,
        config=cfg.summary(),
        bytes_written=graph_bytes + writer.bytes_written,
        activation_dtype=activation_dtype,
        quantized=builder.quantized,
        files=files,
    )
