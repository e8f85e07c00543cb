"""Which positions reach the lm_head: the last `logits_to_keep` of each call.

The shipped decoder computes the lm_head (a [hidden, 151936] product) only for the positions a
caller needs: one when prefilling or decoding, K + 1 when a speculative step verifies K drafts
(`edgepipe.runtime.speculative`). The count is the graph input `logits_to_keep`, which is ALSO
an initializer holding 1: onnxruntime treats such an input as an *overridable initializer*
(ir_version >= 4). It is missing from `session.get_inputs()`, so a caller that does not know it
(onnxruntime-genai feeds exactly the inputs its genai_config names) runs the graph as if it held
1, while `edgepipe.runtime` binds K + 1 on verify steps (with `bind_ortvalue_input`: the Python
`bind_cpu_input` looks the name up among the required inputs only and fails). Being an input,
not a constant, it is not folded by onnxruntime's optimizer, and onnxruntime logs a warning
about it when a session loads the graph (which sessions edgepipe opens quietly).

The logits come out `[batch * kept, 1, vocab]`, batch-major, not `[batch, kept, vocab]`: the
declared shape is `[batch, 1, vocab]` with a fixed 1, which onnxruntime-genai reads as "this
graph returns last-position logits" (its `Model::IsPruned`; with a symbolic dimension it binds a
`[batch, sequence, vocab]` output buffer and the run fails), and onnxruntime logs a warning on
every run whose output contradicts a fixed declared dimension. Folding the kept rows into the
first (symbolic) dimension keeps both the fixed 1 and quiet runs; with the default 1 the output
is exactly `[batch, 1, vocab]` as before.

`logits_to_keep` = 0 keeps every position (a Slice from -0 = 0), as transformers' does.

Cost with the default 1, measured against the previous graph (a constant Slice from -1) on the
trained tiny model (vocab 151936, so the lm_head is most of the work), optimized fp32 and int4,
128-token prefill and 48-token decode, 30 alternated rounds, twice, on a shared 2-core VM (load
3-4): paired after/before ratio medians 0.98-1.02 for prefill, 0.84-0.97 for decode, with
quartiles about 15% either side, i.e. nothing above the noise; binding the input costs the
runtime 0.4 us per call.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgepipe.formats.onnx_writer import GraphWriter
from edgepipe.runtime.engines.dynamic import LOGITS_TO_KEEP

# The first dimension of the logits output: batch x kept positions (batch when 1 is kept).
KEPT_ROWS = "batch_size_x_kept"


def logits_to_keep_input(writer: GraphWriter) -> ir.Value:
    """The `logits_to_keep` graph input: an int64 scalar initializer holding 1.

    Pass the returned value among the graph's inputs too: listed in both, it is overridable.
    """
    return writer.const(LOGITS_TO_KEEP, np.array(1, np.int64))


def keep_last_positions(writer: GraphWriter, name: str, x: ir.Value, keep: ir.Value) -> ir.Value:
    """`x[:, -keep:, :]`: every position when keep is 0 or more than the call feeds.

    Args:
        writer: the graph.
        name: the nodes' prefix.
        x: `[batch, sequence, hidden]`.
        keep: the int64 count, a scalar or `[1]` (`logits_to_keep_input`).

    Returns:
        `[batch, kept, hidden]`, kept = min(keep, sequence) (sequence when keep is 0).
    """
    # 0 - keep, shaped [1] by broadcasting a scalar or [1] keep against [0]. Sub, not Neg: the
    # CPU profiles' op lists do not name Neg.
    zero = writer.const(f"{name}/keep_zero", np.array([0], np.int64))
    start = writer.op("Sub", f"{name}/keep_start", [zero, keep])
    end = writer.const(f"{name}/keep_end", np.array([np.iinfo(np.int64).max], np.int64))
    axes = writer.const(f"{name}/keep_axes", np.array([1], np.int64))
    return writer.op("Slice", f"{name}/last_positions", [x, start, end, axes])


def fold_kept_positions(writer: GraphWriter, name: str, logits: ir.Value, vocab: int) -> ir.Value:
    """`[batch, kept, vocab]` -> `[batch * kept, 1, vocab]` (see the module docstring)."""
    shape = writer.const(f"{name}/kept_rows_shape", np.array([-1, 1, vocab], np.int64))
    return writer.op("Reshape", f"{name}/kept_rows", [logits, shape])
