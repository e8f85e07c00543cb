"""Weight-only INT4/INT8 quantization laid out for `MatMulNBits` and `GatherBlockQuantized`.

The export stage streams weights one at a time and calls `quantize_weight` (linear layers) or
`quantize_embedding` (the token table, shared with a tied lm_head). Which weights are quantized,
and how, is a `QuantPlan`; a single weight's recipe is a `QuantSpec`.

Layout (the contract with the graph builder). A linear layer computes `y = x @ W` with `W` of
shape `[K, N]` (K = in_features). `MatMulNBits` stores it transposed, in blocks along K:

* `packed`: uint8 `[N, n_blocks, block_size * bits // 8]`, each block holds `block_size`
  consecutive K values of one output column; at 4 bits the first value is the low nibble.
* `scales`: float32 `[N, n_blocks]`.
* `zero_points`: uint8 `[N, ceil(n_blocks * bits / 8)]` (4 bits: two blocks per byte, low nibble
  first), or None for symmetric weights, where the kernel assumes `2 ** (bits - 1)`.

Dequantized value: `(code - zero_point) * scale`. K is zero-padded up to a multiple of the block
size. A `[vocab, hidden]` embedding table is the same thing with K = hidden and N = vocab, so one
`QuantizedWeight` feeds both `GatherBlockQuantized` (data reshaped to `[vocab, hidden*bits/8]`)
and the tied lm_head's `MatMulNBits`.

Methods (`METHODS`, keyed by the name a recipe uses):

* `rtn`: onnxruntime's native block quantizer (MLAS), min-max or abs-max round-to-nearest.
* `hqq`: half-quadratic quantization (calibration-free, asymmetric), see `edgepipe.stages.quantize.hqq`.
* `gptq`: Hessian-aware error feedback from layer input activations, see `edgepipe.stages.quantize.gptq`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from edgepipe.errors import InvalidInput

ALLOWED_BITS = (4, 8)
ALLOWED_BLOCK_SIZES = (16, 32, 64, 128, 256)
ALLOWED_ACCURACY_LEVELS = (0, 1, 2, 3, 4)
#: Values of a recipe's precision fields; fp16/fp32 mean "keep the weight in float".
ALLOWED_WEIGHT_PRECISIONS = ("int4", "int8", "fp16", "fp32")

EMBEDDING_PATTERNS = ("model.embed_tokens.weight", "*embed_tokens.weight")
LM_HEAD_PATTERNS = ("lm_head.weight", "*lm_head.weight")
# Weights that are never matrix-multiplied and so never quantized, whatever a pattern says.
_NEVER_QUANTIZED = ("*norm*", "*.bias")


@dataclass(frozen=True)
class QuantSpec:
    """How one weight is quantized.

    Attributes:
        bits: 4 or 8.
        block_size: Values per scale along K; a power of two in 16..256.
        symmetric: No zero points (the kernel assumes 8 at 4 bits, 128 at 8 bits).
        method: A key of `METHODS`: "rtn", "hqq" or "gptq".
        accuracy_level: `MatMulNBits` accuracy_level attribute, 0..4 (4 = int8 activations).
        float_zero_points: hqq only: keep HQQ's fractional zero points as float32
            `[N, n_blocks]` (MatMulNBits accepts zero points of the scales' type and computes
            `(code - zero) * scale`) instead of rounding them to uint8. Lower error, larger file
            (a float per block instead of half a byte); not for GatherBlockQuantized.
    """

    bits: int = 4
    block_size: int = 32
    symmetric: bool = False
    method: str = "rtn"
    accuracy_level: int = 0
    float_zero_points: bool = False

    def __post_init__(self) -> None:
        problems = spec_problems(
            self.bits, self.block_size, self.symmetric, self.method, self.accuracy_level
        )
        if self.float_zero_points and self.method != "hqq":
            problems.append(
                f"float_zero_points: only method hqq fits fractional zero points, not "
                f"{self.method!r}; set float_zero_points: false or method: hqq"
            )
        if problems:
            raise InvalidInput(problems[0], problems)


def spec_problems(
    bits: object,
    block_size: object,
    symmetric: object,
    method: object,
    accuracy_level: object,
    field_prefix: str = "",
) -> list[str]:
    """Every problem with these quantization settings, each naming its field and allowed values.

    Args:
        bits: Requested bits.
        block_size: Requested block size.
        symmetric: Requested symmetry.
        method: Requested method name.
        accuracy_level: Requested MatMulNBits accuracy level.
        field_prefix: Prepended to field names in messages (e.g. "precision.overrides[0].").

    Returns:
        A list of messages; empty when everything is valid.
    """
    p = field_prefix
    problems = []
    if bits not in ALLOWED_BITS:
        problems.append(f"{p}bits: {bits!r} is not supported; allowed values: 4, 8")
    if block_size not in ALLOWED_BLOCK_SIZES:
        problems.append(
            f"{p}block_size: {block_size!r} must be a power of two in 16..256; "
            f"allowed values: {', '.join(map(str, ALLOWED_BLOCK_SIZES))}"
        )
    if method not in METHOD_NAMES:
        problems.append(
            f"{p}method: unknown method {method!r}; allowed values: {', '.join(METHOD_NAMES)}"
        )
    elif method == "hqq" and symmetric:
        problems.append(
            f"{p}symmetric: hqq optimizes a zero point per block, so it is asymmetric only; "
            "set symmetric: false or use method rtn/gptq"
        )
    if accuracy_level not in ALLOWED_ACCURACY_LEVELS:
        problems.append(
            f"{p}accuracy_level: {accuracy_level!r} is not a MatMulNBits accuracy level; "
            "allowed values: 0, 1, 2, 3, 4"
        )
    if not isinstance(symmetric, bool):
        problems.append(f"{p}symmetric: {symmetric!r} must be true or false")
    return problems


@dataclass(frozen=True)
class QuantizedWeight:
    """A `[K, N]` weight (`y = x @ W`, K = in_features) packed exactly as MatMulNBits' inputs.

    Attributes:
        K: Rows of the float weight (in_features; hidden size for an embedding table).
        N: Columns of the float weight (out_features; vocab size for an embedding table).
        bits: 4 or 8.
        block_size: Values per scale along K.
        packed: uint8 `[N, n_blocks, block_size * bits // 8]`, MatMulNBits input B.
        scales: float32 `[N, n_blocks]`.
        zero_points: uint8 `[N, ceil(n_blocks * bits / 8)]`, or None when symmetric, or
            float32 `[N, n_blocks]` (unpacked) for hqq with `float_zero_points`.
    """

    K: int
    N: int
    bits: int
    block_size: int
    packed: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None

    @property
    def n_blocks(self) -> int:
        """Blocks per output column: ceil(K / block_size)."""
        return self.packed.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of the packed data, scales and zero points as stored here (scales float32)."""
        zp = 0 if self.zero_points is None else self.zero_points.nbytes
        return self.packed.nbytes + self.scales.nbytes + zp

    def codes(self) -> np.ndarray:
        """The unpacked integer codes, uint8 `[N, n_blocks * block_size]` (K padded)."""
        return unpack_codes(self.packed, self.bits)

    @property
    def float_zero_points(self) -> bool:
        """Zero points are float32 `[N, n_blocks]` (cast them to the scales' dtype in a graph)."""
        return self.zero_points is not None and self.zero_points.dtype != np.uint8

    def zero_point_values(self) -> np.ndarray:
        """Zero points `[N, n_blocks]`: uint8 (the implicit midpoint when symmetric) or float32."""
        if self.zero_points is None:
            return np.full(self.scales.shape, 1 << (self.bits - 1), dtype=np.uint8)
        if self.float_zero_points:
            return self.zero_points
        return unpack_zero_points(self.zero_points, self.n_blocks, self.bits)

    def dequantize(self) -> np.ndarray:
        """The weight MatMulNBits computes with, float32 `[K, N]` (for references and tests)."""
        codes = self.codes().astype(np.float32).reshape(self.N, self.n_blocks, self.block_size)
        zp = self.zero_point_values().astype(np.float32)[:, :, None]
        w_nk = ((codes - zp) * self.scales[:, :, None]).reshape(self.N, -1)[:, : self.K]
        return np.ascontiguousarray(w_nk.T)

    def gather_data(self) -> np.ndarray:
        """`packed` as GatherBlockQuantized's 2-D uint8 data `[N, n_blocks * blob]`."""
        return self.packed.reshape(self.N, -1)


