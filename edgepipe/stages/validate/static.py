"""The validate stage for static (NPU) artifacts: the QDQ graphs on the simulated HTP.

onnxruntime-qnn's HTP backend runs in simulation on x86-64, so this stage proves on the build
machine what a Snapdragon device would do:

1. **Placement and compile.** Both QDQ graphs are opened on the QNN provider with
   `session.disable_cpu_ep_fallback=1` (a node the HTP refuses is an error, not a silent CPU
   fallback) and `ep.context_enable=1`, so the same compile writes the EPContext graphs and their
   HTP context binaries for the profile's `soc_model` / `htp_arch`.
2. **Accuracy.** The evaluation text runs through prefill calls (full chunks and a left-padded
   partial chunk) and then decode steps, on the HTP, on CPU over the same QDQ graphs, and on CPU
   over the fp32 static graphs (the reference). Logits rows are compared with
   `edgepipe.stages.validate.metrics.compare_logits` (cosine, top-1 agreement, KL, perplexity
   ratio) and the recipe's thresholds; the HTP-vs-CPU agreement of the same QDQ graphs is
   reported too.
3. **EPContext.** The compiled graphs are loaded in fresh sessions and replay the schedule up to
   its first decode step: they must give the logits of the sessions that compiled them.
4. **Quality on the whole evaluation text.** The simulator costs about 55 ns per weight element
   per call (a 151936 x 128 lm_head takes ~1 s), so the HTP sees a bounded schedule
   (`EVAL_DECODE_STEPS` decode steps after up to `EVAL_PREFILL_CHUNKS` prefill calls): about ten
   logits rows, too few to measure quality (top-1 moves in steps of 10%). The quality report is
   therefore computed on CPU over the same QDQ graphs, teacher-forced through the decode graph
   on every evaluation token (up to the KV capacity), against the fp32 graphs: KL, top-1,
   perplexities, cosine and greedy agreement. It stands for the HTP only because step 2 shows
   the HTP and CPU agree on those graphs (`HTP_AGREEMENT`); the recipe's thresholds apply to both
   the HTP rows and the whole-text report.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from edgepipe.errors import BuildFailed
from edgepipe.stages.validate.metrics import check_thresholds, compare_logits, quality_report
from edgepipe.stages.validate.runner import CPU

QNN = "QNNExecutionProvider"
STAGES = ("prefill", "decode")
EVAL_PREFILL_CHUNKS = 1.5  # a full chunk, then a left-padded half chunk
EVAL_DECODE_STEPS = 8
# A compiled EPContext graph runs the same HTP program as the session that compiled it.
EP_CONTEXT_TOLERANCE = 1e-4
# Logits cosine of the HTP vs CPU over the same QDQ graphs below which the CPU quality report
# would not describe the device (measured 0.999996-0.999997 on w8a16 and w4a16 builds).
HTP_AGREEMENT = 0.999
NO_FALLBACK = "disabled (session.disable_cpu_ep_fallback=1)"
# Greedy agreement: a prompt of this many evaluation tokens, continued this many steps.
GREEDY_TOKENS = 16


def context_file(stage: str) -> str:
    """The EPContext graph name of a stage (onnxruntime writes `<name>_qnn.bin` beside it)."""
    return f"{stage}_ctx.onnx"


def evaluation_schedule(n_ids: int, chunk: int) -> tuple[int, int]:
    """(tokens fed by prefill calls, decode steps) for `n_ids` evaluation tokens: every row
    predicts a known next token, so the last evaluated position is `n_ids - 2`."""
    usable = n_ids - 1
    prefill = max(1, min(int(EVAL_PREFILL_CHUNKS * chunk), usable - 1))
    return prefill, max(0, min(EVAL_DECODE_STEPS, usable - prefill))


def run_schedule(pipeline, ids: list[int], prefill_tokens: int, decode_steps: int):
    """Logits rows of the schedule and the position each row predicts from.

    Prefill rows are the last token of each chunk call, decode rows every step.
    """
    cache = pipeline.new_cache()
    rows, positions = [], []
    for begin in range(0, prefill_tokens, pipeline.chunk):
        part = ids[begin : min(begin + pipeline.chunk, prefill_tokens)]
        rows.append(pipeline.prefill(cache, part))
        positions.append(begin + len(part) - 1)
    for t in range(prefill_tokens, prefill_tokens + decode_steps):
        rows.append(pipeline.step(cache, ids[t]))
        positions.append(t)
    return np.stack(rows), positions


def teacher_forced(pipeline, ids: list[int], progress=None) -> np.ndarray:
    """Next-token logits after every prefix of `ids` (at most the KV capacity of them),
    `[n, vocab]`: one decode-graph call per token, from an empty cache."""
    cache = pipeline.new_cache()
    rows = []
    for t, token in enumerate(ids[: pipeline.capacity]):
        rows.append(pipeline.step(cache, token))
        if progress is not None and (t + 1) % 64 == 0:
            progress(f"{t + 1}/{min(len(ids), pipeline.capacity)} tokens")
    return np.stack(rows)


def greedy(pipeline, prompt: list[int], steps: int) -> list[int]:
    """Greedy continuation of `prompt` (prefill graph, then decode steps), at most `steps`
    tokens and never past the cache."""
    cache = pipeline.new_cache()
    logits = pipeline.prefill(cache, prompt)
    out = []
    for _ in range(steps):
        out.append(int(np.argmax(logits)))
        if cache.length >= pipeline.capacity or len(out) == steps:
            break
        logits = pipeline.step(cache, out[-1])
    return out


def quality_on_cpu(cpu_qdq, reference, ids: list[int], progress=None) -> dict:
    """The quality block (`metrics.quality_report`) of the QDQ graphs against the fp32 graphs,
    both on CPU, over the whole evaluation text (see step 4 of the module docstring)."""
    say = progress or (lambda message: None)
    n = min(len(ids), cpu_qdq.capacity)
    say(f"quality report: {n} evaluation tokens through the QDQ graphs on CPU")
    rows = teacher_forced(cpu_qdq, ids[:n], say)
    ref = teacher_forced(reference, ids[:n])
    prompt = ids[: min(GREEDY_TOKENS, n - 1)]
    steps = max(1, min(GREEDY_TOKENS, cpu_qdq.capacity - len(prompt)))
    return quality_report(
        rows,
        ref,
        ids[:n],
        reference="fp32-static-cpu",
        provider=f"{CPU} (the same QDQ graphs the HTP runs)",
        greedy=(greedy(cpu_qdq, prompt, steps), greedy(reference, prompt, steps)),
    )


def _row_ids(ids: list[int], positions: list[int]) -> list[int]:
    # compare_logits scores row r against ids[r + 1]: give it each row's own next token.
    return [ids[positions[0]]] + [ids[p + 1] for p in positions]


def _pipeline(sessions, num_layers: int, pad_token_id: int):
    from edgepipe.runtime.engines.static import StaticPipeline

    return StaticPipeline(*sessions, num_layers=num_layers, pad_token_id=pad_token_id)


def _cpu_sessions(folder: Path, files):
    import onnxruntime as ort

    return [ort.InferenceSession(str(folder / f), providers=[CPU]) for f in files]


def compile_on_htp(qdq_dir: Path, out_dir: Path, files, provider_options: Mapping):
    """Open the QDQ graphs on the simulated HTP (no CPU fallback) and write their EPContext
    graphs into `out_dir`.

    Returns:
        (sessions, context graph names).

    Raises:
        BuildFailed: a node is not accepted by the HTP, or the compile fails.
    """
    from edgepipe.runtime.qnn import qnn_session

    sessions, contexts = [], []
    for stage, name in zip(STAGES, files, strict=True):
        target = out_dir / context_file(stage)
        config = {
            "ep.context_enable": "1",
            "ep.context_file_path": str(target),
            "ep.context_embed_mode": "0",
        }
        try:
            sessions.append(qnn_session(qdq_dir / name, provider_options, config=config))
        except Exception as exc:  # onnxruntime raises Fail / EPFail / InvalidGraph
            raise BuildFailed(
                f"validate: {name} does not compile for the HTP with CPU fallback disabled "
                f"(every node must run on {QNN}): {exc}"
            ) from exc
        if not target.is_file():
            raise BuildFailed(f"validate: the QNN provider wrote no EPContext graph {target}")
        contexts.append(target.name)
    return sessions, contexts


def validate_static(
    qdq_dir: Path,
    reference_dir: Path,
    ids: list[int],
    *,
    files: tuple[str, str],
    num_layers: int,
    pad_token_id: int,
    provider_options: Mapping,
    thresholds: Mapping | None = None,
    context_dir: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Validate the QDQ graphs of `qdq_dir` on the simulated HTP against the fp32 static graphs.

    Args:
        qdq_dir: the QDQ prefill/decode graphs.
        reference_dir: the fp32 static graphs of the same model (the reference).
        ids: evaluation token ids.
        files: the (prefill, decode) graph names.
        num_layers, pad_token_id: for the pipeline driver.
        provider_options: the profile's QNN options (backend_type, soc_model, htp_arch, ...).
        thresholds: `max_<metric>` / `min_<metric>` bounds.
        context_dir: where the EPContext graphs go (default `qdq_dir`).
        progress: called with a short status line.

    Returns:
        The report: metrics of `compare_logits` (HTP vs fp32, the schedule's rows),
        `htp_vs_cpu`, `cpu_qdq` (CPU QDQ vs fp32, the same rows), `quality` (the whole-text
        report of `quality_on_cpu`), `ep_context`, `placement`, `schedule`, `seconds`,
        `thresholds`, `failures`, `passed`.

    Raises:
        BuildFailed: the HTP refuses a node, or a compiled graph does not load or disagrees.
    """
    context_dir = Path(context_dir or qdq_dir)
    say = progress or (lambda message: None)
    cpu_qdq = _pipeline(_cpu_sessions(qdq_dir, files), num_layers, pad_token_id)
    prefill_tokens, decode_steps = evaluation_schedule(len(ids), cpu_qdq.chunk)
    seconds = {}

    say("compiling both graphs for the HTP (CPU fallback disabled)")
    start = time.perf_counter()
    sessions, contexts = compile_on_htp(qdq_dir, context_dir, files, provider_options)
    seconds["htp_compile"] = round(time.perf_counter() - start, 3)
    htp = _pipeline(sessions, num_layers, pad_token_id)

    say(f"running {prefill_tokens} prefill tokens + {decode_steps} decode steps on the HTP")
    start = time.perf_counter()
    htp_logits, positions = run_schedule(htp, ids, prefill_tokens, decode_steps)
    seconds["htp_run"] = round(time.perf_counter() - start, 3)
    cpu_logits, _ = run_schedule(cpu_qdq, ids, prefill_tokens, decode_steps)
    reference = _pipeline(_cpu_sessions(reference_dir, files), num_layers, pad_token_id)
    ref_logits, _ = run_schedule(reference, ids, prefill_tokens, decode_steps)

    report = _schedule_report((htp_logits, cpu_logits, ref_logits), _row_ids(ids, positions))
    report["placement"] = {"provider": QNN, "cpu_fallback": NO_FALLBACK, "graphs": list(files)}
    report["schedule"] = {
        "prefill_tokens": prefill_tokens,
        "decode_steps": decode_steps,
        "rows": len(positions),
        "chunk": cpu_qdq.chunk,
    }

    say("loading the EPContext graphs")
    del htp, sessions
    driver, replay = (num_layers, pad_token_id), (prefill_tokens, min(decode_steps, 1))
    report["ep_context"] = _check_contexts(
        context_dir, contexts, ids, provider_options, driver, replay, htp_logits
    )
    report["seconds"] = {**seconds, **report["ep_context"].pop("seconds")}
    start = time.perf_counter()
    report["quality"] = quality_on_cpu(cpu_qdq, reference, ids, say)
    report["seconds"]["cpu_quality"] = round(time.perf_counter() - start, 3)
    report["thresholds"] = dict(thresholds or {})
    report["failures"] = _failures(report, thresholds or {})
    report["passed"] = not report["failures"]
    return report


