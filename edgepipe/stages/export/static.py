"""The static graph builder for NPUs: standard ONNX ops, fixed shapes, prefill + decode graphs.

NPU compilers (Qualcomm's HTP through the QNN execution provider) take fixed shapes and
standard ops only, so the static variant is two graphs built in one streaming pass over the
weights: a *prefill* graph of `chunk` tokens and a 1-token *decode* graph. Both read one
external-data file (`model.onnx.data`): each weight is written once and the second graph's
initializers view the same bytes (`GraphWriter.sibling`), which is ONNX-level weight sharing.

The graph contract (docs/contracts.md, "Static decoder graphs"), batch 1, S = 1 or chunk:

* inputs `input_ids` int64 `[1, S]`, `position_ids` int64 `[1, S]`, `attention_mask` float32
  `[1, 1, S, P + S]` (1 = attend, 0 = masked; columns are the P cache slots, then the S new
  tokens), `past_key_values.{i}.key|value` float32 `[1, kv_heads, P, head_dim]` with
  P = kv_capacity for both graphs (one cache buffer feeds both).
* outputs `logits` `[1, 1, vocab]` (the chunk's last slot: the runtime left-pads short chunks)
  and `present.{i}.key|value` `[1, kv_heads, S, head_dim]`: only the new tokens' keys (after
  rotary) and values, which the runtime copies into its cache. No scatter or in-place update
  op is needed in the graph, and past and present never alias.

Why this shape: the mask arrives as data, so chunking, left padding and cache reuse are the
runtime's business and one graph serves every prompt length; the 0/1 mask becomes the additive
`(mask - 1) * MASK_PENALTY` inside the graph, so its quantization range is fixed at build time
([0, 1] in, [-penalty, 0] out) instead of depending on whatever value a caller passes. GQA is
computed without repeating KV: q is laid out `[kv_heads, group * S, head_dim]` against keys
`[kv_heads, P + S, head_dim]`, and the mask is tiled `group` times. Rotary reads cos/sin rows
from precomputed `[kv_capacity, head_dim / 2]` tables by position; RMSNorm is
`x * 1 / sqrt(mean(x * x) + eps) * gamma` from ReduceMean, Sqrt and Div.

Weights are quantized as they stream (`edgepipe.stages.quantize.qdq`): `DequantizeLinear` nodes
over int8/int4 initializers (per-channel, or low-power block quantization for int4), so
calibration sees the weights the device computes with, and the activation QDQ stage only adds
activation pairs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from edgepipe.arch.families import read_config
from edgepipe.arch.spec import DecoderConfig, check_weights, expected_shapes
from edgepipe.errors import InvalidInput
from edgepipe.formats.onnx_writer import GraphWriter, save_model, tensor_input
from edgepipe.formats.safetensors import SafetensorsModel
from edgepipe.stages.export import common
from edgepipe.stages.export.common import (
    DATA_FILE,
    Progress,
    Steps,
    copy_side_files,
    rotary_caches,
)
from edgepipe.stages.export.genai_config import FILE as GENAI_CONFIG
from edgepipe.stages.export.genai_config import static_genai_config
from edgepipe.stages.quantize.qdq import StaticQuant, quantize_linear, quantize_rows, quantize_table

PREFILL_FILE = "prefill.onnx"
DECODE_FILE = "decode.onnx"
# The additive mask is (mask - 1) * MASK_PENALTY: masked scores drop by this many logits. Big
# enough that a masked position's softmax weight is below 1e-40 even when its raw score beats
# the best attended one by 60, small enough that the 16-bit quantized score range stays fine
# (a 200-logit range gives 0.003-logit steps).
MASK_PENALTY = 100.0
OPSET = 21  # QuantizeLinear/DequantizeLinear with 16-bit, int4 and block quantization


@dataclass
class StaticExportResult:
    """What `build_static_decoder` wrote.

    Attributes:
        out_dir: the export folder.
        prefill_path, decode_path: the two graphs.
        data_path: the shared external-data file.
        chunk, kv_capacity: the fixed shapes.
        config: a summary of the model config.
        bytes_written: graphs + shared data.
        quantized: HF weight names that were quantized, with "int8/pc" or "int4/b64".
        files: every file written or copied.
    """

    out_dir: Path
    prefill_path: Path
    decode_path: Path
    data_path: Path
    chunk: int
    kv_capacity: int
    config: dict[str, Any]
    bytes_written: int
    quantized: dict[str, str] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)


class _Graph:
    """One of the two graphs: its writer, its fixed sequence length and its name."""

    def __init__(self, writer: GraphWriter, seq: int, tag: str):
        self.writer, self.seq, self.tag = writer, seq, tag


class _StaticBuilder:
    """One export: the same decoder emitted into the prefill and the decode graph."""

    def __init__(
        self,
        cfg: DecoderConfig,
        weights: SafetensorsModel,
        writer: GraphWriter,
        *,
        chunk: int,
        kv_capacity: int,
        quant: StaticQuant | None,
        progress: Progress | None,
    ):
        self.cfg, self.fam, self.weights = cfg, cfg.family, weights
        self.chunk, self.capacity = chunk, kv_capacity
        self.quant = quant
        self.graphs = [
            _Graph(writer, chunk, "prefill"),
            _Graph(GraphWriter.sibling(writer), 1, "decode"),
        ]
        self.quantized: dict[str, str] = {}
        self.steps = Steps(progress, cfg.num_hidden_layers)

    # -- weights: stored once, an initializer in each graph ---------------------------------

    def _share(self, name: str, first: ir.Value) -> list[ir.Value]:
        shape = list(first.shape.numpy())
        return [first] + [g.writer.alias(name, first, shape) for g in self.graphs[1:]]

    def _float(self, name: str, array: np.ndarray) -> list[ir.Value]:
        return self._share(name, self.graphs[0].writer.weight(name, array.astype(np.float32)))

    def _stored(self, name: str, stored) -> list[ir.Value]:
        """Write one `qdq.Stored` tensor (plain numpy or packed int4)."""
        writer = self.graphs[0].writer
        if stored.packed:
            first = writer.packed_weight(name, stored.data, stored.ir_dtype, stored.shape)
        else:
            first = writer.weight(name, stored.data)
        return self._share(name, first)

    def _dequantized(self, prefix: str, q) -> list[ir.Value]:
        """DequantizeLinear nodes (in each graph) over a `qdq.QuantizedTensor`."""
        per_graph: list[list[ir.Value]] = [[] for _ in self.graphs]
        for part, stored in q.tensors.items():
            for values, value in zip(
                per_graph, self._stored(f"{prefix}.{part}", stored), strict=True
            ):
                values.append(value)
        outs = []
        for g, values in zip(self.graphs, per_graph, strict=True):
            by_part = dict(zip(q.tensors, values, strict=True))
            outs.append(q.emit(g.writer, prefix, by_part))
        return outs

    def _apply(self, name: str, q, xs: list[ir.Value], bias: np.ndarray | None) -> list[ir.Value]:
        """y = x Wᵀ (+ b) in each graph, with the op the weight's layout needs (`q.op`)."""
        weights = self._dequantized(name, q)
        biases = None if bias is None else self._float(f"{name}.bias", bias)
        outs = []
        for i, (g, x, weight) in enumerate(zip(self.graphs, xs, weights, strict=True)):
            if q.op == "Gemm":
                inputs = [x, weight] + ([biases[i]] if biases else [])
                outs.append(g.writer.op("Gemm", f"{name}/Gemm", inputs, {"transB": 1}))
                continue
            y = g.writer.op("MatMul", f"{name}/MatMul", [x, weight])
            outs.append(y if biases is None else g.writer.op("Add", f"{name}/Add", [y, biases[i]]))
        return outs

    # -- graph pieces (each call adds the op to every graph) ----------------------------------

    def _const(self, g: _Graph, name: str, array) -> ir.Value:
        return g.writer.const(name, np.asarray(array))

    def linear(self, name: str, xs: list[ir.Value], hf_names: list[str], bias: list[str] | None):
        """A linear over `[S, K]` hidden states from HF weights `[N, K]` (joined along N)."""
        w_nk = np.concatenate([self.weights.read(n, np.float32) for n in hf_names], axis=0)
        spec = None if self.quant is None else self.quant.for_weight(hf_names[0])
        q = quantize_linear(w_nk, spec)
        del w_nk
        if spec is not None:
            for n in hf_names:
                self.quantized[n] = q.label
        b = np.concatenate([self.weights.read(n) for n in bias]) if bias else None
        return self._apply(name, q, xs, b)

    def rms_norm(self, name: str, xs: list[ir.Value], gamma_name: str) -> list[ir.Value]:
        gammas = self._float(f"{name}.weight", self.weights.read(gamma_name))
        outs = []
        for g, x, gamma in zip(self.graphs, xs, gammas, strict=True):
            writer = g.writer
            square = writer.op("Mul", f"{name}/square", [x, x])
            mean = writer.op(
                "ReduceMean",
                f"{name}/mean",
                [square, self._const(g, f"{name}/axes", np.array([-1], np.int64))],
                {"keepdims": 1},
            )
            eps = self._const(g, f"{name}/eps", np.array(self.cfg.rms_norm_eps, np.float32))
            root = writer.op(
                "Sqrt", f"{name}/sqrt", [writer.op("Add", f"{name}/add_eps", [mean, eps])]
            )
            one = self._const(g, f"{name}/one", np.array(1.0, np.float32))
            inv = writer.op("Div", f"{name}/inv_rms", [one, root])
            normed = writer.op("Mul", f"{name}/normalize", [x, inv])
            outs.append(writer.op("Mul", f"{name}/scale", [normed, gamma]))
        return outs

    def _reshape(self, g: _Graph, name: str, x: ir.Value, shape) -> ir.Value:
        target = self._const(g, f"{name}/shape", np.array(shape, np.int64))
        return g.writer.op("Reshape", name, [x, target])

    def _rotary(self, g: _Graph, name: str, x: ir.Value, cos: ir.Value, sin: ir.Value):
        """Non-interleaved rotary on `[S, heads, head_dim]`: (a, b) -> (a c - b s, b c + a s)."""
        writer, half = g.writer, self.cfg.head_dim // 2
        sizes = self._const(g, f"{name}/halves", np.array([half, half], np.int64))
        a, b = writer.op("Split", f"{name}/split", [x, sizes], {"axis": -1}, num_outputs=2)
        first = writer.op(
            "Sub",
            f"{name}/first",
            [
                writer.op("Mul", f"{name}/a_cos", [a, cos]),
                writer.op("Mul", f"{name}/b_sin", [b, sin]),
            ],
        )
        second = writer.op(
            "Add",
            f"{name}/second",
            [
                writer.op("Mul", f"{name}/b_cos", [b, cos]),
                writer.op("Mul", f"{name}/a_sin", [a, sin]),
            ],
        )
        return writer.op("Concat", f"{name}/concat", [first, second], {"axis": -1})

    # -- the decoder ---------------------------------------------------------------------------

    def build(self) -> list[ir.Model]:
        cfg = self.cfg
        kvh, d = cfg.num_key_value_heads, cfg.head_dim
        inputs: list[list[ir.Value]] = []
        self.pasts: list[list[ir.Value]] = []
        self.presents: list[list[ir.Value]] = []
        self.cos, self.sin, self.masks = [], [], []
        self.ids = []
        for g in self.graphs:
            ids = tensor_input("input_ids", ir.DataType.INT64, [1, g.seq])
            pos = tensor_input("position_ids", ir.DataType.INT64, [1, g.seq])
            mask = tensor_input(
                "attention_mask", ir.DataType.FLOAT, [1, 1, g.seq, self.capacity + g.seq]
            )
            pasts = [
                tensor_input(
                    f"past_key_values.{i}.{kind}", ir.DataType.FLOAT, [1, kvh, self.capacity, d]
                )
                for i in range(cfg.num_hidden_layers)
                for kind in ("key", "value")
            ]
            inputs.append([ids, pos, mask, *pasts])
            self.pasts.append(pasts)
            self.presents.append([])
            self.ids.append(ids)
        cos, sin = rotary_caches(d, cfg.rope_theta, self.capacity, np.float32)
        cos_tables, sin_tables = self._float("rotary.cos", cos), self._float("rotary.sin", sin)
        for g, graph_inputs, cos_t, sin_t in zip(
            self.graphs, inputs, cos_tables, sin_tables, strict=True
        ):
            self._attention_inputs(g, graph_inputs[1], graph_inputs[2], cos_t, sin_t)

        hidden = self._embedding()
        self.steps.tick("embedding")
        for layer in range(cfg.num_hidden_layers):
            hidden = self._layer(layer, hidden)
            self.steps.tick(f"layer {layer}")
        last = [
            g.writer.op(
                "Slice",
                "final/last_slot",
                [
                    h,
                    self._const(g, "final/start", np.array([g.seq - 1], np.int64)),
                    self._const(g, "final/end", np.array([g.seq], np.int64)),
                    self._const(g, "final/axis", np.array([0], np.int64)),
                ],
            )
            for g, h in zip(self.graphs, hidden, strict=True)
        ]
        normed = self.rms_norm("final_norm", last, self.fam.final_norm)
        logits = self._lm_head(normed)
        self.steps.tick("lm_head")
        models = []
        for g, graph_inputs, lg, presents in zip(
            self.graphs, inputs, logits, self.presents, strict=True
        ):
            lg = self._reshape(g, "logits/batch", lg, [1, 1, cfg.vocab_size])
            out = self._graph_output(g.writer, lg, "logits", [1, 1, cfg.vocab_size])
            models.append(
                g.writer.model(
                    graph_inputs, [out, *presents], opset=OPSET, contrib_ops=False, name=g.tag
                )
            )
        return models

    def _attention_inputs(self, g: _Graph, pos, mask, cos_table, sin_table) -> None:
        """Per-graph tensors every layer shares: rotary rows of the chunk and the additive mask."""
        writer, half, group = (
            g.writer,
            self.cfg.head_dim // 2,
            self.cfg.num_attention_heads // self.cfg.num_key_value_heads,
        )
        for table, out in ((cos_table, self.cos), (sin_table, self.sin)):
            name = table.name.split(".")[-1]
            rows = writer.op("Gather", f"rotary/{name}_rows", [table, pos], {"axis": 0})
            out.append(self._reshape(g, f"rotary/{name}_heads", rows, [g.seq, 1, half]))
        one = self._const(g, "mask/one", np.array(1.0, np.float32))
        penalty = self._const(g, "mask/penalty", np.array(MASK_PENALTY, np.float32))
        additive = writer.op(
            "Mul", "mask/additive", [writer.op("Sub", "mask/minus_one", [mask, one]), penalty]
        )
        rows = self._reshape(g, "mask/rows", additive, [1, g.seq, self.capacity + g.seq])
        repeats = self._const(g, "mask/repeats", np.array([1, group, 1], np.int64))
        self.masks.append(writer.op("Tile", "mask/per_group", [rows, repeats]))

    def _embedding(self) -> list[ir.Value]:
        name, cfg = self.fam.embed, self.cfg
        spec = None if self.quant is None else self.quant.embedding
        if spec is None:
            chunks = self.weights.read_chunks(name, common.TABLE_CHUNK_ROWS, np.float32)
            shape = (cfg.vocab_size, cfg.hidden_size)
            first = self.graphs[0].writer.stream_weight(
                "embed_tokens.weight", np.float32, shape, chunks
            )
            tables = self._share("embed_tokens.weight", first)
        else:
            q = quantize_table(
                lambda: self.weights.read_chunks(name, common.TABLE_CHUNK_ROWS), spec
            )
            self.quantized[name] = q.label
            tables = self._dequantized("embed_tokens", q)
        # Batch 1: hidden states are [S, hidden] from here on (Gemm takes 2-D inputs).
        return [
            self._reshape(
                g,
                "embed_tokens/rows",
                g.writer.op("Gather", "embed_tokens/Gather", [table, ids], {"axis": 0}),
                [g.seq, self.cfg.hidden_size],
            )
            for g, table, ids in zip(self.graphs, tables, self.ids, strict=True)
        ]

    def _lm_head(self, xs: list[ir.Value]) -> list[ir.Value]:
        cfg, fam = self.cfg, self.fam
        source = fam.embed if cfg.tie_word_embeddings else fam.lm_head
        spec = None if self.quant is None else self.quant.lm_head
        # The [vocab, hidden] table is the weight itself (vocab rows are the output channels):
        # quantized one row chunk at a time; a tied model stores a second copy here, because the
        # Gather above needs one scale for the whole table and the lm_head wants one per row.
        q = quantize_rows(lambda: self.weights.read_chunks(source, common.TABLE_CHUNK_ROWS), spec)
        if spec is not None:
            self.quantized[fam.lm_head] = q.label
        return self._apply("lm_head", q, xs, None)

    def _layer(self, i: int, hidden: list[ir.Value]) -> list[ir.Value]:
        cfg, fam = self.cfg, self.fam
        p = f"layers.{i}"
        names = {k: t.format(i=i) for k, t in fam.layer.items()}
        normed = self.rms_norm(f"{p}.input_norm", hidden, names["input_norm"])
        bias = {k: fam.bias[k].format(i=i) for k in ("q", "k", "v")} if fam.qkv_bias else {}
        q = self.linear(f"{p}.attn.q_proj", normed, [names["q"]], [bias["q"]] if bias else None)
        k = self.linear(f"{p}.attn.k_proj", normed, [names["k"]], [bias["k"]] if bias else None)
        v = self.linear(f"{p}.attn.v_proj", normed, [names["v"]], [bias["v"]] if bias else None)
        heads, kvh, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q = [
            self._reshape(g, f"{p}.attn.q_heads", x, [g.seq, heads, d])
            for g, x in zip(self.graphs, q, strict=True)
        ]
        k = [
            self._reshape(g, f"{p}.attn.k_heads", x, [g.seq, kvh, d])
            for g, x in zip(self.graphs, k, strict=True)
        ]
        v = [
            self._reshape(g, f"{p}.attn.v_heads", x, [g.seq, kvh, d])
            for g, x in zip(self.graphs, v, strict=True)
        ]
        if fam.qk_norm:
            q = self.rms_norm(f"{p}.attn.q_norm", q, fam.norms["q_norm"].format(i=i))
            k = self.rms_norm(f"{p}.attn.k_norm", k, fam.norms["k_norm"].format(i=i))
        attn = [
            self._attention(g, i, *args)
            for g, *args in zip(
                self.graphs,
                q,
                k,
                v,
                self.cos,
                self.sin,
                self.masks,
                self.pasts,
                self.presents,
                strict=True,
            )
        ]
        out = self.linear(f"{p}.attn.o_proj", attn, [names["o"]], None)
        hidden = [
            g.writer.op("Add", f"{p}.attn_residual", [h, o])
            for g, h, o in zip(self.graphs, hidden, out, strict=True)
        ]
        normed = self.rms_norm(f"{p}.post_norm", hidden, names["post_norm"])
        gate = self.linear(f"{p}.mlp.gate_proj", normed, [names["gate"]], None)
        up = self.linear(f"{p}.mlp.up_proj", normed, [names["up"]], None)
        act = []
        for g, gt, u in zip(self.graphs, gate, up, strict=True):
            silu = g.writer.op(
                "Mul", f"{p}.mlp.silu", [gt, g.writer.op("Sigmoid", f"{p}.mlp.sigmoid", [gt])]
            )
            act.append(g.writer.op("Mul", f"{p}.mlp.act", [silu, u]))
        down = self.linear(f"{p}.mlp.down_proj", act, [names["down"]], None)
        return [
            g.writer.op("Add", f"{p}.mlp_residual", [h, o])
            for g, h, o in zip(self.graphs, hidden, down, strict=True)
        ]

    def _attention(self, g: _Graph, i, q, k, v, cos, sin, mask, pasts, presents) -> ir.Value:
        cfg, writer, p = self.cfg, g.writer, f"layers.{i}.attn"
        heads, kvh, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        group, s, cap = heads // kvh, g.seq, self.capacity
        q = self._rotary(g, f"{p}.q_rotary", q, cos, sin)
        k = self._rotary(g, f"{p}.k_rotary", k, cos, sin)
        scale = self._const(g, f"{p}.scale", np.array(d**-0.5, np.float32))
        q = writer.op("Mul", f"{p}.q_scaled", [q, scale])
        perm = {"perm": [1, 0, 2]}
        # [S, heads, d] -> [heads, S, d] -> [kv_heads, group * S, d]: head h = kv * group + g.
        q = self._reshape(
            g, f"{p}.q_groups", writer.op("Transpose", f"{p}.q_t", [q], perm), [kvh, group * s, d]
        )
        k_new = writer.op("Transpose", f"{p}.k_t", [k], perm)
        v_new = writer.op("Transpose", f"{p}.v_t", [v], perm)
        for kind, new in (("key", k_new), ("value", v_new)):
            out = self._reshape(g, f"present.{i}.{kind}", new, [1, kvh, s, d])
            presents.append(self._graph_output(writer, out, f"present.{i}.{kind}", [1, kvh, s, d]))
        past_k = self._reshape(g, f"{p}.past_k", pasts[2 * i], [kvh, cap, d])
        past_v = self._reshape(g, f"{p}.past_v", pasts[2 * i + 1], [kvh, cap, d])
        keys = writer.op("Concat", f"{p}.keys", [past_k, k_new], {"axis": 1})
        values = writer.op("Concat", f"{p}.values", [past_v, v_new], {"axis": 1})
        keys_t = writer.op("Transpose", f"{p}.keys_t", [keys], {"perm": [0, 2, 1]})
        scores = writer.op("MatMul", f"{p}.scores", [q, keys_t])
        scores = writer.op("Add", f"{p}.masked_scores", [scores, mask])
        probs = writer.op("Softmax", f"{p}.probs", [scores], {"axis": -1})
        ctx = writer.op("MatMul", f"{p}.context", [probs, values])
        ctx = self._reshape(g, f"{p}.context_heads", ctx, [heads, s, d])
        ctx = writer.op("Transpose", f"{p}.context_t", [ctx], perm)
        return self._reshape(g, f"{p}.context_merged", ctx, [s, heads * d])

    @staticmethod
    def _graph_output(writer: GraphWriter, value: ir.Value, name: str, shape) -> ir.Value:
        out = writer.op("Identity", f"{name}/Identity", [value], output_names=[name])
        out.type, out.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(shape)
        return out


