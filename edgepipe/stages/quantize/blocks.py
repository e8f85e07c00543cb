"""Quantized weight blocks: the spec of one weight and its MatMulNBits layout (a leaf module).

Every quantization method (`rtn`, `hqq`, `gptq`) produces a `QuantizedWeight` through this
module; the plan of which weight gets which spec is `edgepipe.stages.quantize.plan`.

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

"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgepipe.errors import InvalidInput

ALLOWED_BITS = (4, 8)
ALLOWED_BLOCK_SIZES = (16, 32, 64, 128, 256)
ALLOWED_ACCURACY_LEVELS = (0, 1, 2, 3, 4)
#: The quantization methods, by the name a recipe uses (`edgepipe.stages.quantize.plan.METHODS`
#: maps each to its function; the recipe schema's `Method` lists the same names).
METHOD_NAMES = ("rtn", "hqq", "gptq")
#: Methods that need the layer's input activations (calibration text).
CALIBRATED_METHODS = frozenset({"gptq"})


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