def _schedule_report(rows, row_ids) -> dict:
    """The metrics of the schedule's rows = (HTP, CPU QDQ, fp32) logits: HTP vs fp32 (the
    gate), HTP vs CPU over the same QDQ graphs, and CPU QDQ vs fp32."""
    htp_logits, cpu_logits, ref_logits = rows
    report = {"requested_provider": QNN, "provider": QNN, "reference": "fp32-static-cpu"}
    report.update(compare_logits(htp_logits, ref_logits, row_ids))
    same = compare_logits(htp_logits, cpu_logits, row_ids)
    report["htp_vs_cpu"] = {
        k: same[k] for k in ("cosine", "top1_agreement", "logit_abs_diff", "kl")
    }
    cpu = compare_logits(cpu_logits, ref_logits, row_ids)
    report["cpu_qdq"] = {k: cpu[k] for k in ("cosine", "top1_agreement", "kl", "perplexity_ratio")}
    return report


def _failures(report: dict, thresholds: Mapping) -> list[str]:
    """The thresholds on the schedule's rows and on the whole-text quality block, and the
    HTP-vs-CPU agreement the quality block relies on."""
    failures = check_thresholds(report, thresholds)
    tokens = report["quality"]["tokens"]
    failures += [
        f"evaluation text ({tokens} tokens, QDQ graphs on CPU): {failure}"
        for failure in check_thresholds(report["quality"], thresholds)
    ]
    agreement = report["htp_vs_cpu"]["cosine"]
    if not agreement >= HTP_AGREEMENT:
        failures.append(
            f"htp_vs_cpu cosine = {agreement:.6g}, required >= {HTP_AGREEMENT}: the HTP does not "
            "compute what the QDQ graphs compute on CPU"
        )
    return failures


