"""The quality report: how far a quantized build's predictions are from the float reference.

Everything is computed from two *logits functions* — token ids `[seq]` → logits `[seq, vocab]`
for every position — so the report does not care how logits are produced: two ORT artifacts
(`ort_logits_fn`), a transformers model, or a numpy reference. Over evaluation text cut into
windows it measures, per predicted position:

* mean KL(reference ‖ candidate) of the next-token distributions (nats);
* top-1 agreement: both argmaxes equal;
* perplexity of each model on the actual next tokens;

and, from a few prompts, greedy-sequence agreement: each model greedily continues the prompt on
its own for `greedy_steps` tokens and we count the positions where both chose the same token.

Log-softmax runs in float64 over row chunks, so fp16 logits and a 151936-token vocabulary are
both fine (memory stays at a few rows × vocab).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgepipe.errors import InvalidInput

#: token ids `[seq]` int64 → logits `[seq, vocab]` for every position.
LogitsFn = Callable[[np.ndarray], np.ndarray]

#: (prompt ids `[n]`, steps) → the `steps` greedily generated token ids.
GreedyFn = Callable[[np.ndarray, int], Sequence[int] | np.ndarray]

# Rows of logits converted to float64 at once: 32 x 151936 x 8 B = 39 MB per temporary.
_ROW_CHUNK = 32


@dataclass(frozen=True)
class QualityReport:
    """Candidate vs reference on evaluation text; plain data, see `to_dict()`.

    Attributes:
        mean_kl: Mean KL(reference ‖ candidate) per predicted position, nats (>= 0).
        max_kl: Largest per-position KL.
        top1_agreement: Fraction of positions where both models' argmax agree, in [0, 1].
        reference_perplexity: Perplexity of the reference on the evaluation tokens.
        candidate_perplexity: Perplexity of the candidate on the same tokens.
        greedy_agreement: Fraction of identical tokens over the greedy continuations (None
            when no prompts were given).
        greedy_exact: Fraction of prompts whose greedy continuations are identical.
        positions: Predicted positions evaluated.
        windows: Evaluation windows.
        greedy_steps: Greedy tokens generated per prompt and model.
        greedy_prompts: Prompts used for greedy agreement.
    """

    mean_kl: float
    max_kl: float
    top1_agreement: float
    reference_perplexity: float
    candidate_perplexity: float
    greedy_agreement: float | None
    greedy_exact: float | None
    positions: int
    windows: int
    greedy_steps: int
    greedy_prompts: int

    def to_dict(self) -> dict:
        """JSON-ready dict (the manifest's `quality` entry)."""
        return asdict(self)

    def summary(self) -> str:
        """One line for the end of a build."""
        greedy = (
            ""
            if self.greedy_agreement is None
            else f", greedy agreement {self.greedy_agreement:.3f}"
        )
        return (
            f"KL {self.mean_kl:.4f} nats, top-1 agreement {self.top1_agreement:.3f}, "
            f"perplexity {self.reference_perplexity:.3f} -> {self.candidate_perplexity:.3f}"
            f"{greedy} ({self.positions} positions)"
        )


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax over the last axis, in float64."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare_logits(
    ref_logits: np.ndarray, cand_logits: np.ndarray, targets: np.ndarray
) -> dict[str, np.ndarray]:
    """Per-position KL, top-1 agreement and both NLLs for aligned logits `[n, vocab]`.

    Args:
        ref_logits: Reference logits `[n, vocab]`.
        cand_logits: Candidate logits `[n, vocab]`.
        targets: The actual next token at each of the n positions.

    Returns:
        Arrays of length n: "kl", "agree" (bool), "ref_nll", "cand_nll".
    """
    if ref_logits.shape != cand_logits.shape or ref_logits.ndim != 2:
        raise InvalidInput(
            f"logits: reference {ref_logits.shape} and candidate {cand_logits.shape} must both "
            "be [positions, vocab]; check that both models share a vocabulary"
        )
    n = ref_logits.shape[0]
    out = {k: np.empty(n) for k in ("kl", "ref_nll", "cand_nll")}
    out["agree"] = np.empty(n, dtype=bool)
    rows = np.arange(n)
    for s in range(0, n, _ROW_CHUNK):
        sl = slice(s, s + _ROW_CHUNK)
        lp = log_softmax(ref_logits[sl])
        lq = log_softmax(cand_logits[sl])
        # Terms with p = 0 contribute 0 (exp(-inf) * finite); clip guards -inf - -inf.
        out["kl"][sl] = np.maximum(np.sum(np.exp(lp) * (lp - lq), axis=-1), 0.0)
        out["agree"][sl] = lp.argmax(-1) == lq.argmax(-1)
        t = targets[sl]
        r = rows[: t.shape[0]]
        out["ref_nll"][sl] = -lp[r, t]
        out["cand_nll"][sl] = -lq[r, t]
    return out


