"""Prompt-lookup speculative decoding: what a verify step costs, and what it buys end to end.

Everything runs on the graph `edgepipe build` ships (the "edgepipe" kind): a verify step feeds
K + 1 tokens with `logits_to_keep` = K + 1, so the lm_head runs on those rows only, and every
other call keeps the default 1 (docs/contracts.md, "Dynamic decoder graph").

* **step cost**: one decoder call feeding K + 1 tokens (a verify step) against one feeding a
  single token, at the same cached context, alternated (ABBA) in one process; reported as the
  ratio of medians per K. Speculation wins when the tokens a verify step yields (accepted + 1)
  exceed that ratio.
* the same with `logits_to_keep` left at 1: what the layers alone cost, i.e. how much of a
  verify step is the lm_head on K + 1 rows;
* **end to end**: greedy decode tok/s with `speculative="ngram"` vs without (the same tokens,
  checked), on an input-grounded task (rewrite a given source file with a small change) and on
  free generation, rounds alternated.

Random weights cannot say how often drafts are accepted on real text: a random model's greedy
output falls into loops, which prompt lookup predicts well, so on shape-exact random models the
end-to-end numbers measure the machinery (and the adaptive switch), not the gain on real text.
Pass `--model-dir` with a trained checkpoint (e.g. a folder `edgepipe.arch.bundled.expand_bundled`
wrote for tiny-trained) for that.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/speculative.py --model qwen2.5-0.5b

`--serve` runs the end-to-end comparison through `edgepipe serve` instead (a request's
`"speculative": "ngram"`, one streaming client at a time; `--out` names its own file).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CACHE, RESULTS, cached_build, load_now, source_model, write_json  # noqa: E402

GROUNDED_FILE = Path(__file__).resolve().parents[1] / "edgepipe" / "runtime" / "engines" / "kv.py"
FREE_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def grounded_prompt(chars: int = 1800) -> str:
    code = GROUNDED_FILE.read_text()[:chars]
    return (
        "Rewrite the following Python file with the constant ROUND renamed to GRANULE. "
        "Output the whole file.\n\n" + code + "\n\nRewritten file:\n"
    )


def step_costs(gen, context: int, ks, rounds: int, *, last_only: bool = False) -> dict:
    """Median seconds of a 1-token call and of (K+1)-token verify calls, ABBA alternated.

    `last_only`: feed the K+1 tokens as a plain step (`logits_to_keep` stays 1: the last
    position's logits), i.e. the cost of the layers alone, without the lm_head on every row.
    """
    engine = gen.engine
    ids = [int(t) for t in np.random.default_rng(0).integers(1000, 50000, context)]
    request = engine.begin([ids], max(ks) + 2, None)
    request.prefill()
    times: dict[int, list[float]] = {1: [], **{k + 1: [] for k in ks}}
    widths = list(times)
    for r in range(rounds):
        for width in widths if r % 2 == 0 else widths[::-1]:
            feed = np.array([ids[:width]], dtype=np.int64)
            lengths = np.array([context + width], dtype=np.int64)
            started = time.perf_counter()
            if width == 1 or last_only:
                request.step(feed, lengths)
            else:
                request.verify(feed, lengths)
            times[width].append(time.perf_counter() - started)
    base = statistics.median(times[1])
    return {
        "context": context,
        "one_token_ms": round(base * 1e3, 2),
        "ratio_by_k": {
            str(w - 1): round(statistics.median(times[w]) / base, 3) for w in widths if w > 1
        },
    }


def end_to_end(gen, prompt: str, gen_len: int, rounds: int) -> dict:
    """Greedy decode tok/s with and without speculation (same tokens asserted), alternated."""
    ids = gen.encode(prompt)
    rows = {"plain": [], "ngram": []}
    tokens = {}
    for r in range(rounds):
        for mode in ("plain", "ngram") if r % 2 == 0 else ("ngram", "plain"):
            spec = None if mode == "plain" else "ngram"
            result = gen.generate(
                ids, max_new_tokens=gen_len, do_sample=False, stop_token_ids=[], speculative=spec
            )
            m = result.metrics
            rows[mode].append(
                {
                    "decode_tokens_per_s": m.decode_tokens_per_s,
                    "verify_calls": m.verify_calls,
                    "drafted": m.drafted_tokens,
                    "accepted": m.accepted_tokens,
                }
            )
            tokens.setdefault(mode, result.token_ids)
    # Equal on float32 graphs (tests/test_runtime_speculative.py); with int4 accuracy_level 4
    # the multi-token kernels' logits differ from the one-token ones by ~1-2% of their scale,
    # which can flip a near-tied argmax (random weights: nearly flat logits), so this records
    # where the outputs part rather than asserting.
    plain, spec = tokens["plain"], tokens["ngram"]
    diverge = next((i for i, (a, b) in enumerate(zip(plain, spec, strict=False)) if a != b), None)
    med = {k: statistics.median(x["decode_tokens_per_s"] for x in v) for k, v in rows.items()}
    last = rows["ngram"][-1]
    return {
        "prompt_tokens": len(ids),
        "plain_tok_s": round(med["plain"], 2),
        "ngram_tok_s": round(med["ngram"], 2),
        "speedup": round(med["ngram"] / med["plain"], 3),
        "acceptance": round(last["accepted"] / last["drafted"], 3) if last["drafted"] else None,
        "verify_calls": last["verify_calls"],
        "same_tokens": plain == spec,
        "first_divergence": diverge,
        "rounds": rows,
    }


def serve_end_to_end(artifact: str, prompt: list[int], gen_len: int, rounds: int) -> dict:
    """The same comparison through `edgepipe serve`: one streaming client at a time, greedy
    `/v1/completions` with `"speculative": "ngram"` or without, alternated; decode tok/s from
    the first to the last streamed token, the texts compared."""
    import httpx
    from serve import edgepipe_cmd, free_port, wait_ready

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = edgepipe_cmd(artifact, port, parallel=4, threads=os.cpu_count() or 1)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows: dict[str, list] = {"plain": [], "ngram": []}
    texts: dict[str, str] = {}
    try:
        wait_ready(url, proc)
        with httpx.Client(timeout=600) as client:
            for r in range(rounds):
                for mode in ("plain", "ngram") if r % 2 == 0 else ("ngram", "plain"):
                    body = {"model": "bench", "prompt": prompt, "max_tokens": gen_len,
                            "temperature": 0, "stream": True}  # fmt: skip
                    if mode == "ngram":
                        body["speculative"] = "ngram"
                    times, text = [], ""
                    with client.stream("POST", f"{url}/v1/completions", json=body) as response:
                        response.raise_for_status()
                        for line in response.iter_lines():
                            choices = (
                                json.loads(line[6:]).get("choices")
                                if line.startswith("data: {")
                                else None
                            )
                            if choices and choices[0].get("text"):
                                times.append(time.perf_counter())
                                text += choices[0]["text"]
                    tps = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 2 else None
                    rows[mode].append({"decode_tokens_per_s": tps, "chunks": len(times)})
                    texts.setdefault(mode, text)
            metrics = client.get(f"{url}/metrics").text
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    counters = {
        line.split()[0]: float(line.split()[1])
        for line in metrics.splitlines()
        if line.startswith("edgepipe_speculative_") and "_total " in line
    }
    med = {k: statistics.median(x["decode_tokens_per_s"] for x in v) for k, v in rows.items()}
    return {
        "plain_tok_s": round(med["plain"], 2),
        "ngram_tok_s": round(med["ngram"], 2),
        "speedup": round(med["ngram"] / med["plain"], 3),
        "same_text": texts["plain"] == texts["ngram"],
        "server_counters": counters,
        "rounds": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-0.5b", help="preset (shape-exact random)")
    parser.add_argument("--model-dir", type=Path, help="a trained model folder instead")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--gen-len", type=int, default=128)
    parser.add_argument("--context", type=int, default=256, help="cached tokens for step costs")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--skip-steps", action="store_true", help="end-to-end runs only")
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--out", type=Path, default=RESULTS / "speculative.json")
    parser.add_argument(
        "--serve", action="store_true", help="through `edgepipe serve` (a request's speculative)"
    )
    args = parser.parse_args(argv)

    from edgepipe.runtime import Generator

    name = args.model_dir.name if args.model_dir else args.model
    model_dir = args.model_dir or source_model(args.model, args.cache)
    shipped_dir = cached_build("edgepipe", name, model_dir, args.cache)["artifact"]
    # No prefix cache: the rounds repeat each prompt, and the step costs time its prefill.
    shipped = Generator(shipped_dir, prefix_cache_bytes=0)
    if not shipped.engine.verifies:
        raise SystemExit(f"{shipped_dir}: its decoder has no logits_to_keep input; rebuild it")
    doc = {
        "model": name,
        "graph": "shipped",
        "load_before": load_now(),
        "command": " ".join(sys.argv),
    }
    if not args.skip_steps and not args.serve:
        _costs(doc, args, shipped)
    for task, prompt in (("grounded", grounded_prompt()), ("free", FREE_PROMPT)):
        if args.serve:
            ids = shipped.encode(prompt)
            doc[task] = serve_end_to_end(shipped_dir, ids, args.gen_len, args.rounds)
        else:
            doc[task] = end_to_end(shipped, prompt, args.gen_len, args.rounds)
        summary = {k: v for k, v in doc[task].items() if k != "rounds"}
        print(f"{task}:", summary, "load", load_now(), flush=True)
    doc["load_after"] = load_now()
    write_json(args.out, doc)
    print(json.dumps({k: v for k, v in doc.items() if k not in ("grounded", "free")}, indent=1))
    return 0


def _costs(doc: dict, args, shipped) -> None:
    doc["step_cost"] = step_costs(shipped, args.context, args.ks, args.rounds * 2)
    print("verify step / 1-token step:", doc["step_cost"], "load", load_now(), flush=True)
    doc["step_cost_layers_only"] = step_costs(
        shipped, args.context, args.ks, args.rounds * 2, last_only=True
    )
    print("(K+1)-token step, last-position logits:", doc["step_cost_layers_only"], flush=True)


if __name__ == "__main__":
    sys.exit(main())
