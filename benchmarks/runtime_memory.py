"""Peak memory of generating with edgepipe.runtime vs onnxruntime-genai on the same artifact.

For a shape-exact random Qwen3-0.6B int4 artifact (preset "qwen3-0.6b", `build_decoder` with an
int4 `QuantPlan`), each contender runs in a fresh process: load the artifact, feed a 64-token
prompt, generate 64 tokens greedily, report peak RSS (`ru_maxrss`). onnxruntime-genai runs with
the artifact's own `genai_config.json` (its default: a KV cache for the whole context window,
shared past/present buffers); edgepipe with its defaults (KV sized for the request).

    .venv/bin/python benchmarks/runtime_memory.py                 # build into a temp folder
    .venv/bin/python benchmarks/runtime_memory.py --artifact DIR  # reuse a built artifact
    .venv/bin/python benchmarks/runtime_memory.py --json

Needs the bench extra: pip install 'edgepipe[bench]'.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT_LEN = 64
GEN_LEN = 64


def peak_rss_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def prompt_ids() -> list[int]:
    import numpy as np

    return np.random.default_rng(0).integers(100, 150000, size=PROMPT_LEN).tolist()


def child_edgepipe(folder: str) -> dict:
    from edgepipe.runtime import Generator

    started = time.perf_counter()
    gen = Generator(folder)
    loaded_rss = peak_rss_bytes()
    result = gen.generate(prompt_ids(), max_new_tokens=GEN_LEN, do_sample=False, stop_token_ids=[])
    return {
        "generated": len(result.token_ids),
        "token_ids": result.token_ids,
        "kv_bytes": result.metrics.kv_bytes,
        "rss_after_load_bytes": loaded_rss,
        "peak_rss_bytes": peak_rss_bytes(),
        "decode_tokens_per_s": result.metrics.decode_tokens_per_s,
        "wall_s": time.perf_counter() - started,
    }


def child_genai(folder: str) -> dict:
    import onnxruntime_genai as og

    started = time.perf_counter()
    model = og.Model(folder)
    loaded_rss = peak_rss_bytes()
    params = og.GeneratorParams(model)
    # Only greedy is set: max_length and the KV layout stay at the artifact's defaults.
    params.set_search_options(do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt_ids())
    out = []
    while not generator.is_done() and len(out) < GEN_LEN:
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return {
        "generated": len(out),
        "token_ids": out,
        "rss_after_load_bytes": loaded_rss,
        "peak_rss_bytes": peak_rss_bytes(),
        "wall_s": time.perf_counter() - started,
    }


def build_artifact(out: Path) -> Path:
    """Shape-exact random Qwen3-0.6B, exported with int4 weights, plus the tokenizer files."""
    from edgepipe.export import build_decoder
    from edgepipe.presets import write_preset
    from edgepipe.quantize import QuantPlan
    from edgepipe.tokenizer import write_tokenizer_files

    model_dir = out / "source"
    write_preset("qwen3-0.6b", 0, model_dir)
    artifact = out / "artifact"
    build_decoder(model_dir, artifact, quant=QuantPlan.from_precision("int4"))
    if not (artifact / "tokenizer.json").is_file():
        write_tokenizer_files(artifact, "qwen3")
    return artifact


def run_child(kind: str, folder: Path) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, "--artifact", str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"{kind} run failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, help="an already built artifact folder")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--child", choices=["edgepipe", "genai"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run = child_edgepipe if args.child == "edgepipe" else child_genai
        print(json.dumps(run(str(args.artifact))))
        return 0

    with tempfile.TemporaryDirectory(prefix="edgepipe-memory-") as tmp:
        folder = args.artifact
        build_s = None
        if folder is None:
            started = time.perf_counter()
            folder = build_artifact(Path(tmp))
            build_s = time.perf_counter() - started
        ours = run_child("edgepipe", folder)
        theirs = run_child("genai", folder)
    report = {
        "artifact": str(args.artifact or "temporary qwen3-0.6b int4"),
        "build_s": build_s,
        "prompt_len": PROMPT_LEN,
        "gen_len": GEN_LEN,
        "edgepipe": ours,
        "genai": theirs,
        "ratio": ours["peak_rss_bytes"] / theirs["peak_rss_bytes"],
        "same_tokens": ours["token_ids"] == theirs["token_ids"],
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        mib = 2**20
        print(
            f"edgepipe peak RSS {ours['peak_rss_bytes'] / mib:.0f} MiB "
            f"(after load {ours['rss_after_load_bytes'] / mib:.0f} MiB, "
            f"KV {ours['kv_bytes'] / mib:.1f} MiB)\n"
            f"genai    peak RSS {theirs['peak_rss_bytes'] / mib:.0f} MiB "
            f"(after load {theirs['rss_after_load_bytes'] / mib:.0f} MiB)\n"
            f"ratio {report['ratio']:.1%}; same greedy tokens: {report['same_tokens']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
