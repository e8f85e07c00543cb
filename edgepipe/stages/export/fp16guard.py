"""The float16 overflow guard: per-layer activation maxima, and which parts of a float16 decoder
stay in float32.

Qwen2.5 carries very large activations in a few residual-stream channels (a single down_proj
output can exceed fp16's 65504, and sums of sublayer outputs can too): a float16 graph then
turns them into inf and NaN, which is how DirectML builds of Qwen2.5 int4 come to print garbage
while the float32 CPU build is fine. ONNX Runtime's CPU kernels accumulate fp16 norms in fp32
and so hide part of it, which is why the guard decides from the float32 graph's maxima rather
than from a float16 run.

`activation_maxima` runs an exported decoder once over a token sequence with the residual
stream and each sublayer's output exposed, and returns their largest magnitudes per layer.
`plan_guard` turns the float32 maxima into an `Fp16Guard`: a sublayer (attention's o_proj, or
the whole MLP) whose output comes within `HEADROOM` of the fp16 range runs in float32, and then
the residual stream and its norms (`SkipSimplifiedLayerNormalization`) run in float32 too, with
Casts at their edges. `edgepipe.stages.export.dynamic.build_decoder(fp16_guard=...)` builds
that graph; the attention itself (GroupQueryAttention) always stays in the activation dtype.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgepipe.errors import InvalidInput
from edgepipe.stages.validate.runner import quiet_options

FP16_MAX = 65504.0
# A site is kept in float32 when its float32 maximum on the calibration text exceeds
# FP16_MAX / HEADROOM: the text is short, and unseen text can push activations higher.
HEADROOM = 4.0
GUARD_POLICIES = ("off", "auto", "always")
# The exporter names its guard Casts "<value>/to_fp32" and "<value>/to_fp16".
GUARD_CAST = re.compile(r"/to_fp(16|32)$")
_NORM = re.compile(r"^(?:layers\.(\d+)\.(input_norm|post_norm)|final_norm)/")


@dataclass(frozen=True)
class Fp16Guard:
    """Which parts of a float16 decoder run in float32.

    Attributes:
        residual: the residual stream and its norms run in float32 (Casts at their edges).
        fp32_attention: layers whose o_proj runs in float32 (its input cast up).
        fp32_mlp: layers whose MLP (gate, up, SwiGLU, down) runs in float32.
    """

    residual: bool = False
    fp32_attention: tuple[int, ...] = ()
    fp32_mlp: tuple[int, ...] = ()

    def __post_init__(self):
        if (self.fp32_attention or self.fp32_mlp) and not self.residual:
            # A float32 sublayer output cast back to a float16 residual would overflow again.
            raise InvalidInput("fp16 guard: float32 sublayers need residual=True")

    @property
    def active(self) -> bool:
        """True when the guard changes the graph."""
        return self.residual

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class LayerMaxima:
    """Largest magnitudes one decoder layer produced (float32; inf/NaN kept as they are).

    Attributes:
        layer: index.
        attention: o_proj's output.
        mlp_act: down_proj's input, `silu(gate) * up`.
        mlp: down_proj's output.
        residual: the residual stream inside and after the layer.
    """

    layer: int
    attention: float = 0.0
    mlp_act: float = 0.0
    mlp: float = 0.0
    residual: float = 0.0
    values: dict[str, str] = field(default_factory=dict, repr=False)


def _max_abs(array: np.ndarray) -> float:
    a = np.abs(np.asarray(array, dtype=np.float32))
    if a.size == 0:
        return 0.0
    if np.isnan(a).any():
        return float("nan")
    return float(a.max())


def _sites(graph) -> list[LayerMaxima]:
    """The value names to probe, from the exporter's node names (`layers.{i}.post_norm/...`)."""
    norms: dict[tuple[int, str] | str, object] = {}
    acts: dict[int, str] = {}
    for node in graph.node:
        match = _NORM.match(node.name)
        if match and node.op_type == "SkipSimplifiedLayerNormalization":
            key = "final" if match.group(1) is None else (int(match.group(1)), match.group(2))
            norms[key] = node
        act = re.match(r"^layers\.(\d+)\.mlp\.act$", node.name)
        if act:
            acts[int(act.group(1))] = node.output[0]
    layers = sorted({k[0] for k in norms if isinstance(k, tuple)})
    sites = []
    for i in layers:
        post = norms.get((i, "post_norm"))
        after = norms.get((i + 1, "input_norm")) or norms.get("final")
        if post is None or after is None or i not in acts:
            raise InvalidInput(f"layer {i}: not an edgepipe decoder graph (norm nodes missing)")
        sites.append(
            LayerMaxima(
                i,
                values={
                    "attention": post.input[0],
                    "residual_mid": post.output[3],
                    "mlp_act": acts[i],
                    "mlp": after.input[0],
                    "residual": after.output[3],
                },
            )
        )
    return sites


