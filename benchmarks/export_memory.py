"""Peak memory of exporting shape-exact random Qwen models: edgepipe vs onnxruntime-genai.

Writes bf16 random-weight presets (edgepipe.presets), then exports each in a child process run
under `/usr/bin/time -v` and reads "Maximum resident set size". The onnxruntime-genai builder
(`python -m onnxruntime_genai.models.builder -i <folder> -o <out> -p fp32 -e cpu`) runs on the
same folder for comparison. Run from the repository root:

    .venv/bin/python benchmarks/export_memory.py --work /tmp/export-bench
    .venv/bin/python benchmarks/export_memory.py --models qwen3-4b --no-genai

Goals (issue 3): edgepipe <= 40% of the genai builder's peak on Qwen2.5-0.5B, and a Qwen3-4B
export under 8 GB. Needs ~3x the model's fp32 size in free disk per model; folders are deleted
after each run unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

EDGEPIPE_CHILD = (
    "import sys; from edgepipe.export import build_decoder; "
    "r = build_decoder(sys.argv[1], sys.argv[2], activation_dtype=sys.argv[3]); "
    "print('bytes_written', r.bytes_written)"
)


def timed(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, float | int | str]:
    """Run `cmd` under /usr/bin/time -v; return peak RSS (MiB), wall seconds and exit code."""
    start = time.perf_counter()
    proc = subprocess.run(
        ["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env, check=False
    )
    wall = time.perf_counter() - start
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    peak_mib = int(match.group(1)) / 1024 if match else float("nan")
    result = {"peak_rss_mib": round(peak_mib, 1), "wall_s": round(wall, 1), "rc": proc.returncode}
    if proc.returncode:
        result["error"] = (proc.stderr or proc.stdout)[-2000:]
    return result


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bench_model(name: str, work: Path, *, genai: bool, dtype: str, keep: bool) -> dict:
    from edgepipe.presets import write_preset

    src = work / f"{name}-bf16"
    if not (src / "config.json").is_file():
        start = time.perf_counter()
        write_preset(name, 0, src, "bfloat16")
        print(f"[{name}] preset written in {time.perf_counter() - start:.0f}s", flush=True)
    row: dict = {"model": name, "source_bytes": folder_bytes(src), "activation_dtype": dtype}
    out = work / f"{name}-edgepipe"
    row["edgepipe"] = timed([sys.executable, "-c", EDGEPIPE_CHILD, str(src), str(out), dtype])
    row["edgepipe"]["output_bytes"] = folder_bytes(out) if out.exists() else 0
    print(f"[{name}] edgepipe {row['edgepipe']}", flush=True)
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    if genai:
        out = work / f"{name}-genai"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        precision = "fp32" if dtype == "float32" else "fp16"
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src)]
        cmd += ["-o", str(out), "-p", precision, "-e", "cpu", "-c", str(work / "genai-cache")]
        row["genai"] = timed(cmd, env)
        row["genai"]["output_bytes"] = folder_bytes(out) if out.exists() else 0
        print(f"[{name}] genai {row['genai']}", flush=True)
        if row["genai"]["rc"] == 0:
            row["edgepipe_over_genai"] = round(
                row["edgepipe"]["peak_rss_mib"] / row["genai"]["peak_rss_mib"], 3
            )
        if not keep:
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(work / "genai-cache", ignore_errors=True)
    if not keep:
        shutil.rmtree(src, ignore_errors=True)
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
