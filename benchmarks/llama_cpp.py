"""llama.cpp as an optional third contender (its code is fetched into the cache, never committed).

The `llama-cpp-python` source package on PyPI vendors llama.cpp with its HF→GGUF converter.
`setup()` downloads it with pip (`pip download --no-binary :all: llama-cpp-python`), unpacks it
into `benchmarks/.cache/llama.cpp/` and builds `llama-bench` and `llama-quantize` with cmake
(native CPU flags; ~4 minutes on 2 cores). `gguf_q4_0()` converts a model folder to a bf16
GGUF with the vendored `convert_hf_to_gguf.py` (its `gguf-py` on PYTHONPATH; needs torch and
transformers, the bench/test extras) and quantizes it to Q4_0. `LlamaBench.round()` runs
`llama-bench -p 128,512 -n 128 -r 1` once: pp = prompt tokens/s, tg = generated tokens/s from
an empty context (llama-bench's own definitions).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/llama_cpp.py setup
    PYTHONPATH=$PWD .venv/bin/python benchmarks/llama_cpp.py server-setup   # + llama-server
    PYTHONPATH=$PWD .venv/bin/python benchmarks/llama_cpp.py bench qwen2.5-0.5b
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
from common import CACHE, folder_bytes, load_now, run_measured, source_model  # noqa: E402

HOME = CACHE / "llama.cpp"
BUILD = HOME / "build"
# The converter's Qwen2 path imports sentencepiece before it falls back to the BPE vocabulary,
# and the sdist's Python binding (`teacher_forced_logits`) imports diskcache; they go here
# (pip --target), not into the project's environment.
PYDEPS = HOME / "pydeps"
PYDEPS_NEEDED = ("sentencepiece", "diskcache")
TOOLS = ("llama-bench", "llama-quantize")


def _source_dir() -> Path | None:
    found = sorted(HOME.glob("llama_cpp_python-*/vendor/llama.cpp"))
    return found[-1] if found else None


def binary(name: str) -> Path:
    return BUILD / "bin" / name


def available() -> bool:
    """True when llama-bench and llama-quantize are built in the cache."""
    built = all(binary(t).is_file() for t in TOOLS)
    deps = all((PYDEPS / name).is_dir() for name in PYDEPS_NEEDED)
    return built and _source_dir() is not None and deps


# /proc/cpuinfo flag -> ggml's CMake switch. AMX is left out on purpose: this VM reports
# amx_tile/amx_int8 but faults on `tilezero` (SIGILL in ggml's AMX Q4_0 matmul with
# GGML_NATIVE=ON), so the build names every other extension explicitly instead of -march=native.
_GGML_FLAGS = {
    "avx": "GGML_AVX",
    "avx2": "GGML_AVX2",
    "fma": "GGML_FMA",
    "f16c": "GGML_F16C",
    "bmi2": "GGML_BMI2",
    "avx_vnni": "GGML_AVX_VNNI",
    "avx512f": "GGML_AVX512",
    "avx512vbmi": "GGML_AVX512_VBMI",
    "avx512_vnni": "GGML_AVX512_VNNI",
    "avx512_bf16": "GGML_AVX512_BF16",
}


def _cpu_options() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ["-DGGML_NATIVE=ON"]
    flags = set(next((ln for ln in text.splitlines() if ln.startswith("flags")), "").split())
    return ["-DGGML_NATIVE=OFF"] + [
        f"-D{switch}={'ON' if flag in flags else 'OFF'}" for flag, switch in _GGML_FLAGS.items()
    ]


def setup(jobs: int | None = None) -> Path:
    """Download, unpack and build llama.cpp into the cache (each step skipped when done)."""
    HOME.mkdir(parents=True, exist_ok=True)
    if _source_dir() is None:
        if not list(HOME.glob("llama_cpp_python-*.tar.gz")):
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
                + ["llama-cpp-python", "-d", str(HOME)],
                check=True,
            )
        archive = sorted(HOME.glob("llama_cpp_python-*.tar.gz"))[-1]
        with tarfile.open(archive) as tar:
            tar.extractall(HOME, filter="data")
    missing = [name for name in PYDEPS_NEEDED if not (PYDEPS / name).is_dir()]
    if missing:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--target", str(PYDEPS), *missing],
            check=True,
        )
    src = _source_dir()
    if not available():
        options = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF"]
        options += ["-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", *_cpu_options()]
        subprocess.run(["cmake", "-S", str(src), "-B", str(BUILD), *options], check=True)
        jobs = jobs or os.cpu_count() or 1
        subprocess.run(
            ["cmake", "--build", str(BUILD), "--target", *TOOLS, "-j", str(jobs)], check=True
        )
    return BUILD


def setup_server(jobs: int | None = None) -> Path:
    """Build llama-server into the same build folder (after `setup`; for benchmarks/serve.py).

    The server is left out of `setup`'s configuration (a minute more of compiling that the other
    benchmarks never use); this re-configures the folder with it and builds that target only.
    """
    setup(jobs)
    if not binary("llama-server").is_file():
        switches = ["-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON"]
        subprocess.run(["cmake", "-S", str(_source_dir()), "-B", str(BUILD), *switches], check=True)
        jobs = jobs or os.cpu_count() or 1
        subprocess.run(
            ["cmake", "--build", str(BUILD), "--target", "llama-server", "-j", str(jobs)],
            check=True,
        )
    return binary("llama-server")


def gguf_q4_0(name: str, model_dir: Path, cache: Path = CACHE) -> dict:
    """The Q4_0 GGUF of `model_dir` (converted and quantized once, then reused)."""
    folder = cache / "builds" / name / "llama.cpp"
    out = folder / "model-q4_0.gguf"
    record_path = folder / "build.json"
    if out.is_file() and record_path.is_file():
        return json.loads(record_path.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    src = _source_dir()
    bf16 = folder / "model-bf16.gguf"
    env = {"PYTHONPATH": os.pathsep.join([str(src / "gguf-py"), str(src), str(PYDEPS)])}
    convert = [sys.executable, str(src / "convert_hf_to_gguf.py"), str(model_dir)]
    convert += ["--outfile", str(bf16), "--outtype", "bf16"]
    converted = run_measured(convert, env=env)
    if converted["rc"]:
        raise RuntimeError(f"convert_hf_to_gguf failed:\n{converted['error']}")
    quantized = run_measured([str(binary("llama-quantize")), str(bf16), str(out), "Q4_0"])
    if quantized["rc"]:
        raise RuntimeError(f"llama-quantize failed:\n{quantized['error']}")
    bf16.unlink()
    record = {
        "artifact": str(out),
        "artifact_bytes": folder_bytes(folder, "model-q4_0"),
        "convert": {k: converted[k] for k in ("wall_s", "peak_rss_mib")},
        "quantize": {k: quantized[k] for k in ("wall_s", "peak_rss_mib")},
        "wall_s": round(converted["wall_s"] + quantized["wall_s"], 2),
        "peak_rss_mib": max(converted["peak_rss_mib"], quantized["peak_rss_mib"]),
    }
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return record


# Teacher-forced logits of a GGUF through the sdist's own ctypes binding (`llama_cpp/`, the
# Python half of llama-cpp-python) over the libllama built in the cache: argv = GGUF, ids file
# (JSON list), output .npy. A child process: the binding's package is also named llama_cpp.
_LOGITS_CHILD = """
import json, sys
import numpy as np
from llama_cpp import Llama
ids = json.loads(open(sys.argv[2]).read())
llm = Llama(sys.argv[1], n_ctx=len(ids) + 8, n_batch=len(ids), n_ubatch=len(ids),
            logits_all=True, n_threads=2, verbose=False)
