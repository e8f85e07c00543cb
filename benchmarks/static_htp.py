"""qnn-htp builds of the tiny recipes: accuracy per precision, and simulated-HTP timings.

    PYTHONPATH=. python benchmarks/static_htp.py --out benchmarks/results/static_htp.json

For each recipe (tiny-qwen2, tiny-qwen3) and precision (w8a16; w4a16 per channel; w4a16 with
64-input LPBQ blocks) this builds the qnn-htp artifact with the real pipeline (validation
thresholds opened, so every precision gives an artifact and its numbers) and reports the
validation metrics against the fp32 graphs, then times, side by side in one process:

* opening both QDQ graphs on the simulated HTP (compile) vs opening the EPContext graphs;
* one prefill call (a full chunk) and one decode step, on the simulated HTP and on CPU over the
  same QDQ graphs (best of `--repeat`).

The simulator is a functional model of the HTP on x86-64: its times say what the build and the
tests cost here, not how fast a Snapdragon runs.

Measured (onnxruntime 1.32, onnxruntime-qnn 2.7 / QNN 2.51, shared 2-core box under load;
10 validated rows each):

    recipe      precision   cosine  top-1  KL     HTP~CPU cosine  build  open QDQ / EPContext
    tiny-qwen2  w8a16       0.9955  0.8    0.013  0.999997        59 s   16.6 s / 0.31 s
    tiny-qwen2  w4a16-pc    0.793   0.1    0.61   0.99996         75 s   17.0 s / 0.27 s
    tiny-qwen2  w4a16-b64   0.814   0.0    0.55   0.999997        54 s   18.3 s / 0.25 s
    tiny-qwen3  w8a16       0.9976  0.8    0.0075 0.999996        61 s   18.5 s / 0.27 s
    tiny-qwen3  w4a16-pc    0.902   0.4    0.29   0.99996         62 s   14.2 s / 0.17 s
    tiny-qwen3  w4a16-b64   0.921   0.2    0.24   0.999997        54 s   16.9 s / 0.20 s

One call on the simulated HTP: prefill of 64 tokens 1.4-2.5 s, decode step 1.3-2.3 s (CPU over
the same QDQ graphs: 0.09-0.22 s and 0.07-0.17 s); the 151936 x 128 lm_head is ~1 s of it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import yaml

from edgepipe.build.run import BuildOptions, build_all, plan_builds
from edgepipe.schema import shipped as resources

PRECISIONS = {"w8a16": ("int8", None), "w4a16-pc": ("int4", None), "w4a16-b64": ("int4", 64)}
OPEN = {"min_cosine": -1.0, "min_top1_agreement": 0.0, "max_kl": 1e9, "max_perplexity_ratio": 1e9}


def recipe_copy(folder: Path, name: str, block: int | None) -> Path:
    data = yaml.safe_load(resources.resolve_recipe(name).read_text(encoding="utf-8"))
    data["name"] = f"{name}-bench" + (f"-b{block}" if block else "")
    data["targets"] = ["qnn-htp"]
    data["validation"].update(OPEN)
    if block:
        data.setdefault("precision", {})["profiles"] = {"qnn-htp": {"block_size": block}}
    path = folder / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def time_artifact(folder: Path, repeat: int) -> dict:
    import onnxruntime as ort

    from edgepipe.runtime.artifact import load_artifact
    from edgepipe.runtime.engines.static import StaticPipeline
    from edgepipe.runtime.qnn import qnn_session

    art = load_artifact(folder)
    options = art.provider_options
    start = time.perf_counter()
    qdq = [qnn_session(art.pipeline[s], options) for s in ("prefill", "decode")]
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    ctx = [qnn_session(art.ep_context[s], options) for s in ("prefill", "decode")]
    context_s = time.perf_counter() - start
    cpu = [
        ort.InferenceSession(str(art.pipeline[s]), providers=["CPUExecutionProvider"])
        for s in ("prefill", "decode")
    ]
    out = {"open_qdq_on_htp_s": compile_s, "open_ep_context_s": context_s}
    for label, sessions in (("htp", ctx), ("cpu", cpu)):
        pipe = StaticPipeline(*sessions, num_layers=art.num_layers, pad_token_id=art.pad_token_id)
        ids = list(range(1000, 1000 + pipe.chunk))
        cache = pipe.new_cache()

        def prefill(pipe=pipe, cache=cache, ids=ids):
            pipe.prefill(cache, ids, start=0)

        out[f"prefill_{pipe.chunk}_{label}_s"] = best(prefill, repeat)
        out[f"decode_{label}_s"] = best(lambda pipe=pipe, cache=cache: pipe.step(cache, 7), repeat)
        cache.length = 0
    del qdq
    return {k: round(v, 4) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=["tiny-qwen2", "tiny-qwen3"])
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="static-htp-") as tmp:
        tmp = Path(tmp)
        for recipe in args.recipes:
            for label in args.precisions:
                precision, block = PRECISIONS[label]
                path = recipe_copy(tmp, recipe, block)
                plans = plan_builds([str(path)], None, precision)
                (result,) = build_all(plans, BuildOptions(tmp / "dist", precision, tmp / "cache"))
                row = {"recipe": recipe, "precision": label, "status": result.status}
                if result.status != "built":
                    row["error"] = result.error
                    rows.append(row)
                    continue
                v = result.validation
                row.update(
                    build_s=result.seconds,
                    stage_s=result.stage_seconds,
                    size_mb=round(result.size_bytes / 2**20, 1),
                    cosine=round(v["cosine"], 5),
                    top1=round(v["top1_agreement"], 3),
                    kl=round(v["kl"], 5),
                    perplexity_ratio=round(v["perplexity_ratio"], 4),
                    htp_vs_cpu_cosine=round(v["htp_vs_cpu"]["cosine"], 7),
                    htp_vs_cpu_top1=v["htp_vs_cpu"]["top1_agreement"],
                    validate_s=v["seconds"],
                    **time_artifact(Path(result.artifact), args.repeat),
                )
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