def activation_maxima(model_path: Path | str, ids: Sequence[int]) -> list[LayerMaxima]:
    """Per-layer activation maxima of an exported decoder over `ids` (one prefill, CPU).

    Args:
        model_path: an export's `model.onnx` (float32 or float16, quantized or not); its
            weights stay in `model.onnx.data` beside it.
        ids: token ids, prefilled in one run from an empty cache.

    Returns:
        One `LayerMaxima` per layer.
    """
    import onnx
    import onnxruntime as ort

    model_path = Path(model_path)
    model = onnx.load(str(model_path), load_external_data=False)
    sites = _sites(model.graph)
    probes = sorted({name for site in sites for name in site.values.values()})
    existing = {o.name for o in model.graph.output}
    for name in probes:
        if name not in existing:
            model.graph.output.append(onnx.ValueInfoProto(name=name))  # ORT infers the type
    options = quiet_options()
    # The probe graph lives in memory; its weights are read from the export folder.
    options.add_session_config_entry(
        "session.model_external_initializers_file_folder_path", str(model_path.parent)
    )
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    feeds = {
        "input_ids": np.asarray([list(ids)], dtype=np.int64),
        "attention_mask": np.ones((1, len(ids)), dtype=np.int64),
    }
    for meta in session.get_inputs():
        if meta.name.startswith("past_key_values."):
            dtype = np.float16 if meta.type == "tensor(float16)" else np.float32
            feeds[meta.name] = np.zeros((1, meta.shape[1], 0, meta.shape[3]), dtype=dtype)
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, feeds), strict=True))
    for site in sites:
        v = {key: _max_abs(outputs[name]) for key, name in site.values.items()}
        site.attention, site.mlp_act, site.mlp = v["attention"], v["mlp_act"], v["mlp"]
        site.residual = max(v["residual_mid"], v["residual"])
        if np.isnan(v["residual_mid"]) or np.isnan(v["residual"]):
            site.residual = float("nan")
    return sites


def _over(value: float, bound: float) -> bool:
    return not value <= bound  # NaN counts as over


def plan_guard(maxima: Sequence[LayerMaxima], policy: str = "auto") -> Fp16Guard:
    """Where a float16 graph of this model must stay in float32.

    Args:
        maxima: `activation_maxima` of the float32 export (on calibration text).
        policy: `off` (no guard), `auto` (where the maxima exceed FP16_MAX / HEADROOM) or
            `always` (`auto`, and the residual stream in float32 even when nothing is near).

    Raises:
        InvalidInput: unknown policy.
    """
    if policy not in GUARD_POLICIES:
        raise InvalidInput(f"fp16_guard: {policy!r}; allowed: {', '.join(GUARD_POLICIES)}")
    if policy == "off":
        return Fp16Guard()
    bound = FP16_MAX / HEADROOM
    attention = tuple(m.layer for m in maxima if _over(m.attention, bound))
    mlp = tuple(m.layer for m in maxima if _over(m.mlp_act, bound) or _over(m.mlp, bound))
    residual = any(_over(m.residual, bound) for m in maxima)
    return Fp16Guard(
        residual=policy == "always" or residual or bool(attention or mlp),
        fp32_attention=attention,
        fp32_mlp=mlp,
    )


def guard_casts(model_path: Path | str) -> int:
    """Number of Cast nodes the guard added to a graph (named `.../to_fp32|16`)."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    return sum(1 for n in graph.node if n.op_type == "Cast" and GUARD_CAST.search(n.name))


def guard_report(
    fp32: Sequence[LayerMaxima],
    fp16: Sequence[LayerMaxima],
    guard: Fp16Guard,
    policy: str,
    casts: int,
) -> dict:
    """The manifest's `fp16_guard` record: policy, the guard, its cost, and per layer the maxima
    of the float32 graph next to those of the (guarded) float16 graph."""
    keys = ("attention", "mlp_act", "mlp", "residual")
    rows = []
    for a, b in zip(fp32, fp16, strict=True):
        rows.append(
            {
                "layer": a.layer,
                "fp32": {k: getattr(a, k) for k in keys},
                "fp16": {k: getattr(b, k) for k in keys},
            }
        )
    finite = all(np.isfinite(getattr(b, k)) for b in fp16 for k in keys)
    return {
        "policy": policy,
        "bound": FP16_MAX / HEADROOM,
        "guard": guard.to_dict(),
        "casts_added": casts,
        "fp16_finite": bool(finite),
        "layers": rows,
    }
