"""The fp16 overflow guard, measured: activation maxima, logit drift, and its cost on CPU.

For tiny-qwen2 and two variants engineered to overflow fp16 (tests/fixtures/models.py:
`mlp`, a down_proj output past 65504; `residual`, two sublayer outputs below it whose sum is
not), in the DirectML layout: per-layer maxima of the fp32 graph, of the plain fp16 graph and of
the guarded one (`plan_guard(..., "auto")`), and the fp16-vs-fp32 logit drift with and without
the guard. Then the guard's cost: Casts added, and prefill / decode time on the CPU provider of a
shape-exact Qwen2.5-0.5B (random weights, int4, DirectML layout) with the residual stream in
fp32 vs without, runs alternated, best of N. CPU time is only a proxy for DirectML. Run from the
repository root:

    PYTHONPATH=. .venv/bin/python benchmarks/fp16_guard.py --work /tmp/fp16-guard
    PYTHONPATH=. .venv/bin/python benchmarks/fp16_guard.py --work /tmp/fp16-guard --no-speed
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from edgepipe.stages.export.dynamic import build_decoder
from edgepipe.stages.export.fp16guard import Fp16Guard, activation_maxima, guard_casts, plan_guard
from edgepipe.stages.quantize.plan import QuantPlan
from edgepipe.stages.validate.metrics import compare_logits
from edgepipe.stages.validate.runner import DecoderRunner

DML = {"rotary_in_attention": False, "packed_qkv": False, "fused_bias": False}
INT4 = QuantPlan.from_precision(
    "int4", block_size=32, symmetric=False, accuracy_level=0, embedding="fp16", lm_head="int4"
)
IDS = [int(i) for i in np.random.default_rng(1).integers(0, 151643, 64)]


def export(src: Path, out: Path, dtype: str, guard=None, quant=None) -> Path:
    if not (out / "model.onnx").is_file():
        build_decoder(
            src, out, activation_dtype=dtype, quant=quant, context_length=512,
            fp16_guard=guard, **DML,
        )  # fmt: skip
    return out / "model.onnx"


def maxima_rows(model: Path) -> list[dict]:
    keys = ("attention", "mlp_act", "mlp", "residual")
    return [
        {"layer": m.layer, **{k: round(getattr(m, k), 2) for k in keys}}
        for m in activation_maxima(model, IDS)
    ]


def drift(model: Path, reference: np.ndarray) -> dict:
    logits = DecoderRunner(model).teacher_forced(IDS)
    metrics = compare_logits(logits, reference, IDS)
    return {
        "finite": bool(np.isfinite(logits).all()),
        "kl": metrics["kl"],
        "top1_agreement": metrics["top1_agreement"],
        "logit_abs_diff": metrics["logit_abs_diff"],
    }


def quality(name: str, src: Path, work: Path) -> dict:
    fp32 = export(src, work / name / "fp32", "float32")
    guard = plan_guard(activation_maxima(fp32, IDS), "auto")
    plain = export(src, work / name / "fp16", "float16")
    guarded = export(src, work / name / "fp16-guarded", "float16", guard)
    reference = DecoderRunner(fp32).teacher_forced(IDS)
    return {
        "guard": guard.to_dict(),
        "casts_added": guard_casts(guarded),
        "maxima": {
            "fp32": maxima_rows(fp32),
            "fp16": maxima_rows(plain),
            "fp16_guarded": maxima_rows(guarded),
        },
        "drift_vs_fp32": {
            "fp16": drift(plain, reference),
            "fp16_guarded": drift(guarded, reference),
        },
    }


def timings(model: Path, prompt: int, decode: int) -> tuple[float, float]:
    """Prefill seconds for `prompt` tokens and mean seconds per decoded token."""
    runner = DecoderRunner(model)
    ids = IDS * (prompt // len(IDS) + 1)
    start = time.perf_counter()
    _, past = runner.step(ids[:prompt], runner.empty_past(), prompt)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for t in range(decode):
        _, past = runner.step([ids[t]], past, prompt + t + 1)
    return prefill, (time.perf_counter() - start) / decode


def speed(work: Path, rounds: int) -> dict:
    from edgepipe.arch.presets import write_preset

    src = work / "qwen2.5-0.5b"
    if not (src / "config.json").is_file():
        write_preset("qwen2.5-0.5b", 0, src, "bfloat16", tokenizer=False)
    models = {
        "fp16": export(src, work / "0.5b-fp16", "float16", quant=INT4),
        "fp16_residual_fp32": export(
            src, work / "0.5b-guarded", "float16", Fp16Guard(residual=True), INT4
        ),
    }
    best = {k: [float("inf"), float("inf")] for k in models}
    for _ in range(rounds):  # alternate, so background load hits both alike
        for name, model in models.items():
            prefill, per_token = timings(model, 64, 16)
            best[name] = [min(best[name][0], prefill), min(best[name][1], per_token)]
    base, guarded = best["fp16"], best["fp16_residual_fp32"]
    return {
        "casts_added": guard_casts(models["fp16_residual_fp32"]),
        "prefill_64_s": {k: round(v[0], 4) for k, v in best.items()},
        "decode_s_per_token": {k: round(v[1], 4) for k, v in best.items()},
        "ratio_guarded_over_plain": {
            "prefill": round(guarded[0] / base[0], 3),
            "decode": round(guarded[1] / base[1], 3),
        },
    }


def main() -> None:
    from edgepipe.arch.presets import write_preset
    from tests.fixtures.models import write_overflow_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/fp16-guard"))
    parser.add_argument("--no-speed", action="store_true", help="skip the 0.5B timing")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    sources = {"tiny-qwen2": work / "tiny-qwen2"}
    if not (sources["tiny-qwen2"] / "config.json").is_file():
        write_preset("tiny-qwen2", 0, sources["tiny-qwen2"], "float32", tokenizer=False)
    for kind in ("mlp", "residual"):
        folder = work / f"overflow-{kind}" / kind
        sources[f"overflow-{kind}"] = (
            folder if folder.is_dir() else write_overflow_model(work / f"overflow-{kind}", kind)
        )
    report = {name: quality(name, src, work) for name, src in sources.items()}
    if not args.no_speed:
        report["cost_on_cpu_qwen2.5-0.5b_int4"] = speed(work, args.rounds)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
