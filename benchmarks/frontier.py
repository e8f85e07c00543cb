"""The precision frontier of the trained tiny model: KL, top-1, size and speed per option.

Each row is `edgepipe build` of `recipes/tiny-trained.yaml` for cpu-x64 with its `precision`
block replaced (one YAML per row in a scratch folder, one shared stage cache), so the numbers
are what a user's build reports (the manifest's quality block: the held-out evaluation text,
teacher-forced, against the unquantized export). Decode speed is greedy generation of
`--gen-len` tokens after a code prompt with `edgepipe.runtime.Generator`, rows alternated
`--rounds` times (median), as a ratio to the all-int4 row measured in the same run.

Rows named `body-only` keep the token table in float: with `table-only`, they split the int4
error into what the body's projections and what the tied table lose, per method (docs/
quantization.md, "Why HQQ and GPTQ buy little").

    PYTHONPATH=$PWD .venv/bin/python benchmarks/frontier.py          # -> results/frontier.{json,md}
    PYTHONPATH=$PWD .venv/bin/python benchmarks/frontier.py --rows all-int4 default --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, RESULTS, machine_facts  # noqa: E402

RECIPE = REPO / "recipes" / "tiny-trained.yaml"
PROMPT = "import os\n\n\ndef read_lines(path):\n    "

_INT4_TABLE4 = {"method": "rtn", "embedding": "same", "lm_head": "same"}
#: row name -> the recipe's `precision` block for it (cpu-x64: int4 weights by default).
ROWS: dict[str, dict] = {
    "all-int4": {"method": "rtn", "embedding": "same", "lm_head": "same"},
    "default": {},  # the shipped recipe's precision, as is
    "int8-table": {"method": "rtn", "embedding": "int8", "lm_head": "int8"},
    "symmetric": {"method": "rtn", "symmetric": True, "embedding": "int8", "lm_head": "int8"},
    "block64": {"method": "rtn", "block_size": 64, "embedding": "int8", "lm_head": "int8"},
    "block128": {"method": "rtn", "block_size": 128, "embedding": "int8", "lm_head": "int8"},
    "block64-symmetric": {
        "method": "rtn",
        "block_size": 64,
        "symmetric": True,
        "embedding": "int8",
        "lm_head": "int8",
    },
    "block128-symmetric": {
        "method": "rtn",
        "block_size": 128,
        "symmetric": True,
        "embedding": "int8",
        "lm_head": "int8",
    },
    "block256-symmetric": {
        "method": "rtn",
        "block_size": 256,
        "symmetric": True,
        "embedding": "int8",
        "lm_head": "int8",
    },
    "hqq": {"method": "hqq", "embedding": "same", "lm_head": "same"},
    "hqq-int8-table": {"method": "hqq", "embedding": "int8", "lm_head": "int8"},
    "gptq": {"method": "gptq", "embedding": "same", "lm_head": "same"},
    "gptq-int8-table": {"method": "gptq", "embedding": "int8", "lm_head": "int8"},
    "target-kl-0.02": {**_INT4_TABLE4, "target_kl": 0.02},
    "target-kl-0.005": {**_INT4_TABLE4, "target_kl": 0.005},
    "target-kl-0.001": {**_INT4_TABLE4, "target_kl": 0.001},
    "int8": {"weights": "int8", "method": "rtn", "embedding": "same", "lm_head": "same"},
    "body-only-rtn": {"method": "rtn", "embedding": "fp32", "lm_head": "fp32"},
    "body-only-hqq": {"method": "hqq", "embedding": "fp32", "lm_head": "fp32"},
    "body-only-gptq": {"method": "gptq", "embedding": "fp32", "lm_head": "fp32"},
    "table-only-int4": {"weights": "fp32", "embedding": "int4", "lm_head": "int4"},
}
# The layout the rows were measured with (docs/quantization.md): block 32 with zero points,
# cpu-x64's default until it moved to block 128 symmetric. Rows that name their own keep it;
# `default` stays the shipped recipe as it resolves today.
_FORMER_LAYOUT = {"block_size": 32, "symmetric": False}
ROWS = {name: row if name == "default" else {**_FORMER_LAYOUT, **row} for name, row in ROWS.items()}


def row_recipe(name: str, precision: dict, folder: Path) -> Path:
    """A copy of the tiny-trained recipe for cpu-x64 with `precision` replacing its block."""
    doc = yaml.safe_load(RECIPE.read_text(encoding="utf-8"))
    doc["name"] = f"tt-{name}".replace(".", "-")
    doc["targets"] = ["cpu-x64"]
    if precision:
        doc["precision"] = precision
    doc["precision"].pop("profiles", None)  # entries of targets this row does not build
    doc["evaluation"]["file"] = str(RECIPE.parent / doc["evaluation"]["file"])
    path = folder / f"{doc['name']}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def build_rows(names: list[str], out: Path, cache: Path) -> dict[str, dict]:
    """Build each row; its manifest's numbers (or the failure)."""
    from edgepipe.build.run import BuildOptions, build_all, plan_builds

    rows = {}
    for name in names:
        plans = plan_builds([str(row_recipe(name, ROWS[name], out))], ["cpu-x64"])
        (result,) = build_all(plans, BuildOptions(out_dir=out / "dist", cache_dir=cache))
        if result.status != "built":
            rows[name] = {"status": result.status, "error": result.error}
            print(f"{name}: {result.status}: {result.error}", flush=True)
            continue
        manifest = json.loads((Path(result.artifact) / "manifest.json").read_text())
        q = manifest["quality"]
        rows[name] = {
            "status": "built",
            "artifact": result.artifact,
            "kl": q["kl"],
            "top1_agreement": q["top1_agreement"],
            "perplexity_ratio": q["perplexity_ratio"],
            "size_bytes": manifest["size_bytes"],
            "resolved": manifest["export"]["resolved_precision"],
            "target_kl": manifest.get("target_kl"),
            "build_seconds": manifest["build_seconds"],
            "summary": result.summary,
        }
        print(result.summary, f"({manifest['build_seconds']:.0f} s)", flush=True)
    return rows


