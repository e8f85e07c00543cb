"""Which weights are quantized and how (`QuantPlan`), and the methods that do it (`METHODS`).

The export stage streams weights one at a time and calls `quantize_weight` (linear layers) or
`quantize_embedding` (the token table, shared with a tied lm_head). Which weights are quantized,
and how, is a `QuantPlan`, built from the recipe's `ResolvedPrecision` as is
(`QuantPlan.from_resolved`); a single weight's recipe is a `QuantSpec` and its packed result a
`QuantizedWeight` (`edgepipe.stages.quantize.blocks`, which documents the MatMulNBits layout).

Methods (`METHODS`, keyed by the name a recipe uses):

* `rtn`: onnxruntime's native block quantizer (MLAS), min-max or abs-max round-to-nearest.
* `hqq`: half-quadratic quantization (calibration-free, asymmetric), see
  `edgepipe.stages.quantize.hqq`.
* `gptq`: Hessian-aware error feedback from layer input activations, see
  `edgepipe.stages.quantize.gptq`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from edgepipe.errors import InvalidInput
from edgepipe.schema.precision import Override, ResolvedPrecision, tied_table
from edgepipe.stages.quantize.blocks import (
    ALLOWED_BLOCK_SIZES,
    CALIBRATED_METHODS,
    METHOD_NAMES,
    QuantizedWeight,
    QuantSpec,
)
from edgepipe.stages.quantize.gptq import quantize_gptq
from edgepipe.stages.quantize.hqq import quantize_hqq
from edgepipe.stages.quantize.rtn import quantize_rtn

EMBEDDING_PATTERNS = ("model.embed_tokens.weight", "*embed_tokens.weight")
LM_HEAD_PATTERNS = ("lm_head.weight", "*lm_head.weight")
# Weights that are never matrix-multiplied and so never quantized, whatever a pattern says.
_NEVER_QUANTIZED = ("*norm*", "*.bias")

#: Quantization methods by the name a recipe uses; each takes (w_kn, spec, calibration).
METHODS: dict[str, Callable[[np.ndarray, QuantSpec, np.ndarray | None], QuantizedWeight]] = {
    "rtn": lambda w, spec, calibration: quantize_rtn(w, spec),
    "hqq": lambda w, spec, calibration: quantize_hqq(w, spec),
    "gptq": quantize_gptq,
}
assert tuple(METHODS) == METHOD_NAMES, "blocks.METHOD_NAMES lists the methods of METHODS"


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
    schema); other weights: `exclude` patterns (float), then the FIRST matching override, then
    `default` (the order of `ResolvedPrecision.for_weight`, docs/contracts.md). Patterns are
    fnmatch patterns over HF weight names, e.g. "model.layers.*.mlp.down_proj.weight" or
    "model.layers.0.*".

    A tied model's one table follows `edgepipe.schema.precision.tied_table` (`for_model`).
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
        for pattern, spec in self.overrides:
            if fnmatch.fnmatchcase(weight_name, pattern):
                return spec
        return self.default

    def for_model(self, tie_word_embeddings: bool) -> QuantPlan:
        """The plan as a model with (or without) a tied lm_head gets it.

        A tied model has one table: `tied_table` (the schema's rule, also behind the manifest's
        `ResolvedPrecision.for_model`) picks the more precise of `embedding` / `lm_head`, and
        both fields get its spec (None: a float table, Gather + Gemm). A float embedding with a
        quantized head keeps both specs: the head quantizes a copy of its own.
        """
        if not tie_word_embeddings:
            return self
        sides = {_precision_of(self.embedding): self.embedding}
        sides.setdefault(_precision_of(self.lm_head), self.lm_head)
        table = tied_table(_precision_of(self.embedding), _precision_of(self.lm_head))
        if table is None:
            return self
        return replace(self, embedding=sides[table], lm_head=sides[table])

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

    @property
    def needs_calibration(self) -> bool:
        """True when some weight uses a calibrated method (`CALIBRATED_METHODS`): the builder
        must then collect each layer's input activations (`stages.quantize.gptq_inputs`)."""
        return any(spec.method in CALIBRATED_METHODS for spec in self.specs())

    @classmethod
    def from_resolved(
        cls,
        precision: ResolvedPrecision,
        *,
        float_zero_points: bool = False,
        field_prefix: str = "precision",
    ) -> QuantPlan:
        """The MatMulNBits plan of a resolved precision, taken as is (the schema checked it).

        Args:
            precision: `recipe.precision_for(profile)` of a dynamic profile.
            float_zero_points: hqq only: fractional float zero points for the body weights
                (see `QuantSpec.float_zero_points`); embedding/lm_head keep uint8 ones.
            field_prefix: Names the recipe section in `check_patterns` messages.

        Returns:
            The plan. The embedding and lm_head use rtn when the method is calibrated (they see
            no activations the builder collects), and are asymmetric under hqq.

        Raises:
            InvalidInput: `float_zero_points` with a method other than hqq.
            ValueError: quantized weights without a block size (a static profile's precision:
                static graphs use `edgepipe.stages.quantize.qdq.StaticQuant`).
        """
        r = precision
        if float_zero_points and r.method != "hqq":
            message = (
                f"{field_prefix}.float_zero_points: only method hqq fits fractional zero points, "
                f"not {r.method!r}; set float_zero_points: false or method: hqq"
            )
            raise InvalidInput(message)
        side_method = "rtn" if r.method in CALIBRATED_METHODS else r.method

        def make(weights: str, block_size: int | None, side: bool = False) -> QuantSpec | None:
            if weights not in ("int4", "int8"):
                return None  # fp16 / fp32: kept in float
            if block_size is None:
                raise ValueError(f"{r.profile}: MatMulNBits needs a block size (static profile?)")
            method = side_method if side else r.method
            # hqq fits a zero point per block: its side tables are asymmetric whatever the body
            # says (a symmetric hqq body is refused by the schema, and by QuantSpec).
            symmetric = r.symmetric and not (side and method == "hqq")
            fzp = float_zero_points and not side
            bits = 4 if weights == "int4" else 8
            return QuantSpec(bits, block_size, symmetric, method, r.accuracy_level, fzp)

        return cls(
            default=make(r.weights, r.block_size),
            embedding=make(r.embedding, r.block_size, side=True),
            lm_head=make(r.lm_head, r.block_size, side=True),
            exclude=tuple(r.exclude),
            overrides=tuple(
                (o.pattern, make(o.weights, o.block_size or r.block_size)) for o in r.overrides
            ),
            field_prefix=field_prefix,
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
        float_zero_points: bool = False,
    ) -> QuantPlan:
        """A plan from plain values, for code and tests that have no recipe: the values become
        a `ResolvedPrecision` (pydantic checks their types) and go through `from_resolved`.

        Args:
            weights: "int4" | "int8" | "fp16" | "fp32" for the linear layers.
            method: "rtn" | "hqq" | "gptq".
            block_size: Power of two in 16..256.
            symmetric: Symmetric (no zero points) or asymmetric.
            accuracy_level: MatMulNBits accuracy_level, 0..4.
            embedding: Precision of the token embedding; None = same as `weights`.
            lm_head: Precision of the lm_head; None = same as `embedding` (one tied copy).
            exclude: fnmatch patterns of weights kept in float.
            overrides: (pattern, precision, block_size or None) rules; the first match wins.
            float_zero_points: See `from_resolved`.
        """
        resolved = ResolvedPrecision(
            profile="(code)",
            weights=weights,
            method=method,
            block_size=block_size,
            symmetric=symmetric,
            accuracy_level=accuracy_level,
            embedding=embedding or weights,
            lm_head=lm_head or embedding or weights,
            exclude=tuple(exclude),
            overrides=tuple(
                Override(pattern=p, weights=w, block_size=bs) for p, w, bs in overrides
            ),
        )
        return cls.from_resolved(resolved, float_zero_points=float_zero_points)


def _precision_of(spec: QuantSpec | None) -> str:
    # A float side is stored in the activation dtype; for `tied_table` any float outranks int8.
    return "fp32" if spec is None else f"int{spec.bits}"


def _matches_any(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _examples(names: list[str]) -> str:
    return ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
