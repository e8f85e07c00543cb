"""Runtime contenders as child processes: edgepipe.runtime and onnxruntime-genai.

Each contender lives in its own process, so one's thread pool (onnxruntime threads spin for a
while after each run) never competes with the other's timings and peak RSS is per contender.
A `Worker` loads an artifact once and answers requests over stdin/stdout (one JSON line each);
the parent alternates requests between workers. `run_once` starts a fresh process for one
request and reports its peak RSS, for memory at a given setting.

A request is a greedy generation of exactly `gen_len` tokens from `prompt_len` random ordinary
token ids (seeded): edgepipe with `stop_token_ids=[]`, genai with `min_length` past the end
(so an end token cannot stop it early). Both measure the same intervals: time to first token
from the start of the call (KV allocation included) to the first sampled token; prefill =
prompt tokens / that time; decode = (gen_len - 1) tokens / the rest.

    python benchmarks/runners.py edgepipe ARTIFACT --once 512 128      # one request, peak RSS
    python benchmarks/runners.py genai ARTIFACT --max-length 640 --once 512 128
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
from common import MIB, OFFLINE_ENV, REPO, load_now, run_measured  # noqa: E402

KINDS = ("edgepipe", "genai")


def prompt_ids(length: int, seed: int = 0) -> list[int]:
    """Random ordinary BPE ids (special tokens start at 151643), the same for every contender."""
    import numpy as np

    return np.random.default_rng(seed).integers(100, 150000, size=length).tolist()


def peak_rss_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def current_rss_bytes() -> int | None:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except OSError:
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


class EdgepipeContender:
    """edgepipe.runtime.Generator at its defaults unless options say otherwise."""

    def __init__(
        self, artifact: str, max_length=None, threads=None, session_config=(), spinning=None
    ):
        import inspect

        from edgepipe.runtime import Generator

        options = {"session_config": dict(session_config)} if session_config else {}
        if spinning:
            options["spinning"] = spinning
        # The rounds repeat each prompt: a prefix cache would time a 2-token prefill. A
        # --baseline-src checkout from before the cache has no such option (and no cache).
        if "prefix_cache_bytes" in inspect.signature(Generator).parameters:
            options["prefix_cache_bytes"] = 0
        self.gen = Generator(
            artifact, max_length=max_length, intra_op_num_threads=threads, **options
        )

    def request(self, prompt: list[int], gen_len: int) -> dict:
        result = self.gen.generate(
            prompt, max_new_tokens=gen_len, do_sample=False, stop_token_ids=[]
        )
        m = result.metrics
        return {
            "time_to_first_token_s": m.time_to_first_token_s,
            "prefill_tokens_per_s": m.prefill_tokens_per_s,
            "decode_tokens_per_s": m.decode_tokens_per_s,
            "generated": len(result.token_ids),
            "token_ids": result.token_ids,
            "kv_bytes": m.kv_bytes,
        }


class GenaiContender:
    """onnxruntime-genai on its own artifact, with its genai_config.json defaults."""

    def __init__(
        self, artifact: str, max_length=None, threads=None, session_config=(), spinning=None
    ):
        import onnxruntime_genai as og

        if threads or session_config or spinning:
            raise ValueError("genai runs at its artifact's session options")
        self.og = og
        self.model = og.Model(artifact)
        self.max_length = max_length

    def request(self, prompt: list[int], gen_len: int) -> dict:
        og = self.og
        started = time.perf_counter()
        params = og.GeneratorParams(self.model)
        options = {"do_sample": False, "min_length": len(prompt) + gen_len + 1}
        if self.max_length:
            options["max_length"] = self.max_length
        params.set_search_options(**options)
        generator = og.Generator(self.model, params)
        generator.append_tokens(prompt)
        generator.generate_next_token()
        out = [int(generator.get_next_tokens()[0])]
        first = time.perf_counter()
        while len(out) < gen_len and not generator.is_done():
            generator.generate_next_token()
            out.append(int(generator.get_next_tokens()[0]))
        end = time.perf_counter()
        ttft = first - started
        return {
            "time_to_first_token_s": ttft,
            "prefill_tokens_per_s": len(prompt) / ttft,
            "decode_tokens_per_s": (len(out) - 1) / (end - first) if len(out) > 1 else 0.0,
            "generated": len(out),
            "token_ids": out,
        }


CONTENDERS = {"edgepipe": EdgepipeContender, "genai": GenaiContender}


def busy_threads() -> int | None:
    """Threads of this process that did real work: CPU time above 10% of the busiest thread's.

    onnxruntime-genai 0.18 runs its decoder on one thread while edgepipe's session uses one per
    core; on a loaded machine that decides who suffers from stragglers, so it is recorded.
    """
    try:
        ticks = [
            sum(int(x) for x in (task / "stat").read_text().rsplit(")", 1)[1].split()[11:13])
            for task in Path("/proc/self/task").iterdir()
        ]
    except OSError:
        return None
    top = max(ticks, default=0)
    return sum(1 for t in ticks if top and t > 0.1 * top)


def _answer(contender, prompt_len: int, gen_len: int, seed: int) -> dict:
    prompt = prompt_ids(prompt_len, seed)
    started = time.perf_counter()
    row = contender.request(prompt, gen_len)
    row["total_s"] = time.perf_counter() - started
    row["load"] = load_now()
    row["token_ids"] = row["token_ids"][:16]
    return row


def _serve(kind: str, artifact: str, **options) -> None:
    started = time.perf_counter()
    contender = CONTENDERS[kind](artifact, **options)
    ready = {
        "ready": kind,
        "load_s": time.perf_counter() - started,
        "rss_after_load_bytes": current_rss_bytes(),
    }
    print(json.dumps(ready), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("quit"):
            break
        row = _answer(contender, request["prompt_len"], request["gen_len"], request.get("seed", 0))
        print(json.dumps(row), flush=True)
    print(json.dumps({"peak_rss_bytes": peak_rss_bytes(), "busy_threads": busy_threads()}))
    sys.stdout.flush()


def _child_env(src: Path | None) -> dict[str, str]:
    # `src`: a checkout whose edgepipe the child imports (default this one): the same
    # benchmark can time the main branch's runtime against a working tree's.
    path = str(src or REPO)
    extra = os.environ.get("PYTHONPATH")
    return {**os.environ, **OFFLINE_ENV, "PYTHONPATH": path + (os.pathsep + extra if extra else "")}


def _options_args(max_length, threads, session_config, spinning=None) -> list[str]:
    args = ["--spinning", spinning] if spinning else []
    if max_length:
        args += ["--max-length", str(max_length)]
    if threads:
        args += ["--threads", str(threads)]
    for key, value in session_config:
        args += ["--session-config", f"{key}={value}"]
    return args


class Worker:
    """A contender in a child process; `request()` sends one generation and returns its row.

    Args:
        kind: "edgepipe" or "genai".
        artifact: the folder that contender runs.
        name: label in the results.
        src: checkout to import edgepipe from (default: this repository).
        max_length, threads, session_config, spinning: contender options (see `--help`).
    """

    def __init__(
        self,
        kind: str,
        artifact: Path,
        *,
        name: str | None = None,
        src: Path | None = None,
        max_length: int | None = None,
        threads: int | None = None,
        session_config: tuple[tuple[str, str], ...] = (),
        spinning: str | None = None,
    ):
        self.name = name or kind
        cmd = [sys.executable, __file__, kind, str(artifact)]
        cmd += _options_args(max_length, threads, session_config, spinning)
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=_child_env(src),
            cwd=REPO,
        )
        self.ready = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise RuntimeError(f"{self.name} worker exited with code {code} (see its stderr)")
        return json.loads(line)

    def request(self, prompt_len: int, gen_len: int, seed: int = 0) -> dict:
        message = {"prompt_len": prompt_len, "gen_len": gen_len, "seed": seed}
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> dict:
        """Stop the worker; returns its final record (peak RSS)."""
        try:
            self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
            self.proc.stdin.flush()
            final = self._read()
        except (BrokenPipeError, RuntimeError, json.JSONDecodeError):
            final = {}
        self.proc.wait(timeout=60)
        return final


def run_once(
    kind: str,
    artifact: Path,
    prompt_len: int,
    gen_len: int,
    *,
    src: Path | None = None,
    max_length: int | None = None,
) -> dict:
    """One request in a fresh process: its timings, after-load RSS and peak RSS (`run_measured`)."""
    cmd = [sys.executable, __file__, kind, str(artifact), "--once", str(prompt_len), str(gen_len)]
    cmd += _options_args(max_length, None, ())
    done = run_measured(cmd, env=_child_env(src), cwd=REPO)
    if done["rc"]:
        return {"error": done["error"], "rc": done["rc"]}
    row = json.loads(done["stdout"].strip().splitlines()[-1])
    row.update(peak_rss_mib=done["peak_rss_mib"], rss_method=done["rss_method"])
    return row


def _pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("artifact")
    parser.add_argument("--max-length", type=int, help="KV positions cap (genai: max_length)")
    parser.add_argument("--threads", type=int, help="edgepipe: intra-op threads")
    parser.add_argument(
        "--session-config",
        type=_pair,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="edgepipe: onnxruntime session config entry (repeatable)",
    )
    parser.add_argument("--spinning", choices=("auto", "on", "off"), help="edgepipe: spinning=")
    parser.add_argument("--once", nargs=2, type=int, metavar=("PROMPT_LEN", "GEN_LEN"))
    args = parser.parse_args(argv)
    options = {
        "max_length": args.max_length,
        "threads": args.threads,
        "session_config": tuple(args.session_config),
        "spinning": args.spinning,
    }
    if args.once is None:
        _serve(args.kind, args.artifact, **options)
        return 0
    started = time.perf_counter()
    contender = CONTENDERS[args.kind](args.artifact, **options)
    loaded = {"load_s": time.perf_counter() - started, "rss_after_load_bytes": current_rss_bytes()}
    row = _answer(contender, *args.once, seed=0)
    # Self-measured: includes any high-water mark inherited from the parent (see run_measured).
    row.update(loaded, self_peak_rss_mib=peak_rss_bytes() / MIB)
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
