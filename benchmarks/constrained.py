"""Decode speed of constrained vs free decoding with edgepipe.runtime, in one process.

On a shape-exact random Qwen2.5-0.5B int4 artifact (edgepipe's `cpu-x64` build of the cached
preset, see common.cached_build), one Generator decodes the same prompt in alternating rounds:
free, then constrained by a nested JSON schema (an array of at least 30 person objects, so the
grammar cannot end before the token budget), each GEN_LEN tokens. Both are greedy, so the only
difference is the constraint: a bitmask from llguidance per token, applied with numpy, and the
matcher advanced. The figure is the ratio of decode tokens/s (median over rounds), plus the
mean per-token cost of the mask itself. Goal (issue 16): >= 0.9x of free decoding.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/constrained.py                      # 0.5B
    PYTHONPATH=$PWD .venv/bin/python benchmarks/constrained.py --preset tiny-qwen2  # quick
    PYTHONPATH=$PWD .venv/bin/python benchmarks/constrained.py --artifact DIR --json out.json

Needs the bench and constrained extras.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
from common import cached_build, load_now, machine_facts, source_model  # noqa: E402

PRESET = "qwen2.5-0.5b"
GEN_LEN = 128
ROUNDS = 5
PROMPT = "List thirty people with their age, role and address, as JSON."
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 16},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
        },
    },
    "required": ["name", "age", "role", "address"],
}
SCHEMA = {
    "type": "object",
    "properties": {"people": {"type": "array", "items": PERSON, "minItems": 30}},
    "required": ["people"],
}


def decode(gen, prompt_ids, **params) -> dict:
    result = gen.generate(prompt_ids, max_new_tokens=GEN_LEN, stop_token_ids=[], **params)
    return {
        "tokens": len(result.token_ids),
        "decode_tok_s": result.metrics.decode_tokens_per_s,
        "finish": result.finish_reason,
    }


def mask_cost(gen, prompt_ids) -> float:
    """Mean seconds per token spent in the constraint (mask + advance), timed around its calls."""
    from edgepipe.runtime import constrain

    spent = [0.0, 0]
    mask, advance = constrain.GrammarConstraint.mask, constrain.GrammarConstraint.advance

    def timed(fn):
        def wrapper(self, *args):
            start = time.perf_counter()
            fn(self, *args)
            spent[0] += time.perf_counter() - start
            spent[1] += fn is mask

        return wrapper

    constrain.GrammarConstraint.mask = timed(mask)
    constrain.GrammarConstraint.advance = timed(advance)
    try:
        decode(gen, prompt_ids, json_schema=SCHEMA)
    finally:
        constrain.GrammarConstraint.mask, constrain.GrammarConstraint.advance = mask, advance
    return spent[0] / max(spent[1], 1)


def main(argv: list[str] | None = None) -> int:
    from edgepipe.runtime import Generator

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=PRESET, help="preset to build (default %(default)s)")
    parser.add_argument("--artifact", type=Path, help="an already built artifact folder")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)

    folder = args.artifact
    if folder is None:
        folder = Path(cached_build("edgepipe", args.preset, source_model(args.preset))["artifact"])
    gen = Generator(folder, intra_op_num_threads=args.threads)
    prompt_ids = gen.encode(gen.render_chat([{"role": "user", "content": PROMPT}]))
    decode(gen, prompt_ids, json_schema=SCHEMA)  # warm up: engine (tokenizer walk) + session
    decode(gen, prompt_ids)
    rounds = []
    for _ in range(ROUNDS):
        rounds.append(
            {
                "free": decode(gen, prompt_ids),
                "constrained": decode(gen, prompt_ids, json_schema=SCHEMA),
            }
        )
    free = statistics.median(r["free"]["decode_tok_s"] for r in rounds)
    constrained = statistics.median(r["constrained"]["decode_tok_s"] for r in rounds)
    report = {
        "artifact": str(folder),
        "preset": None if args.artifact else args.preset,
        "gen_len": GEN_LEN,
        "rounds": rounds,
        "free_decode_tok_s": round(free, 2),
        "constrained_decode_tok_s": round(constrained, 2),
        "ratio": round(constrained / free, 3),
        "constraint_ms_per_token": round(mask_cost(gen, prompt_ids) * 1e3, 3),
        "machine": machine_facts(),
        "load_after": load_now(),
    }
    print(json.dumps({k: v for k, v in report.items() if k not in ("rounds", "machine")}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
