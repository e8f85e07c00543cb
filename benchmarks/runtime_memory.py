"""Peak memory of generating with edgepipe.runtime vs onnxruntime-genai on the same artifact.

For a shape-exact random Qwen3-0.6B int4 artifact (edgepipe's `cpu-x64` build of the cached
preset, see common.cached_build), each contender runs in a fresh process (runners.run_once):
load the artifact, feed a 64-token prompt, generate 64 tokens greedily; the peak RSS is GNU
time's. onnxruntime-genai runs with the artifact's own `genai_config.json` (its default: a KV
cache for the whole context window, shared past/present buffers); edgepipe with its defaults
(KV sized for the request). benchmarks/side_by_side.py measures the same per tool's own build
and at a matched max_length.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/runtime_memory.py                 # cached build
    PYTHONPATH=$PWD .venv/bin/python benchmarks/runtime_memory.py --artifact DIR  # any artifact
    PYTHONPATH=$PWD .venv/bin/python benchmarks/runtime_memory.py --json

Needs the bench extra: pip install 'edgepipe[bench]'.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
from common import MIB, cached_build, source_model  # noqa: E402
from runners import run_once  # noqa: E402

PRESET = "qwen3-0.6b"
PROMPT_LEN = 64
GEN_LEN = 64


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, help="an already built artifact folder")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)

    build = None
    folder = args.artifact
    if folder is None:
        build = cached_build("edgepipe", PRESET, source_model(PRESET))
        folder = Path(build["artifact"])
    ours = run_once("edgepipe", folder, PROMPT_LEN, GEN_LEN)
    theirs = run_once("genai", folder, PROMPT_LEN, GEN_LEN)
    for who, row in (("edgepipe", ours), ("genai", theirs)):
        if "error" in row:
            raise SystemExit(f"{who} run failed:\n{row['error']}")
    report = {
        "artifact": str(folder),
        "build": build,
        "prompt_len": PROMPT_LEN,
        "gen_len": GEN_LEN,
        "edgepipe": ours,
        "genai": theirs,
        "ratio": ours["peak_rss_mib"] / theirs["peak_rss_mib"],
        "same_first_tokens": ours["token_ids"] == theirs["token_ids"],
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(
            f"edgepipe peak RSS {ours['peak_rss_mib']:.0f} MiB "
            f"(after load {ours['rss_after_load_bytes'] / MIB:.0f} MiB, "
            f"KV {ours['kv_bytes'] / MIB:.1f} MiB)\n"
            f"genai    peak RSS {theirs['peak_rss_mib']:.0f} MiB "
            f"(after load {theirs['rss_after_load_bytes'] / MIB:.0f} MiB)\n"
            f"ratio {report['ratio']:.1%}; same first greedy tokens: {report['same_first_tokens']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