def decode_speed(rows: dict[str, dict], rounds: int, gen_len: int) -> None:
    """Median greedy decode tokens/s per built row, rows alternated `rounds` times."""
    from edgepipe.runtime import Generator

    built = [n for n, r in rows.items() if r.get("artifact")]
    generators = {n: Generator(rows[n]["artifact"]) for n in built}
    speeds: dict[str, list[float]] = {n: [] for n in built}
    for _ in range(rounds):
        for name in built:
            result = generators[name].generate(PROMPT, max_new_tokens=gen_len, do_sample=False)
            speeds[name].append(result.metrics.decode_tokens_per_s)
    for name in built:
        rows[name]["decode_tokens_per_s"] = statistics.median(speeds[name])
    base = rows.get("all-int4", {}).get("decode_tokens_per_s")
    for name in built:
        rows[name]["speed_vs_all_int4"] = rows[name]["decode_tokens_per_s"] / base if base else None
    rows["_completion"] = {"prompt": PROMPT, "text": generators[built[0]].generate(
        PROMPT, max_new_tokens=gen_len, do_sample=False).text} if built else {}  # fmt: skip


def genai_row(out: Path) -> dict:
    """onnxruntime-genai's int4 build of the same model (its builder's defaults): size, and
    quality against transformers on the recipe's evaluation ids (the unquantized export matches
    transformers to 1e-3, so this is the reference the other rows use)."""
    import subprocess

    import numpy as np
    from common import folder_bytes, genai_builder_cmd

    from edgepipe.arch.bundled import expand_bundled
    from edgepipe.stages.validate.metrics import compare_logits
    from edgepipe.stages.validate.reference import transformers_logits
    from edgepipe.stages.validate.runner import DecoderRunner

    model = expand_bundled("tiny-trained", out / "source")
    cmd = genai_builder_cmd(model, out / "genai", out / "genai-cache")
    subprocess.run(cmd, check=True, capture_output=True)
    ids = evaluation_ids()
    runner = DecoderRunner(out / "genai" / "model.onnx")
    config = json.loads((model / "config.json").read_text(encoding="utf-8"))
    # genai's graph leaves the cache dims symbolic: the config says what they are.
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    past = np.zeros((1, config["num_key_value_heads"], 0, head_dim), np.float32)
    runner.empty_past = lambda: dict.fromkeys(runner.past_names, past)
    logits = runner.teacher_forced(ids)
    q = compare_logits(logits, transformers_logits(model, ids), ids)
    size = sum(p.stat().st_size for p in (out / "genai").glob("model.onnx*"))
    return {
        "status": "built",
        "kl": q["kl"],
        "top1_agreement": q["top1_agreement"],
        "perplexity_ratio": q["perplexity_ratio"],
        "size_bytes": size,
        "folder_bytes": folder_bytes(out / "genai"),
    }


