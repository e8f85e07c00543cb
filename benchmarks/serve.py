"""`edgepipe serve` under 1, 4 and 8 concurrent streaming clients, against llama.cpp's llama-server.

Both servers get the same shape-exact random-weight model (Qwen2.5-0.5B shape by default):
edgepipe's int4 CPU build (`common.cached_build`) and llama.cpp's Q4_0 GGUF of the same folder
(`llama_cpp.gguf_q4_0`), the same `--parallel`, the same threads, and the same requests: a
prompt of `--prompt-len` token ids and `--gen-len` generated tokens (`ignore_eos`, so every
request generates exactly that many; edgepipe ignores the field, and a random model's chance of
sampling an eos in 64 tokens is ~1e-3). Each client sends `--requests` requests one after the
other, streaming, over `/v1/completions`; each server runs alone (never both at once).

Per concurrency level: aggregate generated tokens/s (all tokens / wall time of the level),
p50/p99 time to first token (request sent -> first streamed text), p50/p99 inter-token latency
(between streamed text chunks) and per-request decode tokens/s ((tokens - 1) / (last - first
token)). Goals (issue 15): at 4 clients, aggregate
>= 2.5x edgepipe's single-stream decode and >= 1.0x llama-server's; p99 TTFT at 4 clients
<= 2x the single-client one.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/llama_cpp.py server-setup   # once, ~5 min
    PYTHONPATH=$PWD .venv/bin/python benchmarks/serve.py [--skip-llama]

llama-server is built from the same vendored llama.cpp (`llama_cpp.py server-setup` adds the
target to llama_cpp.py's build folder). Results go to benchmarks/results/serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
from common import (  # noqa: E402
    CACHE,
    RESULTS,
    cached_build,
    load_now,
    machine_facts,
    source_model,
)

START_TIMEOUT_S = 300.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def edgepipe_cmd(artifact: str, port: int, parallel: int, threads: int) -> list[str]:
    return [sys.executable, "-m", "edgepipe.cli.main", "serve", artifact, "--port", str(port),
            "--parallel", str(parallel), "--threads", str(threads), "--max-queue", "64",
            "--model-name", "bench", "--max-length", "1024"]  # fmt: skip


def llama_cmd(gguf: str, port: int, parallel: int, threads: int) -> list[str]:
    from llama_cpp import binary

    # -c is the total context, split between the slots: 1024 per slot like edgepipe's.
    return [str(binary("llama-server")), "-m", gguf, "--host", "127.0.0.1", "--port", str(port),
            "--parallel", str(parallel), "-t", str(threads), "-c", str(1024 * parallel),
            "--alias", "bench", "--no-webui", "-cb"]  # fmt: skip


def wait_ready(url: str, proc: subprocess.Popen) -> None:
    import httpx

    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not become ready")


async def one_request(client, url: str, prompt: list[int], gen_len: int) -> dict:
    body = {"model": "bench", "prompt": prompt, "max_tokens": gen_len, "temperature": 0,
            "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    sent = time.perf_counter()
    times, usage = [], None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]["completion_tokens"]
            choices = event.get("choices") or []
            if choices and choices[0].get("text"):
                times.append(time.perf_counter())
    tokens = usage if usage is not None else len(times)
    first, last = (times[0], times[-1]) if times else (sent, sent)
    decode = (tokens - 1) / (last - first) if tokens > 1 and last > first else None
    gaps = np.diff(times).tolist() if len(times) > 1 else []
    return {"ttft_s": first - sent, "tokens": tokens, "decode_tps": decode, "gaps": gaps}


async def level(url: str, clients: int, requests: int, prompt_len: int, gen_len: int) -> dict:
    import httpx

    rng = np.random.default_rng(clients)
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def run() -> list[dict]:
            out = []
            for _ in range(requests):
                # Distinct prompts: no prefix reuse between requests (worst case for TTFT).
                prompt = rng.integers(1000, 100000, prompt_len).tolist()
                out.append(await one_request(client, url, prompt, gen_len))
            return out

        started = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(run() for _ in range(clients))) for r in rs]
        wall = time.perf_counter() - started
    ttft = np.array([r["ttft_s"] for r in results])
    decode = [r["decode_tps"] for r in results if r["decode_tps"]]
    gaps = [g for r in results for g in r["gaps"]] or [0.0]
    return {
        "clients": clients,
        "requests": len(results),
        "generated_tokens": int(sum(r["tokens"] for r in results)),
        "wall_s": round(wall, 3),
        "aggregate_tokens_per_s": round(sum(r["tokens"] for r in results) / wall, 2),
        "ttft_p50_s": round(float(np.percentile(ttft, 50)), 4),
        "ttft_p99_s": round(float(np.percentile(ttft, 99)), 4),
        "decode_tokens_per_s_mean": round(float(np.mean(decode)), 2) if decode else None,
        "itl_p50_s": round(float(np.percentile(gaps, 50)), 4),
        "itl_p99_s": round(float(np.percentile(gaps, 99)), 4),
        "load_after": load_now(),
    }


def bench_server(name: str, cmd: list[str], port: int, args) -> list[dict]:
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(BENCH_DIR.parent)}
    CACHE.mkdir(parents=True, exist_ok=True)
    log = open(CACHE / f"serve-{name}.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_ready(url, proc)
        asyncio.run(level(url, 1, 1, args.prompt_len, 8))  # warm-up, not recorded
        rows = []
        for clients in args.clients:
            row = asyncio.run(level(url, clients, args.requests, args.prompt_len, args.gen_len))
            print(f"[{name}] {json.dumps(row)}", flush=True)
            rows.append(row)
        return rows
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()


def goals(edgepipe: list[dict], llama: list[dict] | None) -> dict:
    """The issue's three ratios at 4 clients (None where a level or contender is missing)."""
    by = {r["clients"]: r for r in edgepipe}
    one, four = by.get(1), by.get(4)
    out = {}
    if one and four:
        single = one["decode_tokens_per_s_mean"]
        out["aggregate_4_over_single_decode"] = round(four["aggregate_tokens_per_s"] / single, 2)
        out["ttft_p99_4_over_1"] = round(four["ttft_p99_s"] / one["ttft_p99_s"], 2)
    llama_four = {r["clients"]: r for r in llama or []}.get(4)
    if four and llama_four:
        ratio = four["aggregate_tokens_per_s"] / llama_four["aggregate_tokens_per_s"]
        out["aggregate_4_over_llama_server"] = round(ratio, 2)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-0.5b", help="preset (default qwen2.5-0.5b)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--requests", type=int, default=3, help="requests per client (3)")
    parser.add_argument("--prompt-len", type=int, default=128)
    # 128 + 128 like side_by_side.py's decode rows (a chat turn's answer, not a one-liner).
    parser.add_argument("--gen-len", type=int, default=128)
    parser.add_argument("--parallel", type=int, default=8, help="slots, both servers (8)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--skip-llama", action="store_true", help="edgepipe only")
    args = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    model_dir = source_model(args.model)
    artifact = cached_build("edgepipe", args.model, model_dir)["artifact"]
    port = free_port()
    edgepipe = bench_server(
        "edgepipe", edgepipe_cmd(artifact, port, args.parallel, args.threads), port, args
    )
    llama = None
    if not args.skip_llama:
        from llama_cpp import binary, gguf_q4_0

        if not binary("llama-server").is_file():
            raise SystemExit(
                "llama-server is not built: run `benchmarks/llama_cpp.py server-setup`"
            )
        gguf = gguf_q4_0(args.model, model_dir)["artifact"]
        port = free_port()
        llama = bench_server(
            "llama-server", llama_cmd(gguf, port, args.parallel, args.threads), port, args
        )
    result = {
        "machine": machine_facts(),
        "settings": {k: v for k, v in vars(args).items()},
        "edgepipe": edgepipe,
        "llama_server": llama,
        "goals": goals(edgepipe, llama),
    }
    (RESULTS / "serve.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["goals"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