def _check_contexts(folder, contexts, ids, provider_options, driver, schedule, expected):
    """Load the EPContext graphs in fresh sessions and replay the start of the schedule: the
    rows must match those of the sessions that compiled them (`expected`)."""
    from edgepipe.runtime.qnn import qnn_session

    start = time.perf_counter()
    try:
        sessions = [qnn_session(folder / name, provider_options) for name in contexts]
    except Exception as exc:
        raise BuildFailed(f"validate: the compiled EPContext graphs do not load: {exc}") from exc
    load = time.perf_counter() - start
    rows, _ = run_schedule(_pipeline(sessions, *driver), ids, *schedule)
    diff = float(np.abs(rows - expected[: len(rows)]).max())
    if not diff <= EP_CONTEXT_TOLERANCE:
        raise BuildFailed(
            "validate: the EPContext graphs give other logits than the sessions that compiled "
            f"them (max abs diff {diff:.3g})"
        )
    return {
        "graphs": dict(zip(STAGES, contexts, strict=True)),
        "binaries": sorted(p.name for p in Path(folder).glob("*_qnn.bin")),
        "loads": True,
        "rows_compared": len(rows),
        "max_abs_diff_vs_compile_session": diff,
        "seconds": {"ep_context_load": round(load, 3)},
    }
