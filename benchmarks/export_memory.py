"""Peak memory of exporting shape-exact random Qwen models: edgepipe vs onnxruntime-genai.

Uses the cached bf16 random-weight presets (common.source_model), then exports each in a child
process measured by common.run_measured (GNU time's peak RSS). The onnxruntime-genai builder
(`python -m onnxruntime_genai.models.builder -i <folder> -o <out> -p fp32 -e cpu`) runs on the
same folder for comparison. Run from the repository root:

    PYTHONPATH=$PWD .venv/bin/python benchmarks/export_memory.py --work /tmp/export-bench
    PYTHONPATH=$PWD .venv/bin/python benchmarks/export_memory.py --models qwen3-4b --no-genai

Goals (issue 3): edgepipe <= 40% of the genai builder's peak on Qwen2.5-0.5B, and a Qwen3-4B
export under 8 GB. Needs ~2x the model's fp32 size in free disk per model; exports are deleted
after each run unless --keep (the source folders stay cached).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
from common import folder_bytes, genai_builder_cmd, run_measured, source_model  # noqa: E402

EDGEPIPE_CHILD = (
    "import sys; from edgepipe.stages.export.dynamic import build_decoder; "
    "r = build_decoder(sys.argv[1], sys.argv[2], activation_dtype=sys.argv[3]); "
    "print('bytes_written', r.bytes_written)"
)


def _measured(cmd: list[str]) -> dict:
    result = run_measured(cmd)
    result.pop("stdout", None)
    return result


def bench_model(name: str, work: Path, *, genai: bool, dtype: str, keep: bool) -> dict:
    src = source_model(name)  # cached in benchmarks/.cache/models, shared with side_by_side.py
    row: dict = {"model": name, "source_bytes": folder_bytes(src, "model")}
    row["activation_dtype"] = dtype
    out = work / f"{name}-edgepipe"
    row["edgepipe"] = _measured([sys.executable, "-c", EDGEPIPE_CHILD, str(src), str(out), dtype])
    row["edgepipe"]["output_bytes"] = folder_bytes(out) if out.exists() else 0
    print(f"[{name}] edgepipe {row['edgepipe']}", flush=True)
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    if genai:
        out = work / f"{name}-genai"
        precision = "fp32" if dtype == "float32" else "fp16"
        row["genai"] = _measured(genai_builder_cmd(src, out, work / "genai-cache", precision))
        row["genai"]["output_bytes"] = folder_bytes(out) if out.exists() else 0
        print(f"[{name}] genai {row['genai']}", flush=True)
        if row["genai"]["rc"] == 0:
            row["edgepipe_over_genai"] = round(
                row["edgepipe"]["peak_rss_mib"] / row["genai"]["peak_rss_mib"], 3
            )
        if not keep:
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(work / "genai-cache", ignore_errors=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgepipe-export-bench"))
    parser.add_argument(
        "--models",
        nargs="+",
        default=["qwen2.5-0.5b", "qwen3-4b"],
        help="preset names; the genai builder runs on the first one only",
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    parser.add_argument("--no-genai", action="store_true", help="skip the genai builder")
    parser.add_argument("--keep", action="store_true", help="keep the written folders")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, name in enumerate(args.models):
        genai = not args.no_genai and i == 0
        rows.append(bench_model(name, args.work, genai=genai, dtype=args.dtype, keep=args.keep))
    print(json.dumps(rows, indent=2))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