def token_windows(
    token_ids: Sequence[int] | np.ndarray, window: int, max_windows: int | None = None
) -> list[np.ndarray]:
    """Cut evaluation tokens into non-overlapping windows of `window` tokens (last one may be
    shorter but has at least 2 tokens)."""
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    out = [ids[i : i + window] for i in range(0, ids.shape[0], window)]
    out = [w for w in out if w.shape[0] >= 2]
    return out[:max_windows] if max_windows else out


def greedy_continuation(logits_fn: LogitsFn, prompt: np.ndarray, steps: int) -> np.ndarray:
    """`steps` greedy tokens after `prompt`, recomputing the whole sequence each step.

    Quadratic in length, which is fine for the short continuations the report uses and keeps
    the logits-function interface stateless.
    """
    seq = np.asarray(prompt, dtype=np.int64).reshape(-1)
    out = []
    for _ in range(steps):
        nxt = int(np.argmax(logits_fn(seq)[-1]))
        out.append(nxt)
        seq = np.append(seq, nxt)
    return np.asarray(out, dtype=np.int64)


def quality_report(
    reference_logits_fn: LogitsFn,
    candidate_logits_fn: LogitsFn,
    token_ids: Sequence[int] | np.ndarray,
    *,
    window: int = 256,
    max_windows: int | None = None,
    prompts: Sequence[Sequence[int]] = (),
    greedy_steps: int = 32,
    reference_greedy_fn: GreedyFn | None = None,
    candidate_greedy_fn: GreedyFn | None = None,
) -> QualityReport:
    """Compare a candidate model with the reference on evaluation tokens.

    Args:
        reference_logits_fn: ids `[seq]` → logits `[seq, vocab]` of the unquantized model.
        candidate_logits_fn: The same for the quantized model.
        token_ids: Tokenized evaluation text (1-D).
        window: Tokens per evaluation window; each window is scored as a fresh sequence.
        max_windows: Evaluate at most this many windows.
        prompts: Token-id prompts for greedy agreement; empty skips it.
        greedy_steps: Greedy tokens per prompt.
        reference_greedy_fn: (prompt ids, steps) → greedy token ids, e.g. a KV-cached
            generator; default re-runs `reference_logits_fn` on the growing sequence.
        candidate_greedy_fn: The same for the candidate.

    Returns:
        The report.

    Raises:
        InvalidInput: Fewer than 2 evaluation tokens, or logits of the wrong shape.
    """
    if window < 2:
        raise InvalidInput(f"window: {window} must be at least 2 tokens")
    windows = token_windows(token_ids, window, max_windows)
    if not windows:
        raise InvalidInput("evaluation text: needs at least 2 tokens; add evaluation text")
    parts: dict[str, list[np.ndarray]] = {"kl": [], "agree": [], "ref_nll": [], "cand_nll": []}
    for ids in windows:
        ref = _checked(reference_logits_fn(ids), ids, "reference")
        cand = _checked(candidate_logits_fn(ids), ids, "candidate")
        # Position i predicts token i + 1; the last position has no target.
        stats = compare_logits(ref[:-1], cand[:-1], ids[1:])
        for k, v in stats.items():
            parts[k].append(v)
    cat = {k: np.concatenate(v) for k, v in parts.items()}

    agreement = exact = None
    if prompts and greedy_steps > 0:
        same, identical = [], []
        ref_greedy = reference_greedy_fn or _greedy_from(reference_logits_fn)
        cand_greedy = candidate_greedy_fn or _greedy_from(candidate_logits_fn)
        for prompt in prompts:
            a = np.asarray(ref_greedy(np.asarray(prompt, dtype=np.int64), greedy_steps))
            b = np.asarray(cand_greedy(np.asarray(prompt, dtype=np.int64), greedy_steps))
            if a.shape != (greedy_steps,) or b.shape != (greedy_steps,):
                raise InvalidInput(
                    f"greedy functions must return {greedy_steps} token ids, got {a.shape} "
                    f"and {b.shape}"
                )
            same.append(np.mean(a == b))
            identical.append(bool(np.array_equal(a, b)))
        agreement, exact = float(np.mean(same)), float(np.mean(identical))

    return QualityReport(
        mean_kl=float(cat["kl"].mean()),
        max_kl=float(cat["kl"].max()),
        top1_agreement=float(cat["agree"].mean()),
        reference_perplexity=perplexity(cat["ref_nll"]),
        candidate_perplexity=perplexity(cat["cand_nll"]),
        greedy_agreement=agreement,
        greedy_exact=exact,
        positions=int(cat["kl"].shape[0]),
        windows=len(windows),
        greedy_steps=greedy_steps if prompts else 0,
        greedy_prompts=len(prompts),
    )


