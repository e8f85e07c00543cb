"""Prefix reuse across `Generator` calls (issue 19): what a hit saves and what a miss costs.

* **hit**: requests that share a `--system-len` (512) token system prompt and differ in a
  `--question-len` (32) token question, each round a new question, one `Generator` with its
  prefix cache (the default) and one with `prefix_cache_bytes=0`, alternated (ABBA) in one
  process. Reported: median time to first token of each and their ratio, the prompt tokens
  actually prefilled, and whether both produced the same greedy tokens. The cache is filled
  by one untimed call with another question first, as an app's first request would.
* **miss**: prompts of the same total length that share nothing (different source files), the
  same two generators alternated: what looking up, keeping and evicting costs when nothing is
  reused (median total seconds per call and time to first token, ratio). These calls run to
  max_new_tokens, so each call's cache is kept without a copy; **copy** times the other path
  (a call that stopped early: its positions are copied), median of `--rounds` copies.

The text is Python source from this repository (the bundled tiny-trained model was trained on
Python). Defaults to that model, built as `edgepipe build` ships it for cpu-x64 (int4) through
`common.cached_build`; `--model` takes a preset (shape-exact random weights) instead.

    PYTHONPATH=$PWD nice -n 19 .venv/bin/python benchmarks/prefix_reuse.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CACHE, REPO, RESULTS, cached_build, load_now, source_model, write_json  # noqa: E402

SOURCES = sorted((REPO / "edgepipe" / "runtime").glob("*.py"))


def source_ids(gen, path: Path, offset: int, length: int) -> list[int]:
    """`length` token ids of a source file from token `offset` (files repeat when short)."""
    ids = gen.encode(path.read_text())
    while len(ids) < offset + length:
        ids = ids + ids
    return ids[offset : offset + length]


def timed(gen, ids: list[int], gen_len: int) -> dict:
    result = gen.generate(ids, max_new_tokens=gen_len, do_sample=False, stop_token_ids=[])
    m = result.metrics
    return {
        "ttft_s": m.time_to_first_token_s,
        "total_s": m.total_s,
        "prompt_tokens": m.prompt_tokens,
        "prefix_reused_tokens": m.prefix_reused_tokens,
        "prefill_calls": m.prefill_calls,
        "token_ids": result.token_ids,
    }


def alternate(gens: dict, prompts: list[list[int]], gen_len: int) -> dict[str, list[dict]]:
    """One request per prompt and generator, ABBA order across rounds."""
    rows: dict[str, list[dict]] = {name: [] for name in gens}
    names = list(gens)
    for r, ids in enumerate(prompts):
        for name in names if r % 2 == 0 else names[::-1]:
            rows[name].append(timed(gens[name], ids, gen_len))
    return rows


def summary(rows: dict[str, list[dict]]) -> dict:
    med = {
        name: {key: statistics.median(x[key] for x in runs) for key in ("ttft_s", "total_s")}
        for name, runs in rows.items()
    }
    same = all(
        a["token_ids"] == b["token_ids"] for a, b in zip(rows["reuse"], rows["off"], strict=True)
    )
    return {
        "ttft_ms": {name: round(m["ttft_s"] * 1e3, 2) for name, m in med.items()},
        "ttft_ratio_off_over_reuse": round(med["off"]["ttft_s"] / med["reuse"]["ttft_s"], 2),
        "total_ratio_reuse_over_off": round(med["reuse"]["total_s"] / med["off"]["total_s"], 3),
        "prefilled_tokens": {
            name: statistics.median(x["prompt_tokens"] for x in runs) for name, runs in rows.items()
        },
        "reused_tokens": statistics.median(x["prefix_reused_tokens"] for x in rows["reuse"]),
        "same_tokens": same,
    }


def copy_cost(gen, ids: list[int], gen_len: int, rounds: int, calls: list[dict]) -> dict:
    """Median seconds to save a finished request's positions as a copy, and its share of a call."""
    import time

    from edgepipe.runtime.prefix import PrefixCache

    request = gen.engine.begin([ids], gen_len, None)
    request.prefill()
    times = []
    for _ in range(rounds):
        prefix = PrefixCache(1 << 40)
        started = time.perf_counter()
        prefix.save(ids, request.cache, 0, copy=True)
        times.append(time.perf_counter() - started)
    median = statistics.median(times)
    return {
        "positions": len(ids),
        "bytes": prefix.nbytes,
        "ms": round(median * 1e3, 3),
        "share_of_a_call": round(median / statistics.median(x["total_s"] for x in calls), 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-trained", help="bundled model or preset name")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--system-len", type=int, default=512)
    parser.add_argument("--question-len", type=int, default=32)
    parser.add_argument("--gen-len", type=int, default=8, help="tokens generated per request")
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--out", type=Path, default=RESULTS / "prefix_reuse.json")
    args = parser.parse_args(argv)

    from edgepipe.arch.bundled import BUNDLED, expand_bundled
    from edgepipe.runtime import Generator

    if args.model in BUNDLED:
        model_dir = args.cache / "models" / args.model
        if not (model_dir / "config.json").is_file():
            expand_bundled(args.model, model_dir)
    else:
        model_dir = source_model(args.model, args.cache)
    artifact = cached_build("edgepipe", args.model, model_dir, args.cache)["artifact"]
    gens = {"reuse": Generator(artifact), "off": Generator(artifact, prefix_cache_bytes=0)}
    doc = {"model": args.model, "command": " ".join(sys.argv), "load_before": load_now()}

    gen = gens["reuse"]
    system = source_ids(gen, REPO / "edgepipe" / "runtime" / "generator.py", 0, args.system_len)
    questions = [
        source_ids(gen, REPO / "edgepipe" / "runtime" / "sampling.py", r * n, n)
        for r, n in enumerate([args.question_len] * (args.rounds + 1), start=1)
    ]
    for each in gens.values():  # warm-up; fills the reuse generator's cache with the system
        timed(each, system + questions[-1], args.gen_len)
    hit = alternate(gens, [system + q for q in questions[:-1]], args.gen_len)
    doc["hit"] = summary(hit)
    print("hit:", json.dumps(doc["hit"]), "load", load_now(), flush=True)

    # Offset 100: past each file's opening docstring, so no two prompts start alike.
    length = args.system_len + args.question_len
    unique = [source_ids(gen, SOURCES[r % len(SOURCES)], 100, length) for r in range(args.rounds)]
    miss = alternate(gens, unique, args.gen_len)
    doc["miss"] = summary(miss)
    print("miss:", json.dumps(doc["miss"]), "load", load_now(), flush=True)

    doc["copy"] = copy_cost(gen, unique[0], args.gen_len, args.rounds, miss["reuse"])
    print("copy:", json.dumps(doc["copy"]), flush=True)

    cache, art = gen.prefix_cache, gen.artifact
    stats = cache.stats
    itemsize = np.dtype(gen.kv_dtype).itemsize
    doc["cache"] = {
        "kv_bytes_per_position": 2 * art.num_layers * art.num_kv_heads * art.head_dim * itemsize,
        "max_bytes": cache.max_bytes,
        "nbytes": cache.nbytes,
        "entries": len(cache),
        "lookups": stats.lookups,
        "hits": stats.hits,
        "hit_rate": round(stats.hit_rate, 3),
    }
    doc["load_after"] = load_now()
    doc["rounds"] = {"hit": hit, "miss": miss}
    write_json(args.out, doc)
    print(json.dumps({k: v for k, v in doc.items() if k != "rounds"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