llm.eval(ids)
np.save(sys.argv[3], np.asarray(llm.scores[: len(ids)], dtype=np.float32))
"""


def teacher_forced_logits(gguf: Path, ids: list[int], work: Path):
    """llama.cpp's logits at every position of `ids` fed at once ([len(ids), vocab] float32)."""
    import numpy as np

    work.mkdir(parents=True, exist_ok=True)
    (work / "ids.json").write_text(json.dumps([int(t) for t in ids]))
    out = work / "logits.npy"
    sdist = _source_dir().parent.parent  # .../llama_cpp_python-X/vendor/llama.cpp -> sdist
    path = os.pathsep.join([str(sdist), str(PYDEPS)])
    env = {**os.environ, "PYTHONPATH": path, "LLAMA_CPP_LIB_PATH": str(BUILD / "bin")}
    cmd = [sys.executable, "-c", _LOGITS_CHILD, str(gguf), str(work / "ids.json"), str(out)]
    subprocess.run(cmd, check=True, env=env, cwd=work)
    return np.load(out)


class LlamaBench:
    """One llama-bench run per round; same prompt lengths and generated tokens as the others."""

    name = "llama.cpp"

    def __init__(self, gguf: Path, threads: int | None = None):
        self.gguf = Path(gguf)
        self.threads = threads or os.cpu_count() or 1

    def round(self, prompt_lens, gen_len: int) -> dict:
        """{prompt_len: row} with prefill and decode tokens/s and the run's peak RSS."""
        cmd = [str(binary("llama-bench")), "-m", str(self.gguf), "-t", str(self.threads)]
        cmd += ["-p", ",".join(str(p) for p in prompt_lens), "-n", str(gen_len)]
        cmd += ["-r", "1", "-o", "json"]
        done = run_measured(cmd)
        if done["rc"]:
            raise RuntimeError(f"llama-bench failed:\n{done['error']}")
        tests = json.loads(done["stdout"])
        decode = next(t["avg_ts"] for t in tests if t["n_gen"] > 0 and t["n_prompt"] == 0)
        rows = {}
        for prompt_len in prompt_lens:
            pp = next(t["avg_ts"] for t in tests if t["n_prompt"] == prompt_len and t["n_gen"] == 0)
            rows[prompt_len] = {
                "prefill_tokens_per_s": pp,
                "time_to_first_token_s": prompt_len / pp,
                "decode_tokens_per_s": decode,
                "peak_rss_bytes": int(done["peak_rss_mib"] * 2**20),
                "load": load_now(),
            }
        return rows

    def peak_rss_mib(self, prompt_len: int, gen_len: int) -> float:
        """Peak RSS of one llama-bench run of a `prompt_len` prompt and `gen_len` tokens (its
        context holds both: the runtime memory of that request, plus llama-bench's own)."""
        cmd = [str(binary("llama-bench")), "-m", str(self.gguf), "-t", str(self.threads)]
        cmd += ["-pg", f"{prompt_len},{gen_len}", "-p", "0", "-n", "0", "-r", "1", "-o", "json"]
        done = run_measured(cmd)
        if done["rc"]:
            raise RuntimeError(f"llama-bench failed:\n{done['error']}")
        return done["peak_rss_mib"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("setup", help="download and build llama.cpp into the cache")
    sub.add_parser("server-setup", help="setup, then build llama-server (benchmarks/serve.py)")
    bench = sub.add_parser("bench", help="convert a shape-exact model and run llama-bench once")
    bench.add_argument("model", help="preset name, e.g. qwen2.5-0.5b")
    args = parser.parse_args(argv)
    if args.command == "setup":
        print(setup())
        return 0
    if args.command == "server-setup":
        print(setup_server())
        return 0
    if not available():
        raise SystemExit("llama.cpp is not built: run `benchmarks/llama_cpp.py setup` first")
    record = gguf_q4_0(args.model, source_model(args.model))
    rows = LlamaBench(record["artifact"]).round([128, 512], 128)
    print(json.dumps({"build": record, "round": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