def perplexity(nll: np.ndarray) -> float:
    """exp(mean NLL); inf instead of an OverflowError past float range (a wild random model)."""
    mean = float(np.mean(nll))
    return math.exp(mean) if mean < 709.0 else math.inf


def _greedy_from(logits_fn: LogitsFn) -> GreedyFn:
    return lambda prompt, steps: greedy_continuation(logits_fn, prompt, steps)


def _checked(logits: np.ndarray, ids: np.ndarray, which: str) -> np.ndarray:
    logits = np.asarray(logits)
    if logits.ndim == 3 and logits.shape[0] == 1:
        logits = logits[0]
    if logits.ndim != 2 or logits.shape[0] != ids.shape[0]:
        raise InvalidInput(
            f"{which} logits: expected [{ids.shape[0]}, vocab] for {ids.shape[0]} tokens, got "
            f"{logits.shape}; the logits function must return every position (all_logits=True "
            "export, or use ort_logits_fn which steps a last-position model token by token)"
        )
    return logits


# ----------------------------------------------------------------------------------------------
# ORT artifacts (docs/contracts.md: dynamic decoder graph)

_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def ort_logits_fn(model_dir: str | Path, *, providers: Sequence[str] | None = None) -> LogitsFn:
    """A logits function over an artifact folder's `model.onnx` (dynamic decoder contract).

    With an `all_logits=True` export one run returns every position. A default export returns
    only the last position; then the sequence is fed one token at a time with the KV cache
    (present → past), which yields the same per-position logits, slower.

    Args:
        model_dir: Folder holding `model.onnx` (and `model.onnx.data`).
        providers: ORT execution providers; default CPU.
    """
    import onnxruntime as ort

    path = Path(model_dir) / "model.onnx"
    if not path.is_file():
        raise InvalidInput(f"{model_dir}: no model.onnx; pass an export or artifact folder")
    options = ort.SessionOptions()
    session = ort.InferenceSession(
        str(path), options, providers=list(providers or ["CPUExecutionProvider"])
    )
    past = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]

    def empty_past() -> dict[str, np.ndarray]:
        feeds = {}
        for i in past:
            _, heads, _, head_dim = i.shape
            feeds[i.name] = np.zeros((1, heads, 0, head_dim), _ORT_DTYPES[i.type])
        return feeds

    def run(ids: np.ndarray, past_feeds: dict, total: int) -> tuple[np.ndarray, dict]:
        feeds = {
            "input_ids": ids[None].astype(np.int64),
            "attention_mask": np.ones((1, total), np.int64),
            **past_feeds,
        }
        names = [o.name for o in session.get_outputs()]
        outs = dict(zip(names, session.run(None, feeds), strict=True))
        present = {
            n.replace("present.", "past_key_values.", 1): v
            for n, v in outs.items()
            if n.startswith("present.")
        }
        return outs["logits"][0], present

    def logits_fn(ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        logits, present = run(ids, empty_past(), ids.shape[0])
        if logits.shape[0] == ids.shape[0]:
            return logits.astype(np.float32)
        rows = [run(ids[:1], empty_past(), 1)]
        for t in range(1, ids.shape[0]):
            rows.append(run(ids[t : t + 1], rows[-1][1], t + 1))
        return np.concatenate([r[0] for r in rows]).astype(np.float32)

    return logits_fn


def compare_artifacts(
    reference_dir: str | Path,
    candidate_dir: str | Path,
    token_ids: Sequence[int] | np.ndarray,
    *,
    providers: Sequence[str] | None = None,
    **kwargs,
) -> QualityReport:
    """`quality_report` between two ORT artifact folders (e.g. fp32 export vs int4 build).

    Args:
        reference_dir: The unquantized export.
        candidate_dir: The quantized build.
        token_ids: Tokenized evaluation text.
        providers: ORT execution providers for both sessions.
        **kwargs: Passed to `quality_report` (window, max_windows, prompts, greedy_steps).
    """
    return quality_report(
        ort_logits_fn(reference_dir, providers=providers),
        ort_logits_fn(candidate_dir, providers=providers),
        token_ids,
        **kwargs,
    )