# ----------------------------------------------------------------------------------------------
# Bit layout


def pack_codes(codes_nk: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """Pack integer codes `[N, K_padded]` into MatMulNBits' B layout.

    Args:
        codes_nk: Codes in [0, 2**bits), shape `[N, n_blocks * block_size]`.
        bits: 4 or 8.
        block_size: Values per block.

    Returns:
        uint8 `[N, n_blocks, block_size * bits // 8]`; at 4 bits the even K index is the low
        nibble, as in onnxruntime's own quantizer.
    """
    n, kp = codes_nk.shape
    codes = codes_nk.astype(np.uint8, copy=False)
    if bits == 8:
        return np.ascontiguousarray(codes.reshape(n, kp // block_size, block_size))
    pairs = codes.reshape(n, kp // 2, 2)
    packed = (pairs[..., 0] & 0x0F) | ((pairs[..., 1] & 0x0F) << 4)
    return np.ascontiguousarray(packed.reshape(n, kp // block_size, block_size // 2))


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of `pack_codes`: uint8 `[N, n_blocks * block_size]`."""
    n = packed.shape[0]
    flat = packed.reshape(n, -1)
    if bits == 8:
        return flat.copy()
    out = np.empty((n, flat.shape[1] * 2), dtype=np.uint8)
    out[:, 0::2] = flat & 0x0F
    out[:, 1::2] = flat >> 4
    return out


def pack_zero_points(zp_nb: np.ndarray, bits: int) -> np.ndarray:
    """Pack zero points `[N, n_blocks]` as MatMulNBits expects (4 bits: two per byte)."""
    zp = zp_nb.astype(np.uint8, copy=False)
    if bits == 8:
        return np.ascontiguousarray(zp)
    n, nb = zp.shape
    if nb % 2:
        # An odd block count leaves the last high nibble unused (MatMulNBits rounds the
        # per-column byte count up); fill it with the midpoint 8 as onnxruntime's quantizer does.
        zp = np.concatenate([zp, np.full((n, 1), 8, np.uint8)], axis=1)
    return np.ascontiguousarray((zp[:, 0::2] & 0x0F) | ((zp[:, 1::2] & 0x0F) << 4))


def unpack_zero_points(zp_packed: np.ndarray, n_blocks: int, bits: int) -> np.ndarray:
    """Inverse of `pack_zero_points`: uint8 `[N, n_blocks]`."""
    if bits == 8:
        return zp_packed[:, :n_blocks].copy()
    out = np.empty((zp_packed.shape[0], zp_packed.shape[1] * 2), dtype=np.uint8)
    out[:, 0::2] = zp_packed & 0x0F
    out[:, 1::2] = zp_packed >> 4
    return out[:, :n_blocks]


def from_codes(
    codes_nk: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
    K: int,
    bits: int,
    block_size: int,
) -> QuantizedWeight:
    """Build a `QuantizedWeight` from unpacked codes, as the hqq and gptq methods produce them.

    Args:
        codes_nk: Integer codes `[N, n_blocks * block_size]` in [0, 2**bits).
        scales: `[N, n_blocks]`.
        zero_points: Zero points `[N, n_blocks]`: integers in [0, 2**bits) (packed to uint8),
            a float array (kept as float32 `[N, n_blocks]`), or None (symmetric).
        K: The unpadded in_features.
        bits: 4 or 8.
        block_size: Values per block.
    """
    n = codes_nk.shape[0]
    return QuantizedWeight(
        K=K,
        N=n,
        bits=bits,
        block_size=block_size,
        packed=pack_codes(codes_nk, bits, block_size),
        scales=np.ascontiguousarray(scales, dtype=np.float32),
        zero_points=None
        if zero_points is None
        else np.ascontiguousarray(zero_points, dtype=np.float32)
        if np.issubdtype(zero_points.dtype, np.floating)
        else pack_zero_points(zero_points, bits),
    )


def padded_nk(w_kn: np.ndarray, block_size: int) -> np.ndarray:
    """`w_kn` transposed to float32 `[N, K_padded]`, K zero-padded to whole blocks."""
    k, n = w_kn.shape
    kp = -(-k // block_size) * block_size
    out = np.zeros((n, kp), dtype=np.float32)
    out[:, :k] = w_kn.T
    return out


# ----------------------------------------------------------------------------------------------
# Methods


def quantize_rtn(w_kn: np.ndarray, spec: QuantSpec) -> QuantizedWeight:
    """Round-to-nearest with onnxruntime's native (MLAS) block quantizer.

    Symmetric: the value of largest magnitude in a block maps to `-2**(bits-1)` (so scales may
    be negative). Asymmetric: the block's range, widened to include 0, maps onto [0, 2**bits-1].
    """
    from onnxruntime.capi import _pybind_state as ort_c

    k, n = w_kn.shape
    bs = spec.block_size
    nb = -(-k // bs)
    w = np.zeros((nb * bs, n), dtype=np.float32)
    w[:k] = w_kn
    packed = np.zeros((n, nb, bs * spec.bits // 8), dtype=np.uint8)
    scales = np.zeros((n, nb), dtype=np.float32)
    zero_points = np.zeros((n, -(-nb * spec.bits // 8)), dtype=np.uint8)
    kernel = ort_c.quantize_matmul_4bits if spec.bits == 4 else ort_c.quantize_matmul_8bits
    # The kernel reads a row-major [K, N] float matrix and writes [N, n_blocks, blob] blocks.
    kernel(packed, w, scales, zero_points, bs, n, nb * bs, spec.symmetric)
    return QuantizedWeight(
        K=k,
        N=n,
        bits=spec.bits,
        block_size=bs,
        packed=packed,
        scales=scales,
        zero_points=None if spec.symmetric else zero_points,
    )


def _quantize_hqq(w_kn: np.ndarray, spec: QuantSpec, calibration: np.ndarray | None):
    from edgepipe.stages.quantize.hqq import quantize_hqq

    return quantize_hqq(w_kn, spec)


def _quantize_gptq(w_kn: np.ndarray, spec: QuantSpec, calibration: np.ndarray | None):
    from edgepipe.stages.quantize.gptq import quantize_gptq

    return quantize_gptq(w_kn, spec, calibration)


def _quantize_rtn(w_kn: np.ndarray, spec: QuantSpec, calibration: np.ndarray | None):
    return quantize_rtn(w_kn, spec)


#: Quantization methods by the name a recipe uses.
METHODS: dict[str, Callable[[np.ndarray, QuantSpec, np.ndarray | None], QuantizedWeight]] = {
    "rtn": _quantize_rtn,
    "hqq": _quantize_hqq,
    "gptq": _quantize_gptq,
}
METHOD_NAMES = tuple(METHODS)
#: Methods that need the layer's input activations.
CALIBRATED_METHODS = frozenset({"gptq"})


def quantize_weight(
    w_kn: np.ndarray,
    spec: QuantSpec,
    *,
    name: str = "",
    calibration: np.ndarray | None = None,
) -> QuantizedWeight:
    """Quantize one linear weight for MatMulNBits.

    Args:
        w_kn: Float weight `[K, N]` (the transpose of a HF `nn.Linear.weight`), any float dtype.
        spec: How to quantize it.
        name: The HF weight name, used in error messages.
        calibration: The layer's input activations `[tokens, K]`; required by gptq.

    Returns:
        The packed weight.

    Raises:
        InvalidInput: The weight is not 2-D or not finite, or gptq got no calibration.
    """
    label = name or "weight"
    w = np.asarray(w_kn)
    if w.ndim != 2 or 0 in w.shape:
        raise InvalidInput(f"{label}: expected a non-empty 2-D [K, N] weight, got shape {w.shape}")
    w = w.astype(np.float32, copy=False)
    if not np.isfinite(w).all():
        raise InvalidInput(f"{label}: weight contains NaN or infinity; check the source model")
    if spec.method in CALIBRATED_METHODS:
        if calibration is None:
            raise InvalidInput(
                f"{label}: method {spec.method!r} needs calibration activations; add calibration "
                "text to the recipe or choose method: rtn or hqq"
            )
        calibration = np.asarray(calibration)
        if calibration.ndim != 2 or calibration.shape[1] != w.shape[0]:
            raise InvalidInput(
                f"{label}: calibration must be [tokens, K={w.shape[0]}], got {calibration.shape}"
            )
    return METHODS[spec.method](w, spec, calibration)


def quantize_embedding(table_vd: np.ndarray, spec: QuantSpec) -> QuantizedWeight:
    """Quantize a `[vocab, hidden]` table along hidden for GatherBlockQuantized.

    The result is the `[K=hidden, N=vocab]` weight of a tied lm_head in MatMulNBits layout, so
    the same initializers serve both ops: GatherBlockQuantized takes `gather_data()` (uint8
    `[vocab, hidden * bits / 8]`), `scales` `[vocab, n_blocks]` and, when asymmetric, the packed
    `zero_points`, with attributes `bits`, `block_size`, `gather_axis=0`, `quantize_axis=1`.
    The spec applied is `embedding_spec(spec, hidden)`: rtn for calibrated methods, and the
    block size shrunk to the largest allowed one dividing hidden.

    Args:
        table_vd: Float embedding table `[vocab, hidden]`.
        spec: How to quantize it.
    """
    table = np.asarray(table_vd)
    if table.ndim != 2:
        raise InvalidInput(f"embedding: expected a 2-D [vocab, hidden] table, got {table.shape}")
    return quantize_weight(table.T, embedding_spec(spec, table.shape[1]), name="embedding")


def embedding_spec(spec: QuantSpec, hidden: int) -> QuantSpec:
    """The spec `quantize_embedding` actually applies to a table `hidden` wide.

    GatherBlockQuantized needs whole blocks along hidden; Qwen2.5-0.5B's 896 = 7 x 128 is not a
    multiple of 256, so the block shrinks to the largest allowed size dividing hidden. A lookup
    table sees no activations, so calibrated methods become rtn. Call this before streaming the
    table to know its layout.

    Raises:
        InvalidInput: No allowed block size divides hidden.
    """
    fitting = [b for b in ALLOWED_BLOCK_SIZES if b <= spec.block_size and hidden % b == 0]
    if not fitting:
        raise InvalidInput(
            f"embedding: hidden size {hidden} is not a multiple of any block size up to "
            f"{spec.block_size} ({', '.join(map(str, ALLOWED_BLOCK_SIZES))}); keep the "
            "embedding in float (embedding: fp16 or fp32)"
        )
    method = "rtn" if spec.method in CALIBRATED_METHODS else spec.method
    # GatherBlockQuantized takes uint8 zero points only.
    return QuantSpec(spec.bits, fitting[-1], spec.symmetric, method, spec.accuracy_level)


# ----------------------------------------------------------------------------------------------
# Plans


@dataclass
class QuantPlan:
    """Which weights are quantized and how; None = keep in float (activation dtype).

    Resolution order in `spec_for`: norms and biases are never quantized; the embedding and
    lm_head get `embedding` / `lm_head` (patterns do not apply to them, as in the recipe
    schema); other weights: `exclude` patterns (float), then `overrides` with the LAST matching
    pattern winning (the recipe schema lets the first win: `from_precision` callers reverse),
    then `default`. Patterns are fnmatch patterns over HF weight names, e.g.
    "model.layers.*.mlp.down_proj.weight" or "model.layers.0.*".

    For a tied model the embedding spec governs the one shared copy (see `quantize_embedding`).
    """

    default: QuantSpec | None
    embedding: QuantSpec | None = None
    lm_head: QuantSpec | None = None
    exclude: tuple[str, ...] = ()
    overrides: tuple[tuple[str, QuantSpec | None], ...] = ()
    field_prefix: str = field(default="precision", compare=False)

    def spec_for(self, weight_name: str) -> QuantSpec | None:
        """The spec for one HF weight name, or None to keep it in float."""
        if _matches_any(weight_name, _NEVER_QUANTIZED):
            return None
        # As in the recipe schema, the embedding and lm_head have fields of their own that
        # patterns do not reach.
        if _matches_any(weight_name, EMBEDDING_PATTERNS):
            return self.embedding
        if _matches_any(weight_name, LM_HEAD_PATTERNS):
            return self.lm_head
        if _matches_any(weight_name, self.exclude):
            return None
        for pattern, spec in reversed(self.overrides):
            if fnmatch.fnmatchcase(weight_name, pattern):
                return spec
        return self.default

    def specs(self) -> list[QuantSpec]:
        """Every spec the plan can hand out."""
        out = [self.default, self.embedding, self.lm_head, *(s for _, s in self.overrides)]
        return [s for s in out if s is not None]

    @property
    def is_quantized(self) -> bool:
        """True when any weight gets quantized."""
        return bool(self.specs())

    def check_patterns(self, names: Iterable[str]) -> None:
        """Raise if an exclude or override pattern matches none of the model's weight names.

        Raises:
            InvalidInput: One problem per unmatched pattern, naming its field.
        """
        names = list(names)
        problems = []
        for i, pattern in enumerate(self.exclude):
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                problems.append(
                    f"{self.field_prefix}.exclude[{i}]: pattern {pattern!r} matches no weight of "
                    f"this model; weight names look like {_examples(names)}"
                )
        for i, (pattern, _) in enumerate(self.overrides):
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                problems.append(
                    f"{self.field_prefix}.overrides[{i}].pattern: pattern {pattern!r} matches no "
                    f"weight of this model; weight names look like {_examples(names)}"
                )
        if problems:
            raise InvalidInput(problems[0], problems)

    def check_calibration(self, has_calibration_text: bool) -> None:
        """Raise if a calibrated method (gptq) is planned but the recipe has no calibration text.

        Raises:
            InvalidInput: Naming the method field and the alternatives.
        """
        if gptq_needs_calibration(self) and not has_calibration_text:
            raise InvalidInput(
                f"{self.field_prefix}.method: gptq needs calibration text; add a calibration "
                "section to the recipe or use method: rtn or hqq (calibration-free)"
            )

    @classmethod
    def from_precision(
        cls,
        weights: str,
        *,
        method: str = "rtn",
        block_size: int = 32,
        symmetric: bool = False,
        accuracy_level: int = 0,
        embedding: str | None = None,
        lm_head: str | None = None,
        exclude: Sequence[str] = (),
        overrides: Sequence[tuple[str, str, int | None]] = (),
        has_calibration_text: bool | None = None,
        float_zero_points: bool = False,
        field_prefix: str = "precision",
    ) -> QuantPlan:
        """Build a plan from a recipe's resolved precision fields (plain values, no schema).

        Args:
            weights: "int4" | "int8" | "fp16" | "fp32" for the linear layers.
            method: "rtn" | "hqq" | "gptq".
            block_size: Power of two in 16..256.
            symmetric: Symmetric (no zero points) or asymmetric.
            accuracy_level: The profile's MatMulNBits accuracy_level, 0..4.
            embedding: Precision of the token embedding; None = same as `weights`.
            lm_head: Precision of the lm_head; None = same as `embedding` (one tied copy).
            exclude: fnmatch patterns of weights kept in float.
            overrides: (pattern, precision, block_size or None) per-layer rules.
            has_calibration_text: When given, gptq without calibration text is an error.
            float_zero_points: hqq only: fractional float zero points for the body weights
                (see `QuantSpec.float_zero_points`); embedding/lm_head keep uint8 ones.
            field_prefix: Names the recipe section in error messages.

        Returns:
            The plan. Embedding/lm_head use rtn when the method is gptq (they see no
            activations the builder collects).

        Raises:
            InvalidInput: Every problem found, each naming its field and the allowed values.
        """
        p = field_prefix
        problems: list[str] = []

        def make(precision: object, fld: str, bs: int, meth: str) -> QuantSpec | None:
            if precision not in ALLOWED_WEIGHT_PRECISIONS:
                problems.append(
                    f"{p}.{fld}: {precision!r} is not a weight precision; allowed values: "
                    f"{', '.join(ALLOWED_WEIGHT_PRECISIONS)}"
                )
                return None
            if precision in ("fp16", "fp32"):
                return None
            bits = 4 if precision == "int4" else 8
            # The side tables follow the method; hqq is asymmetric only, so do not fail twice.
            side = fld in ("embedding", "lm_head")
            sym = False if side and meth == "hqq" else symmetric
            found = spec_problems(bits, bs, sym, meth, accuracy_level, f"{p}.")
            if found:
                problems.extend(found)
                return None
            fzp = float_zero_points and not side and meth == "hqq"
            return QuantSpec(bits, bs, sym, meth, accuracy_level, fzp)

        if float_zero_points and method != "hqq":
            problems.append(
                f"{p}.float_zero_points: only method hqq fits fractional zero points, not "
                f"{method!r}; set float_zero_points: false or method: hqq"
            )
        default = make(weights, "weights", block_size, method)
        side_method = "rtn" if method in CALIBRATED_METHODS else method
        emb = make(embedding or weights, "embedding", block_size, side_method)
        head = make(lm_head or embedding or weights, "lm_head", block_size, side_method)
        rules: list[tuple[str, QuantSpec | None]] = []
        for i, rule in enumerate(overrides):
            if len(rule) != 3 or not isinstance(rule[0], str):
                problems.append(
                    f"{p}.overrides[{i}]: expected (pattern, weights, block_size), got {rule!r}"
                )
                continue
            pattern, precision, bs = rule
            rules.append(
                (pattern, make(precision, f"overrides[{i}].weights", bs or block_size, method))
            )
        plan = cls(default, emb, head, tuple(exclude), tuple(rules), field_prefix=p)
        if has_calibration_text is not None and not problems:
            try:
                plan.check_calibration(has_calibration_text)
            except InvalidInput as exc:
                problems.extend(exc.problems)
        if problems:
            raise InvalidInput(problems[0], problems)
        return plan


def gptq_needs_calibration(plan: QuantPlan) -> bool:
    """True when some weight of `plan` uses a calibrated method, so the builder must collect
    each layer's input activations (see `edgepipe.stages.quantize.gptq_inputs`)."""
    return any(spec.method in CALIBRATED_METHODS for spec in plan.specs())


def _matches_any(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _examples(names: list[str]) -> str:
    return ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
