"""edgepipe vs onnxruntime-genai and llama.cpp on shape-exact random Qwen models.

For each model shape (default: Qwen2.5-0.5B, Qwen3-0.6B, Qwen2.5-1.5B, Qwen3-1.7B):

1. a random-weight bf16 folder (`edgepipe.arch.presets`, cached in benchmarks/.cache/models/);
2. builds from that folder, each in a child process measured for wall time and peak RSS:
   edgepipe's export + quantize and optimize stages for the `cpu-x64` profile, i.e. the graph
   `edgepipe build` ships (int4 block 32, accuracy_level 4, asymmetric; one int4 table for the
   embedding and the tied lm_head), llama.cpp's Q4_0 GGUF (whenever llama.cpp is built in the
   cache; `--llama-cpp` builds it, `--no-llama-cpp` leaves it out) and
   `python -m onnxruntime_genai.models.builder -p int4 -e cpu` at its defaults (symmetric int4
   block 32, accuracy_level 4, the same shared table); cached in benchmarks/.cache/builds/;
3. peak RSS of one 512-token prompt + 128 generated tokens in a fresh process, per runtime, at
   its default settings (edgepipe sizes the KV cache per request; genai allocates its
   `max_length`, the whole context) and at a matched `max_length` (prompt + generated);
   llama.cpp's is the peak RSS of one llama-bench run of that prompt and length;
4. speed, alternating the contenders (ABBA order) for `--rounds` rounds in long-lived worker
   processes: time to first token and prefill tokens/s at each prompt length, decode tokens/s
   over the generated tokens after it (greedy, exactly `--gen-len` tokens). genai runs at the
   matched `max_length` here (its default would allocate the whole context per request).
   `--busy` keeps one core busy (a Python loop pinned to core 0) during the rounds, the same
   load for every contender: an app next to other work;
5. the decode roofline: this machine's streaming read bandwidth / bytes read per decoded
   token (weights + mean KV cache, from each artifact's graph; `roofline.py`).

Medians over rounds; ratios are edgepipe / other of the medians, from the same run. Every row
records the load average: the machine may be shared. Results: benchmarks/results/
side_by_side.json (everything), .md (tables + goals) and .png (chart).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/side_by_side.py
    PYTHONPATH=$PWD .venv/bin/python benchmarks/side_by_side.py --models qwen3-0.6b --rounds 5
    PYTHONPATH=$PWD .venv/bin/python benchmarks/side_by_side.py --llama-cpp   # build it first
    PYTHONPATH=$PWD .venv/bin/python benchmarks/side_by_side.py --busy        # one core loaded

Tuning runs: `--variant NAME:KEY=VALUE,...` adds an edgepipe worker with onnxruntime session
config entries (`threads=N` for intra-op threads), `--baseline-src DIR` one that imports
edgepipe from another checkout (before/after of a runtime change in one run), `--tag T` writes
side_by_side-T.* instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
import report  # noqa: E402
from common import (  # noqa: E402
    BENCH_MODELS,
    CACHE,
    PROFILE,
    RESULTS,
    add_edgepipe_kind,
    busy_load,
    cached_build,
    folder_bytes,
    load_now,
    machine_facts,
    mem_available_bytes,
    source_model,
    write_json,
)
from roofline import measure_bandwidth, roofline  # noqa: E402
from runners import Worker, run_once  # noqa: E402

METRICS = ("prefill_tokens_per_s", "decode_tokens_per_s", "time_to_first_token_s")


# ----------------------------------------------------------------------------- memory


def _genai_default_kv_bytes(artifact: Path) -> int:
    config = json.loads((artifact / "genai_config.json").read_text())
    dec = config["model"]["decoder"]
    positions = config["search"]["max_length"]
    return (
        2
        * dec["num_hidden_layers"]
        * dec["num_key_value_heads"]
        * dec["head_size"]
        * 4
        * (positions)
    )


def memory(artifacts: dict[str, Path], prompt_len: int, gen_len: int) -> dict:
    """Peak RSS of one request in a fresh process, at defaults and at matched max_length."""
    rows: dict[str, dict] = {}
    matched = prompt_len + gen_len
    for kind, artifact in artifacts.items():
        for setting, max_length in (("default", None), ("matched", matched)):
            if kind == "genai" and setting == "default":
                need = _genai_default_kv_bytes(artifact) + 2 * 2**30
                free = mem_available_bytes() or need
                if need > free:
                    rows[f"{kind}/{setting}"] = {
                        "skipped": f"needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} free"
                    }
                    continue
            row = run_once(kind, artifact, prompt_len, gen_len, max_length=max_length)
            row["max_length"] = max_length
            row.pop("token_ids", None)
            rows[f"{kind}/{setting}"] = row
            if "error" in row:
                print(f"  memory {kind}/{setting}: failed\n{row['error']}", flush=True)
            else:
                print(f"  memory {kind}/{setting}: {row['peak_rss_mib']:.0f} MiB", flush=True)
    return rows


# ----------------------------------------------------------------------------- speed


class _WorkerContender:
    def __init__(self, worker: Worker):
        self.worker = worker
        self.name = worker.name

    def round(self, prompt_lens, gen_len: int) -> dict:
        return {p: self.worker.request(p, gen_len) for p in prompt_lens}


def _variant(text: str) -> tuple[str, dict]:
    name, _, body = text.partition(":")
    options: dict = {"session_config": []}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        if key == "threads":
            options["threads"] = int(value)
        elif key == "spinning":
            options["spinning"] = value
        elif key == "build":  # the EDGEPIPE_KINDS artifact it runs (default: edgepipe)
            options["build"] = value
        else:
            options["session_config"].append((key, value))
    options["session_config"] = tuple(options["session_config"])
    return name, options


def speed(contenders, prompt_lens, gen_len: int, rounds: int) -> dict:
    """Alternate the contenders round by round (ABBA); every row kept, medians summarized."""
    rows: dict[str, dict[int, list[dict]]] = {
        c.name: {p: [] for p in prompt_lens} for c in contenders
    }
    for c in contenders:  # warm-up: first-run allocations and page faults are not timed
        c.round(prompt_lens[:1], min(gen_len, 16))
    for r in range(rounds):
        order = contenders if r % 2 == 0 else list(reversed(contenders))
        for c in order:
            for p, row in c.round(prompt_lens, gen_len).items():
                row["round"] = r
                rows[c.name][p].append(row)
        summary = ", ".join(
            f"{c.name} {rows[c.name][prompt_lens[0]][-1]['decode_tokens_per_s']:.1f}"
            for c in contenders
        )
        print(f"  round {r + 1}/{rounds}: decode tok/s {summary}  load {load_now()}", flush=True)
    return {
        name: {str(p): {"median": _medians(series), "rounds": series} for p, series in by_p.items()}
        for name, by_p in rows.items()
    }


def _medians(series: list[dict]) -> dict:
    return {m: statistics.median(row[m] for row in series) for m in METRICS if m in series[0]}


# ----------------------------------------------------------------------------- one model


def bench_model(name: str, args, bandwidth: float) -> dict:
    started = time.perf_counter()
    model_dir = source_model(name, args.cache)
    result: dict = {"model": name, "source_bytes": folder_bytes(model_dir, "model")}
    kinds = ["edgepipe", *args.build] + ([] if args.no_genai else ["genai"])
    builds = {k: cached_build(k, name, model_dir, args.cache, rebuild=args.rebuild) for k in kinds}
    result["builds"] = builds
    artifacts = {k: Path(b["artifact"]) for k, b in builds.items()}
    gen_len, prompt_lens = args.gen_len, args.prompt_lens

    if not args.no_memory:  # the extra builds' memory is the shipped one's, give or take a table
        measured = {k: a for k, a in artifacts.items() if k not in args.build}
        result["memory"] = memory(measured, max(prompt_lens), gen_len)

    contenders = []
    workers = []
    try:
        for kind, artifact in artifacts.items():
            if kind == "genai":
                workers.append(Worker(kind, artifact, max_length=max(prompt_lens) + gen_len))
            else:
                workers.append(Worker("edgepipe", artifact, name=kind))
        for text in args.variant:
            label, options = _variant(text)
            artifact = artifacts[options.pop("build", "edgepipe")]
            workers.append(Worker("edgepipe", artifact, name=label, **options))
        if args.baseline_src:
            workers.append(
                Worker(
                    "edgepipe",
                    artifacts["edgepipe"],
                    name="edgepipe@baseline",
                    src=args.baseline_src,
                )
            )
        contenders = [_WorkerContender(w) for w in workers]
        import llama_cpp

        if args.llama_cpp and not llama_cpp.available():
            llama_cpp.setup()
        if llama_cpp.available() and not args.no_llama_cpp:
            record = llama_cpp.gguf_q4_0(name, model_dir, args.cache)
            result["builds"]["llama.cpp"] = record
            artifacts["llama.cpp"] = Path(record["artifact"])
            bench = llama_cpp.LlamaBench(record["artifact"])
            contenders.append(bench)
            if not args.no_memory:
                rss = bench.peak_rss_mib(max(prompt_lens), gen_len)
                for setting in ("default", "matched"):  # its context is prompt + generated
                    result["memory"][f"llama.cpp/{setting}"] = {"peak_rss_mib": rss}
        with busy_load() if args.busy else contextlib.nullcontext():
            result["speed"] = speed(contenders, prompt_lens, gen_len, args.rounds)
        result["busy"] = bool(args.busy)
    finally:
        result["workers"] = {w.name: {**w.ready, **w.close()} for w in workers}

    result["roofline"] = {
        k: roofline(a, bandwidth, min(prompt_lens), gen_len)
        for k, a in artifacts.items()
        if k != "llama.cpp"
    }
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(BENCH_MODELS))
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    parser.add_argument("--prompt-lens", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--gen-len", type=int, default=128)
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--tag", help="write side_by_side-TAG.* (tuning runs)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild cached artifacts")
    parser.add_argument("--no-genai", action="store_true")
    parser.add_argument("--no-memory", action="store_true", help="skip the fresh-process RSS runs")
    parser.add_argument(
        "--llama-cpp", action="store_true", help="build llama.cpp first when it is not built"
    )
    parser.add_argument("--no-llama-cpp", action="store_true", help="leave llama.cpp out")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE,...",
        help="an extra edgepipe worker: threads=N, spinning=auto|on|off, build=KIND, or an "
        "onnxruntime session config entry",
    )
    parser.add_argument(
        "--build",
        action="append",
        default=[],
        type=add_edgepipe_kind,
        metavar="NAME:KEY=VALUE,...",
        help="an extra edgepipe build with these precision fields over the shipped block, e.g. "
        "b128sym:block_size=128,symmetric=true ('edgepipe-int4-table' needs no fields)",
    )
    parser.add_argument(
        "--busy",
        action="store_true",
        help="a fixed synthetic load (a busy loop pinned to core 0) during the timed rounds",
    )
    parser.add_argument("--baseline-src", type=Path, help="checkout for an edgepipe@baseline row")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")

    facts = machine_facts()
    print(f"machine: {facts['cpu']}, {facts['cores']} cores, load {facts['load']}", flush=True)
    bandwidth = measure_bandwidth(cache=args.cache)
    print(f"read bandwidth: {bandwidth['best_bytes_per_s'] / 1e9:.1f} GB/s (best)", flush=True)
    doc = {
        "machine": facts,
        "settings": {
            "rounds": args.rounds,
            "prompt_lens": args.prompt_lens,
            "gen_len": args.gen_len,
            "profile": PROFILE,
            "variants": args.variant,
            "baseline_src": str(args.baseline_src) if args.baseline_src else None,
            "command": " ".join(["benchmarks/side_by_side.py", *(argv or sys.argv[1:])]),
        },
        "bandwidth": bandwidth,
        "models": [],
    }
    stem = args.out / ("side_by_side" + (f"-{args.tag}" if args.tag else ""))
    for name in args.models:
        print(f"== {name}", flush=True)
        doc["models"].append(bench_model(name, args, bandwidth["best_bytes_per_s"]))
        _write(doc, stem)  # after every model: a long run that is stopped keeps what it measured
    doc["bandwidth_after"] = measure_bandwidth(cache=args.cache)
    _write(doc, stem)
    print(Path(f"{stem}.md").read_text())
    return 0


def _write(doc: dict, stem: Path) -> None:
    doc["goals"] = report.goals(doc)
    # Not with_suffix: a tag such as "qwen2.5-0.5b" has a dot of its own.
    write_json(Path(f"{stem}.json"), doc)
    Path(f"{stem}.md").write_text(report.markdown(doc))
    report.chart(doc, Path(f"{stem}.png"))


if __name__ == "__main__":
    sys.exit(main())
