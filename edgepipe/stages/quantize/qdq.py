"""QDQ quantization for static NPU graphs: weights as they stream, activations by calibration.

The HTP computes with integer tensors described by QuantizeLinear/DequantizeLinear pairs (QDQ).
Weights are quantized by the static export as each tensor streams through
(`quantize_linear`, `quantize_rows`, `quantize_table`), as symmetric int8 or int4 codes:

* one scale per output channel, in the checkpoint's `[N, K]` layout, read by `Gemm(transB=1)`;
* for int4 with a `block_size`, *low-power block quantization* (LPBQ): a float scale per output
  channel times a 4-bit integer scale per block of `block_size` inputs. The QNN execution
  provider recognises the pattern

      block_scales = DequantizeLinear(int_scales uint8 [K/b, N], channel_scales [N], axis=1)
      weight = DequantizeLinear(codes int4 [K, N], block_scales, zero [K/b, N], axis=0,
                                block_size=b)

  feeding a MatMul, and runs it as one HTP MatMul with LPBQ weights (plain opset-21 block
  quantization, and LPBQ with int8 codes, are refused by the HTP);
* the token table read by Gather with one scale (Gather's output keeps its input's scale).

The op choice is measured, not assumed: on onnxruntime-qnn 2.7's simulated HTP, Gemm over
per-channel int8 weights and MatMul over LPBQ int4 weights match the CPU execution of the same
QDQ graph to 1.5e-5 of the output range, where a MatMul over per-channel int8 weights is off by
2.6e-3 (the HTP runs it at lower activation precision).

Activations are calibrated afterwards by `qdq_calibrate.calibrate_and_quantize` (onnxruntime's
`quantize_static` with its QNN configuration helper), which keeps these weight DQ nodes and
adds 16-bit (or 8-bit) activation pairs.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from edgepipe.errors import InvalidInput

BITS = {"int8": 8, "int4": 4}
# Integer scale bits per LPBQ block: QNN reads 4-bit block scales with int4 weights.
LPBQ_SCALE_BITS = 4


@dataclass(frozen=True)
class WeightQuant:
    """How one weight is stored on a static graph.

    Attributes:
        bits: 8 or 4 (symmetric codes, zero point 0).
        block_size: None for one scale per output channel; else LPBQ blocks of this many
            inputs (tables read by Gather always use one scale for the whole table).
    """

    bits: int
    block_size: int | None = None

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise InvalidInput(f"static weights: bits {self.bits}; allowed: 8, 4")
        if self.block_size is not None and (
            self.block_size < 16 or self.block_size & (self.block_size - 1)
        ):
            raise InvalidInput(
                f"static weights: block_size {self.block_size}; a power of two >= 16"
            )

    @property
    def label(self) -> str:
        return f"int{self.bits}/" + (f"b{self.block_size}" if self.block_size else "pc")


@dataclass(frozen=True)
class StaticQuant:
    """Which weights of a static graph get which `WeightQuant` (every weight is quantized: the
    HTP has no float MatMul in a QDQ graph).

    Attributes:
        weights: the default for body linears.
        embedding: the token table read by Gather (one scale for the table).
        lm_head: the output projection (per vocabulary row, or LPBQ).
        overrides: (fnmatch pattern, spec); the first match wins.
    """

    weights: WeightQuant
    embedding: WeightQuant
    lm_head: WeightQuant
    overrides: tuple[tuple[str, WeightQuant], ...] = ()

    def for_weight(self, name: str) -> WeightQuant:
        """The spec of body weight `name` (HF checkpoint name)."""
        for pattern, spec in self.overrides:
            if fnmatch.fnmatchcase(name, pattern):
                return spec
        return self.weights

    def check_patterns(self, names: Iterable[str]) -> None:
        """Raise InvalidInput for an override pattern that matches no weight."""
        names = list(names)
        dead = [p for p, _ in self.overrides if not any(fnmatch.fnmatchcase(n, p) for n in names)]
        if dead:
            raise InvalidInput(
                f"precision.overrides: pattern {dead[0]!r} matches no weight of this model "
                f"(e.g. {names[1] if len(names) > 1 else names[0]})"
            )

    @classmethod
    def from_resolved(cls, resolved) -> StaticQuant:
        """From an `edgepipe.schema.ResolvedPrecision` of a static profile.

        Raises:
            InvalidInput: a precision the static graph cannot express (float weights, exclude,
                a calibrated weight method).
        """
        where = f"precision (profile {resolved.profile})"
        problems = []
        if resolved.method != "rtn":
            problems.append(
                f"{where}: method {resolved.method!r}: static QDQ weights are rounded to nearest "
                "(rtn); activations are what the calibration text tunes"
            )
        if resolved.exclude:
            problems.append(
                f"{where}: exclude {list(resolved.exclude)}: the HTP runs quantized weights only; "
                "use an override with int8 instead"
            )
        for fld in ("weights", "embedding", "lm_head"):
            if getattr(resolved, fld) not in BITS:
                problems.append(f"{where}: {fld} {getattr(resolved, fld)}; allowed: int8, int4")
        for rule in resolved.overrides:
            if rule.weights not in BITS:
                problems.append(
                    f"{where}: override {rule.pattern!r}: {rule.weights}; allowed: int8, int4"
                )
        if problems:
            raise InvalidInput(problems[0], problems)

        def spec(precision: str, block: int | None) -> WeightQuant:
            # Blocks are LPBQ, which the HTP takes for int4 only: int8 stays per channel.
            bits = BITS[precision]
            return WeightQuant(bits, block if bits == 4 else None)

        block = resolved.block_size
        return cls(
            weights=spec(resolved.weights, block),
            embedding=WeightQuant(BITS[resolved.embedding]),
            lm_head=spec(resolved.lm_head, block),
            overrides=tuple(
                (r.pattern, spec(r.weights, r.block_size or block)) for r in resolved.overrides
            ),
        )


@dataclass
class Stored:
    """One tensor as written to the data file: numpy data, or packed bytes of `ir_dtype`."""

    data: np.ndarray
    shape: tuple[int, ...]
    ir_dtype: ir.DataType | None = None

    @property
    def packed(self) -> bool:
        return self.ir_dtype is not None


@dataclass
class QuantizedTensor:
    """The stored parts of one linear weight and how the graph computes with it.

    Two layouts, chosen by what the HTP runs exactly (measured against the CPU execution of
    the same QDQ graph on onnxruntime-qnn 2.7's simulator; relative to the output range):

    * `channel` (and `float`): the checkpoint's `[N, K]` layout, one scale per output row, read
      by `Gemm(transB=1)`: the QNN provider maps it to a FullyConnected op that matches CPU to
      1.5e-5. A MatMul over the same int8 weight `[K, N]` differs by 2.6e-3: the HTP computes it
      at lower activation precision.
    * `lpbq`: `[K, N]` codes with blocks along K, read by MatMul (the only op the provider
      accepts LPBQ weights on; it matches CPU to 1.5e-5, and Gemm refuses them).

    Attributes:
        tensors: part name -> Stored (`q`, `scale`, `zero`; LPBQ adds `block_int`, `scale_zero`).
        kind: "float", "tensor" (one scale: tables read by Gather), "channel" or "lpbq".
        label: e.g. "int4/b64".
        block_size: LPBQ block.
    """

    tensors: dict[str, Stored]
    kind: str
    label: str = "float"
    block_size: int = 0

    # The axis of each part that runs over the N output channels (for joining row chunks).
    N_AXIS = {
        "float": {"q": 0},
        "channel": {"q": 0, "scale": 0, "zero": 0},
        "lpbq": {"q": 1, "zero": 1, "block_int": 1, "scale": 0, "scale_zero": 0},
    }

    @property
    def op(self) -> str:
        """The op that consumes the weight: Gemm (transB=1) or MatMul."""
        return "MatMul" if self.kind == "lpbq" else "Gemm"

    def emit(self, w, prefix: str, values: dict[str, ir.Value]) -> ir.Value:
        """Add the DequantizeLinear node(s) to writer `w`; return the float weight value."""
        if self.kind == "float":
            return values["q"]
        if self.kind in ("tensor", "channel"):
            attrs = {"axis": 0} if self.kind == "channel" else {}
            inputs = [values["q"], values["scale"], values["zero"]]
            return w.op("DequantizeLinear", f"{prefix}/dq", inputs, attrs)
        block_scales = w.op(
            "DequantizeLinear",
            f"{prefix}/block_scales",
            [values["block_int"], values["scale"], values["scale_zero"]],
            {"axis": 1},
        )
        return w.op(
            "DequantizeLinear",
            f"{prefix}/dq",
            [values["q"], block_scales, values["zero"]],
            {"axis": 0, "block_size": self.block_size},
        )

    def dequantize(self) -> np.ndarray:
        """The float weight the graph computes with, in the HF `[N, K]` layout (tests)."""
        codes = unpack_stored(self.tensors["q"]).astype(np.float32)
        if self.kind == "float":
            return codes
        scale = self.tensors["scale"].data.astype(np.float32)
        if self.kind == "tensor":
            return codes * scale
        if self.kind == "channel":
            return codes * scale[:, None]
        blocks = self.tensors["block_int"].data.astype(np.float32) * scale[None, :]
        return (codes * np.repeat(blocks, self.block_size, axis=0)).T

    @classmethod
    def join(cls, chunks: list[QuantizedTensor]) -> QuantizedTensor:
        """One weight from the quantized row chunks of a table (rows are output channels)."""
        first = chunks[0]
        axes = cls.N_AXIS[first.kind]
        tensors = {}
        for part, stored in first.tensors.items():
            arrays = [unpack_stored(c.tensors[part]) for c in chunks]
            joined = np.concatenate(arrays, axis=axes[part])
            tensors[part] = _codes(4, joined) if stored.packed else Stored(joined, joined.shape)
        return cls(tensors, first.kind, first.label, first.block_size)


def _qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1  # symmetric: -7..7 / -127..127


def _codes(bits: int, values: np.ndarray) -> Stored:
    """Signed codes as stored: int8 as is, int4 packed two per byte (low nibble first)."""
    if bits == 8:
        return Stored(values.astype(np.int8), values.shape)
    flat = (values.astype(np.int8).reshape(-1) & 0x0F).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    packed = flat[0::2] | (flat[1::2] << 4)
    return Stored(packed, values.shape, ir.DataType.INT4)


def _zeros(bits: int, shape: tuple[int, ...]) -> Stored:
    return _codes(bits, np.zeros(shape, np.int8))


def unpack_stored(stored: Stored) -> np.ndarray:
    """The signed int8 codes of a stored tensor (int4 pairs unpacked, low nibble first)."""
    if not stored.packed:
        return stored.data
    size = int(np.prod(stored.shape))
    low = (stored.data & 0x0F).astype(np.int8)
    high = (stored.data >> 4).astype(np.int8)
    flat = np.stack([low, high], axis=1).reshape(-1)[:size]
    return np.where(flat > 7, flat - 16, flat).astype(np.int8).reshape(stored.shape)


def _round(x: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
    q = _qmax(bits)
    return np.clip(np.rint(x / scale), -q, q)


def _safe(scale: np.ndarray) -> np.ndarray:
    # An all-zero channel or block gets scale 1: its codes are 0 whatever the scale.
    return np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)


def quantize_linear(w_nk: np.ndarray, spec: WeightQuant | None) -> QuantizedTensor:
    """Quantize a linear weight in the checkpoint's `[N, K]` layout (N output channels): one
    symmetric scale per output channel, or LPBQ blocks of `spec.block_size` inputs (int4 only:
    the HTP refuses 8-bit LPBQ weights). `spec` None keeps float32.

    Raises:
        InvalidInput: K is not a whole number of blocks.
    """
    w_nk = np.asarray(w_nk, np.float32)
    n, k = w_nk.shape
    if spec is None:
        return QuantizedTensor({"q": Stored(w_nk, w_nk.shape)}, "float")
    bits = spec.bits
    if spec.block_size is None or bits == 8:
        scale = _safe(np.abs(w_nk).max(axis=1) / _qmax(bits))
        codes = _round(w_nk, scale[:, None], bits)
        tensors = {
            "q": _codes(bits, codes),
            "scale": Stored(scale, scale.shape),
            "zero": _zeros(bits, (n,)),
        }
        return QuantizedTensor(tensors, "channel", WeightQuant(bits).label)
    b = spec.block_size
    if k % b:
        raise InvalidInput(
            f"static weights: block_size {b} does not divide the input size {k}; pick a block "
            "size that divides every hidden and intermediate size (or none: per channel)"
        )
    blocks = w_nk.T.reshape(k // b, b, n)  # [K/b, b, N]
    block_scale = np.abs(blocks).max(axis=1) / _qmax(bits)  # [K/b, N]
    levels = 2**LPBQ_SCALE_BITS - 1
    channel = _safe(block_scale.max(axis=0) / levels)  # [N]
    # Ceil keeps every block scale at or above its exact value, so no weight is clipped.
    block_int = np.clip(np.ceil(block_scale / channel[None, :]), 1, levels).astype(np.uint8)
    effective = block_int.astype(np.float32) * channel[None, :]
    codes = _round(blocks, effective[:, None, :], bits).reshape(k, n)
    tensors = {
        "block_int": Stored(block_int, block_int.shape),
        "scale": Stored(channel, channel.shape),
        "scale_zero": Stored(np.zeros(n, np.uint8), (n,)),
        "q": _codes(bits, codes),
        "zero": _zeros(bits, (k // b, n)),
    }
    return QuantizedTensor(tensors, "lpbq", spec.label, block_size=b)


def quantize_rows(
    chunks: Callable[[], Iterator[np.ndarray]], spec: WeightQuant | None
) -> QuantizedTensor:
    """`quantize_linear` of a `[rows, width]` table whose rows are the output channels (an
    lm_head stored as `[vocab, hidden]`), one row chunk of `chunks()` at a time: every scale
    belongs to one row, so chunks quantize independently and only the codes are kept whole."""
    return QuantizedTensor.join([quantize_linear(chunk, spec) for chunk in chunks()])


def quantize_table(
    chunks: Callable[[], Iterator[np.ndarray]], spec: WeightQuant
) -> QuantizedTensor:
    """Quantize a `[rows, width]` table read by Gather with one symmetric scale (two passes over
    `chunks()`, each yielding row chunks): Gather's output shares its input's quantization, so
    the table cannot have a scale per row."""
    absmax = 0.0
    for chunk in chunks():
        absmax = max(absmax, float(np.abs(chunk).max()))
    scale = np.float32(absmax / _qmax(spec.bits) if absmax > 0 else 1.0)
    codes = np.concatenate(
        [_round(np.asarray(c, np.float32), scale, spec.bits).astype(np.int8) for c in chunks()]
    )
    return QuantizedTensor(
        {
            "q": _codes(spec.bits, codes),
            "scale": Stored(np.asarray(scale, np.float32), ()),
            "zero": _zeros(spec.bits, ()),
        },
        "tensor",
        f"int{spec.bits}/tensor",
    )


# -- activations: calibration through the static graphs --------------------------------------

# qnn.activation_quantization -> (onnxruntime QuantType member, symmetric). Not int16
# everywhere: the HTP refuses int16 Tile and int16 activations into LPBQ MatMuls.
