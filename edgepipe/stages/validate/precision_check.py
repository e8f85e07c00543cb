"""Does the graph hold the precision its manifest records? Read back from the graph itself.

The manifest's `export.resolved_precision` is what the recipe asked for, resolved for the
model (`ResolvedPrecision.for_model`). This check reads every weight of a built dynamic graph
back (external data is not loaded) and compares each field with it:

* every body linear (`weights`, `exclude`, `overrides`, `block_size`, `symmetric`,
  `accuracy_level`): MatMulNBits `bits` / `block_size` / `accuracy_level` and whether it has
  zero points, or a float MatMul weight of the recorded dtype;
* the embedding: GatherBlockQuantized's `bits` / `block_size` (the block shrunk to divide
  hidden, `embedding_spec`) and zero points, or a float Gather table;
* the lm_head: likewise, and for `tied: true` that its MatMulNBits reads the very bytes the
  gather reads (same file, offset and length).

The method (rtn, hqq, gptq) leaves no trace in the graph beyond hqq's zero points, which are
checked with `symmetric`. A float16 build's fp16 guard may keep weights in float32: more
precise than recorded, which passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgepipe.errors import BuildFailed
from edgepipe.formats.external_data import duplicate_initializers
from edgepipe.schema.common import QUANTIZED
from edgepipe.schema.precision import ResolvedPrecision
from edgepipe.stages.quantize.blocks import QuantSpec
from edgepipe.stages.quantize.plan import embedding_spec

# Graph linear names (`edgepipe.stages.export.layers`) -> the family's weight keys they hold.
_ATTENTION = {"qkv_proj": ("q", "k", "v"), "o_proj": ("o",)}
_ATTENTION.update({f"{k}_proj": (k,) for k in "qkv"})
_ATTENTION.update({f"qkv_proj_{i}": (k,) for i, k in enumerate("qkv")})
_MLP = {f"{k}_proj": (k,) for k in ("gate", "up", "down")}
_BODY_KEYS = ("q", "k", "v", "o", "gate", "up", "down")
# onnx TensorProto data types of float weights, by the precision they may stand for.
_FLOAT_TYPES = {"fp32": {1}, "fp16": {10, 1}}  # FLOAT = 1, FLOAT16 = 10


@dataclass
class _Graph:
    """The parts of a graph the check reads: initializers and which nodes consume them."""

    initializers: dict
    consumers: dict

    @classmethod
    def load(cls, model_path: Path) -> _Graph:
        import onnx

        model = onnx.load(str(model_path), load_external_data=False)
        consumers: dict[str, list] = {}
        for node in model.graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
        return cls({t.name: t for t in model.graph.initializer}, consumers)

    def node(self, weight: str, op_types: tuple[str, ...]):
        return next((n for n in self.consumers.get(weight, []) if n.op_type in op_types), None)

    def where(self, name: str) -> tuple:
        return tuple((e.key, e.value) for e in self.initializers[name].external_data)


def _attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _quantized(graph: _Graph, what: str, prefix: str, ops: tuple[str, ...], spec: QuantSpec):
    """Failures of the quantized weight `{prefix}.qweight` against `spec`."""
    node = graph.node(f"{prefix}.qweight", ops)
    if node is None:
        return [f"{what}: recorded int{spec.bits}, but no {'/'.join(ops)} reads {prefix}.qweight"]
    attrs = _attrs(node)
    failures = []
    for key, want in (("bits", spec.bits), ("block_size", spec.block_size)):
        if attrs.get(key) != want:
            failures.append(f"{what}: recorded {key} {want}, graph has {attrs.get(key)}")
    if node.op_type == "MatMulNBits" and attrs.get("accuracy_level", 0) != spec.accuracy_level:
        failures.append(
            f"{what}: recorded accuracy_level {spec.accuracy_level}, graph has "
            f"{attrs.get('accuracy_level', 0)}"
        )
    # Zero points are input 3 of both ops (MatMulNBits: A, B, scales; the gather: data,
    # indices, scales).
    has_zp = len(node.input) > 3 and bool(node.input[3])
    if has_zp == spec.symmetric:
        said = "symmetric" if spec.symmetric else "asymmetric"
        held = "has" if has_zp else "has no"
        failures.append(f"{what}: recorded {said}, graph {held} zero points")
    return failures


def _float(graph: _Graph, what: str, weight: str, precision: str) -> list[str]:
    tensor = graph.initializers.get(weight)
    if tensor is None:
        return [f"{what}: recorded {precision}, but the graph has no float weight {weight}"]
    if tensor.data_type not in _FLOAT_TYPES[precision]:
        return [f"{what}: recorded {precision}, graph stores {weight} as type {tensor.data_type}"]
    return []


def _spec(r: ResolvedPrecision, precision: str, block: int | None, side: bool) -> QuantSpec:
    # The spec `QuantPlan.from_resolved` makes: hqq's side tables are asymmetric.
    method = "rtn" if side and r.method == "gptq" else r.method
    symmetric = r.symmetric and not (side and method == "hqq")
    return QuantSpec(4 if precision == "int4" else 8, block, symmetric, method, r.accuracy_level)


def _body(graph: _Graph, r: ResolvedPrecision, cfg, floats: str) -> tuple[list[str], int]:
    failures, checked = [], set()
    for i in range(cfg.num_hidden_layers):
        names = {k: cfg.family.layer[k].format(i=i) for k in _BODY_KEYS}
        parts = [(f"layers.{i}.attn.{n}", keys) for n, keys in _ATTENTION.items()]
        parts += [(f"layers.{i}.mlp.{n}", keys) for n, keys in _MLP.items()]
        for prefix, keys in parts:
            quantized = f"{prefix}.qweight" in graph.initializers
            if not quantized and f"{prefix}.weight" not in graph.initializers:
                continue
            hf = [names[k] for k in keys]
            wanted = {r.for_weight(n) for n in hf}
            if len(wanted) != 1:
                failures.append(f"{prefix}: one weight for {hf}, whose recorded precisions differ")
                continue
            (want,) = wanted
            precision, block = (floats, None) if want is None else want
            what = f"{prefix} ({', '.join(hf)})"
            if precision in QUANTIZED and quantized:
                spec = _spec(r, precision, block, side=False)
                failures += _quantized(graph, what, prefix, ("MatMulNBits",), spec)
            elif precision in QUANTIZED or quantized:
                held = "quantized" if quantized else "float"
                failures.append(f"{what}: recorded {precision}, graph holds it {held}")
            else:
                failures += _float(graph, what, f"{prefix}.weight", precision)
            checked.update(hf)
    layers = range(cfg.num_hidden_layers)
    expected = {cfg.family.layer[k].format(i=i) for k in _BODY_KEYS for i in layers}
    failures += [f"{n}: not found in the graph" for n in sorted(expected - checked)]
    return failures, len(checked)


def _sides(graph: _Graph, r: ResolvedPrecision, cfg) -> list[str]:
    """The embedding and lm_head against `embedding`, `lm_head` and `tied`."""
    failures = []
    table_block = None
    if r.embedding in QUANTIZED:
        table = embedding_spec(_spec(r, r.embedding, r.block_size, side=True), cfg.hidden_size)
        table_block = table.block_size
        ops = ("GatherBlockQuantized",)
        failures += _quantized(graph, "embedding", "embed_tokens", ops, table)
    else:
        failures += _float(graph, "embedding", "embed_tokens.weight", r.embedding)
    tied = r.tied and cfg.tie_word_embeddings
    if r.lm_head in QUANTIZED:
        block = table_block if tied else r.block_size
        spec = _spec(r, r.lm_head, block, side=True)
        failures += _quantized(graph, "lm_head", "lm_head", ("MatMulNBits",), spec)
    elif not tied:
        failures += _float(graph, "lm_head", "lm_head.weight", r.lm_head)
    if tied and r.embedding != r.lm_head:
        failures.append(f"tied: one table recorded as {r.embedding} and {r.lm_head}")
    elif tied and r.lm_head in QUANTIZED:
        names = ("embed_tokens.qweight", "lm_head.qweight")
        if all(n in graph.initializers for n in names) and len({graph.where(n) for n in names}) > 1:
            failures.append("tied: the lm_head does not read the embedding's stored bytes")
    elif tied and graph.node("embed_tokens.weight", ("Gemm", "MatMul")) is None:
        failures.append("tied: the float lm_head does not read the embedding table")
    return failures


def check_precision(
    model_path: Path | str, resolved: ResolvedPrecision, cfg, activation_dtype: str
) -> dict:
    """Compare the weights a dynamic graph holds with the precision its manifest records.

    Args:
        model_path: the artifact's `model.onnx` (external weights are not read).
        resolved: the recorded precision, `for_model` applied (its `tied` is not None).
        cfg: the model's `edgepipe.arch.spec.DecoderConfig` (layer count, weight names).
        activation_dtype: "float32" or "float16": what unquantized weights are stored in.

    Returns:
        `checked` (body weights compared, plus embedding and lm_head), `failures` (one
        sentence each: the field, what was recorded, what the graph holds) and `passed`.
    """
    graph = _Graph.load(Path(model_path))
    floats = "fp16" if activation_dtype == "float16" else "fp32"
    failures, checked = _body(graph, resolved, cfg, floats)
    failures += _sides(graph, resolved, cfg)
    return {"checked": checked + 2, "failures": failures, "passed": not failures}


def check_artifact_weights(
    model_path: Path | str, resolved: ResolvedPrecision, cfg, activation_dtype: str
) -> dict:
    """`check_precision`, and that no two initializers hold the same bytes in two places
    (`edgepipe.formats.external_data.duplicate_initializers`): the checks a dynamic artifact
    passes before it is packaged.

    Raises:
        BuildFailed: a recorded precision the graph does not hold, or a weight stored twice.
    """
    record = check_precision(model_path, resolved, cfg, activation_dtype)
    duplicates = duplicate_initializers(model_path)
    record["failures"] += [f"{a} and {b} hold the same bytes, stored twice" for a, b in duplicates]
    record["passed"] = not record["failures"]
    if not record["passed"]:
        raise BuildFailed(
            f"{Path(model_path).name}: the graph disagrees with its manifest: "
            + "; ".join(record["failures"])
        )
    return record
