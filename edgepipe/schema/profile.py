"""Device profiles: where an artifact runs (see device_profiles/*.yaml), as pydantic models.

A profile names the execution provider, the graph variant (dynamic or static), dtypes, the
ops the provider accepts and the precision defaults a recipe falls back to.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, model_validator

from edgepipe.runtime.providers import PROVIDER_PACKAGES
from edgepipe.schema.common import BlockSize, FieldProblems, Precision, Strict

# The providers a profile may target (CUDA is in the runtime's table but no profile uses it).
# Literal needs the strings spelled out; a test checks they are the runtime's constants.
Provider = Literal["CPUExecutionProvider", "DmlExecutionProvider", "QNNExecutionProvider"]
TensorDtype = Literal[
    "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8",
    "uint16", "uint8", "int4", "uint4", "bool",
]  # fmt: skip

# Keys owned by the typed `qnn:` block; provider_options must not set them a second time.
QNN_TYPED_KEYS = ("backend_type", "soc_model", "htp_arch", "htp_performance_mode")

_OP = re.compile(r"^([a-z][\w.]*::)?[A-Z][A-Za-z0-9]*$")


def _check_op(value: str) -> str:
    if not _OP.match(value):
        example = "e.g. Add or com.microsoft::MatMulNBits"
        raise ValueError(f"must be 'OpType' or 'domain::OpType' ({example}), got {value!r}")
    return value


def _check_option(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)):
        return value
    raise ValueError(f"must be a string, number or boolean, got {type(value).__name__}")


class ContextSize(Strict):
    """Context window in tokens: what a session allocates by default, and the hard maximum."""

    default: int = Field(ge=16)
    maximum: int = Field(ge=16)

    @model_validator(mode="after")
    def _ordered(self) -> ContextSize:
        if self.default > self.maximum:
            raise ValueError(f"default ({self.default}) exceeds maximum ({self.maximum})")
        return self


class QnnOptions(Strict):
    """QNN / Hexagon knobs the static build and the session need, typed."""

    backend_type: Literal["htp", "cpu"] = "htp"
    soc_model: int = Field(ge=0, description="QNN SoC id: 60 = Snapdragon X Elite (SC8380XP)")
    htp_arch: Literal[68, 69, 73, 75, 79, 81] = Field(description="Hexagon version, e.g. 73")
    htp_performance_mode: Literal[
        "burst", "balanced", "default", "high_performance", "high_power_saver",
        "low_balanced", "low_power_saver", "power_saver", "sustained_high_performance",
    ] = "burst"  # fmt: skip
    activation_quantization: Literal["uint16", "uint8"] = Field(
        "uint16", description="QDQ activation type: w8a16 keeps attention/softmax usable"
    )


class DecoderLayout(Strict):
    """How the dynamic decoder graph is laid out for one execution provider.

    The defaults are the CPU provider's fastest layout; an EP whose kernels need another form
    (DirectML) says so here instead of `if provider == ...` in the exporter.
    """

    rotary: Literal["attention", "node"] = Field(
        "attention",
        description="attention: inside GroupQueryAttention (cos/sin inputs); node: "
        "com.microsoft.RotaryEmbedding on q and k before it",
    )
    qkv: Literal["packed", "separate"] = Field(
        "packed", description="packed: one q/k/v MatMul; separate: three, no Split"
    )
    matmul_bias: Literal["fused", "add"] = Field(
        "fused", description="fused: MatMulNBits' bias input; add: an Add after it"
    )
    head_norm: Literal["branchwise", "reshape"] = Field(
        "branchwise",
        description="Qwen3's per-head q/k RMSNorm. branchwise: one "
        "com.microsoft.BranchwiseRMSNorm on q and one on k (no Reshape); reshape: "
        "Reshape -> SimplifiedLayerNormalization -> Reshape on each",
    )
    fp16_guard: Literal["off", "auto", "always"] = Field(
        "off",
        description="float16 graphs: keep the residual stream, its norms and the sublayers "
        "that would overflow in float32; auto: where fp32 activations measured on "
        "calibration text come near the fp16 range, always: the residual stream always",
    )


class DeviceProfile(Strict):
    """Where an artifact runs: see device_profiles/*.yaml for commented examples."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9.\-]*$")
    description: str
    provider: Provider
    provider_options: dict[str, Annotated[Any, AfterValidator(_check_option)]] = Field(
        default_factory=dict
    )
    package: Literal["onnxruntime", "onnxruntime-directml", "onnxruntime-qnn"]
    graph_variant: Literal["dynamic", "static"]
    activation_dtype: Literal["float32", "float16"]
    default_precision: Precision
    default_block_size: BlockSize | None = None
    default_symmetric: bool = False
    weight_precisions: list[Precision] = Field(min_length=1)
    accuracy_level: int = Field(0, ge=0, le=4)
    context: ContextSize
    prefill_chunk: int | None = Field(None, ge=1)
    kv_capacity: int | None = Field(None, ge=16)
    optimization_level: Literal["disable", "basic", "extended", "layout", "all"] = "all"
    ops: list[Annotated[str, AfterValidator(_check_op)]] = Field(min_length=1)
    tensor_dtypes: list[TensorDtype] = Field(min_length=1)
    qnn: QnnOptions | None = None
    decoder: DecoderLayout = Field(default_factory=DecoderLayout)
    session_config: dict[str, str] = Field(
        default_factory=dict,
        description="SessionOptions config entries (add_session_config_entry), e.g. "
        "ep.dml.enable_graph_capture",
    )
    architecture: Literal["any", "x86_64", "arm64"] = Field(
        "any", description="the CPU architecture the profile targets (any: not tied to one)"
    )

    @model_validator(mode="after")
    def _consistent(self) -> DeviceProfile:
        problems: list[tuple[str, str]] = []
        static = self.graph_variant == "static"
        if static and "decoder" in self.model_fields_set:
            problems.append(("decoder", "only for graph_variant dynamic; remove it"))
        if self.decoder.fp16_guard != "off" and self.activation_dtype != "float16":
            problems.append(
                ("decoder.fp16_guard", "only for activation_dtype float16; set it to off")
            )
        branchwise = not static and self.decoder.head_norm == "branchwise"
        if branchwise and not self.accepts_op("BranchwiseRMSNorm", "com.microsoft"):
            message = (
                "branchwise needs com.microsoft::BranchwiseRMSNorm in ops (CPU provider); add "
                "it, or set head_norm: reshape"
            )
            problems.append(("decoder.head_norm", message))
        for field in ("prefill_chunk", "kv_capacity"):
            if static and getattr(self, field) is None:
                problems.append((field, "required for graph_variant static"))
            if not static and getattr(self, field) is not None:
                problems.append((field, "only for graph_variant static; remove it"))
        if static and self.prefill_chunk and self.kv_capacity:
            if self.prefill_chunk > self.kv_capacity:
                problems.append(("prefill_chunk", f"exceeds kv_capacity ({self.kv_capacity})"))
            if self.kv_capacity > self.context.maximum:
                problems.append(
                    ("kv_capacity", f"exceeds context.maximum ({self.context.maximum})")
                )
        if not static and self.default_block_size is None:
            problems.append(("default_block_size", "required for graph_variant dynamic"))
        if self.default_precision not in self.weight_precisions:
            accepted = ", ".join(self.weight_precisions)
            problems.append(("default_precision", f"not in weight_precisions ({accepted})"))
        if self.package not in PROVIDER_PACKAGES[self.provider]:
            allowed = " or ".join(PROVIDER_PACKAGES[self.provider])
            problems.append(("package", f"{self.provider} comes with {allowed}"))
        if self.provider == "QNNExecutionProvider" and self.qnn is None:
            problems.append(("qnn", "required for QNNExecutionProvider (soc_model, htp_arch)"))
        if self.provider != "QNNExecutionProvider" and self.qnn is not None:
            problems.append(("qnn", "only for QNNExecutionProvider; remove it"))
        duplicated = sorted(set(QNN_TYPED_KEYS) & set(self.provider_options))
        if self.qnn is not None and duplicated:
            problems.append(("provider_options", f"set {', '.join(duplicated)} under qnn:"))
        if problems:
            raise FieldProblems(problems)
        return self

    def accepts_op(self, op: str, domain: str = "") -> bool:
        """True when the provider accepts `op` (`"Type"`, `"domain::Type"`, or op + domain)."""
        if "::" in op:
            domain, op = op.split("::", 1)
        name = f"{domain}::{op}" if domain not in ("", "ai.onnx") else op
        return name in self.ops

    def session_provider_options(self) -> dict[str, str]:
        """Provider options as ONNX Runtime takes them (all strings), typed knobs included."""
        options = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in
                   self.provider_options.items()}  # fmt: skip
        if self.qnn is not None:
            options.update(
                backend_type=self.qnn.backend_type,
                soc_model=str(self.qnn.soc_model),
                htp_arch=str(self.qnn.htp_arch),
                htp_performance_mode=self.qnn.htp_performance_mode,
            )
        return options