def _checked_inputs(
    model_dir: Path,
    chunk: int,
    kv_capacity: int,
    quant: StaticQuant | None,
    weights: SafetensorsModel | None,
) -> tuple[DecoderConfig, SafetensorsModel]:
    """The model's config and its weights (names and shapes checked); `weights` (e.g. a merged
    LoRA adapter) replaces `model_dir`'s safetensors."""
    problems = []
    if chunk < 1:
        problems.append(f"prefill_chunk: {chunk}; must be a positive number of tokens")
    if kv_capacity < chunk:
        problems.append(f"kv_capacity: {kv_capacity}; must be at least prefill_chunk ({chunk})")
    if problems:
        raise InvalidInput(problems[0], problems)
    cfg = read_config(model_dir)
    weights = weights if weights is not None else SafetensorsModel(model_dir)
    check_weights(cfg, weights)
    if cfg.head_dim % 2:
        raise InvalidInput(
            f"{model_dir / 'config.json'}: head_dim {cfg.head_dim} must be even (rotary)"
        )
    if quant is not None:
        quant.check_patterns(expected_shapes(cfg))
    return cfg, weights


def build_static_decoder(
    model_dir: Path | str,
    out_dir: Path | str,
    *,
    chunk: int,
    kv_capacity: int,
    quant: StaticQuant | None = None,
    progress: Progress | None = None,
    weights: SafetensorsModel | None = None,
) -> StaticExportResult:
    """Export a Qwen2/Qwen2.5/Qwen3 folder to the static prefill + decode graphs, streaming.

    Args:
        model_dir: folder with config.json and safetensors weights.
        out_dir: export folder (created; files of the same names are replaced).
        chunk: prefill graph length in tokens (the profile's `prefill_chunk`).
        kv_capacity: KV cache slots both graphs read (the profile's `kv_capacity`).
        quant: weight quantization (`edgepipe.stages.quantize.qdq.StaticQuant`); None keeps
            float weights (the fp32 reference graphs).
        progress: called as progress(step_name, done, total).
        weights: the tensors to read instead of `model_dir`'s safetensors (a LoRA adapter
            merged as it streams: `edgepipe.stages.lora`).

    Returns:
        StaticExportResult.

    Raises:
        InvalidInput: bad folder, config, weights or sizes (every problem listed).
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    cfg, weights = _checked_inputs(model_dir, chunk, kv_capacity, quant, weights)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = GraphWriter(out_dir / DATA_FILE, DATA_FILE)
    try:
        builder = _StaticBuilder(
            cfg,
            weights,
            writer,
            chunk=chunk,
            kv_capacity=kv_capacity,
            quant=quant,
            progress=progress,
        )
        prefill, decode = builder.build()
    finally:
        writer.close()
    graph_bytes = save_model(prefill, out_dir / PREFILL_FILE) + save_model(
        decode, out_dir / DECODE_FILE
    )
    gc_path = out_dir / GENAI_CONFIG
    config = static_genai_config(
        cfg, chunk=chunk, kv_capacity=kv_capacity, files=(PREFILL_FILE, DECODE_FILE)
    )
    gc_path.write_text(json.dumps(config, indent=4) + "\n")
    files = [out_dir / PREFILL_FILE, out_dir / DECODE_FILE, out_dir / DATA_FILE, gc_path]
    files += copy_side_files(model_dir, out_dir)
    return StaticExportResult(
        out_dir=out_dir,
        prefill_path=out_dir / PREFILL_FILE,
        decode_path=out_dir / DECODE_FILE,
        data_path=out_dir / DATA_FILE,
        chunk=chunk,
        kv_capacity=kv_capacity,
        config=cfg.summary(),
        bytes_written=graph_bytes + writer.bytes_written,
        quantized=builder.quantized,
        files=files,
    )