def llama_cpp_row(out: Path) -> dict:
    """llama.cpp's Q4_0 of the same model (its default mix: the tied table at Q8_0), scored
    like `genai_row`: its teacher-forced logits (llama_cpp.teacher_forced_logits) against
    transformers' on the recipe's evaluation ids."""
    import llama_cpp
    from common import CACHE

    from edgepipe.arch.bundled import expand_bundled
    from edgepipe.stages.validate.metrics import compare_logits
    from edgepipe.stages.validate.reference import transformers_logits

    if not llama_cpp.available():
        llama_cpp.setup()
    model = expand_bundled("tiny-trained", out / "source-llama")
    record = llama_cpp.gguf_q4_0("tiny-trained", model, CACHE)
    ids = evaluation_ids()
    logits = llama_cpp.teacher_forced_logits(Path(record["artifact"]), ids, out / "llama-logits")
    q = compare_logits(logits, transformers_logits(model, ids), ids)
    return {
        "status": "built",
        "kl": q["kl"],
        "top1_agreement": q["top1_agreement"],
        "perplexity_ratio": q["perplexity_ratio"],
        "size_bytes": record["artifact_bytes"],
    }


def evaluation_ids() -> list[int]:
    """The recipe's evaluation token ids, as many as a build's validation scores (its
    `max_tokens`, at most `MAX_EVAL_TOKENS`): what every row's quality is measured on."""
    from edgepipe.arch.tokenizer import build_qwen_tokenizer
    from edgepipe.build.shared import MAX_EVAL_TOKENS
    from edgepipe.schema import load_recipe

    evaluation = load_recipe(RECIPE).evaluation
    ids = build_qwen_tokenizer("qwen2").encode(evaluation.read(), add_special_tokens=False).ids
    return ids[: min(evaluation.max_tokens, MAX_EVAL_TOKENS)]


def table(rows: dict[str, dict]) -> str:
    """The markdown table docs/quantization.md carries."""
    lines = [
        "| row | KL | top-1 | ppl ratio | size (MiB) | decode vs all-int4 |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        if name.startswith("_"):
            continue
        if r["status"] != "built":
            lines.append(f"| {name} | {r['status']} | | | | |")
            continue
        speed = r.get("speed_vs_all_int4")
        lines.append(
            f"| {name} | {r['kl']:.4f} | {r['top1_agreement']:.3f} | "
            f"{r['perplexity_ratio']:.3f} | {r['size_bytes'] / 2**20:.1f} | "
            + (f"{speed:.2f} |" if speed else "- |")
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gen-len", type=int, default=64)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "ep-frontier")
    parser.add_argument("--name", default="frontier")
    parser.add_argument("--genai", action="store_true", help="add onnxruntime-genai's int4")
    parser.add_argument("--llama-cpp", action="store_true", help="add llama.cpp's Q4_0")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        rows = build_rows(args.rows, Path(tmp), args.cache)
        if args.genai:
            try:
                rows["onnxruntime-genai-int4"] = genai_row(Path(tmp))
            except Exception as exc:  # the builder's failure must not lose the other rows
                rows["onnxruntime-genai-int4"] = {"status": "failed", "error": repr(exc)}
        if args.llama_cpp:
            try:
                rows["llama.cpp-q4_0"] = llama_cpp_row(Path(tmp))
            except Exception as exc:  # a failed conversion must not lose the other rows
                rows["llama.cpp-q4_0"] = {"status": "failed", "error": repr(exc)}
        if args.rounds:
            decode_speed(rows, args.rounds, args.gen_len)
        doc = {"machine": machine_facts(), "uptime": os.getloadavg(), "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    (RESULTS / f"{args.name}.md").write_text(table(rows) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
