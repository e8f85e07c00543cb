"""The memory-bandwidth roofline of decoding: measured read bandwidth / bytes read per token.

Decoding one token reads every weight a MatMul touches once (the int4 codes, scales and zero
points, the norms and biases) plus the KV cache written so far; at batch 1 that traffic, not
arithmetic, bounds the speed on a CPU. So the fastest possible decode is
`bandwidth / bytes_per_token`, and a runtime's decode speed as a fraction of it says how much
is left to win.

* Bandwidth: a streaming read over a buffer several times the last-level cache, on every
  core. With a C compiler on PATH a small AVX-512/AVX2 XOR-reduce kernel is compiled into the
  cache (OpenMP threads); otherwise numpy's `max` over per-thread slices (the GIL is released
  in the reduction). Best of `repeats` passes: the fastest pass is what the memory system can
  deliver; slower ones measure the other users of the machine.
* Bytes per token: from the artifact's graph (`onnx.load` without the weights): every
  initializer read by a node other than a gather (the embedding lookup reads one row; the
  rotary caches one row per position), plus the KV cache of `context` positions.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/roofline.py
    PYTHONPATH=$PWD .venv/bin/python benchmarks/roofline.py --artifact DIR --context 192
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
from common import CACHE  # noqa: E402

# 2 GiB: ~7x the 300 MiB L3 this VM reports (the host's), far past any CPU's LLC today.
DEFAULT_BUFFER = 2 * 2**30

_KERNEL = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <time.h>
#include <immintrin.h>
#if defined(__AVX512F__)
typedef __m512i vec;
#define VXOR _mm512_xor_si512
#define VZERO _mm512_setzero_si512
#else
typedef __m256i vec;
#define VXOR _mm256_xor_si256
#define VZERO _mm256_setzero_si256
#endif
static double now(void) {
  struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9;
}
int main(int argc, char **argv) {
  size_t bytes = strtoull(argv[1], 0, 10), n = bytes / sizeof(vec);
  int repeats = atoi(argv[2]);
  vec *a = aligned_alloc(64, n * sizeof(vec));
  memset(a, 1, n * sizeof(vec));
  for (int r = 0; r < repeats; r++) {
    double t = now();
    vec acc = VZERO();
    #pragma omp parallel
    {
      vec x0 = VZERO(), x1 = x0, x2 = x0, x3 = x0;
      #pragma omp for schedule(static)
      for (size_t i = 0; i < n; i += 4) {
        x0 = VXOR(x0, a[i]); x1 = VXOR(x1, a[i + 1]);
        x2 = VXOR(x2, a[i + 2]); x3 = VXOR(x3, a[i + 3]);
      }
      #pragma omp critical
      acc = VXOR(acc, VXOR(VXOR(x0, x1), VXOR(x2, x3)));
    }
    double dt = now() - t;
    uint64_t sink[sizeof(vec) / 8]; memcpy(sink, &acc, sizeof(vec));
    printf("%.6f %llu\n", dt, (unsigned long long)(sink[0] & 1));
  }
  return 0;
}
"""


def _compiled_kernel(cache: Path) -> Path | None:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    folder = cache / "bandwidth"
    folder.mkdir(parents=True, exist_ok=True)
    source, binary = folder / "read_bw.c", folder / "read_bw"
    stale = not binary.is_file() or not source.is_file() or source.read_text() != _KERNEL
    if stale:
        source.write_text(_KERNEL)
        done = subprocess.run(
            [cc, "-O3", "-march=native", "-fopenmp", str(source), "-o", str(binary)],
            capture_output=True,
            text=True,
        )
        if done.returncode:
            return None
    return binary


def _numpy_passes(size: int, threads: int, repeats: int) -> list[float]:
    import numpy as np

    buf = np.ones(size // 8, dtype=np.float64)
    parts = np.array_split(buf, threads)
    seconds = []
    for _ in range(repeats):
        gate = threading.Barrier(threads + 1)

        def work(part, gate=gate):
            gate.wait()
            np.max(part)
            gate.wait()

        pool = [threading.Thread(target=work, args=(p,)) for p in parts]
        for t in pool:
            t.start()
        gate.wait()
        started = time.perf_counter()
        gate.wait()
        seconds.append(time.perf_counter() - started)
        for t in pool:
            t.join()
    return seconds


def measure_bandwidth(
    size: int = DEFAULT_BUFFER,
    threads: int | None = None,
    repeats: int = 7,
    cache: Path = CACHE,
) -> dict:
    """Streaming read bandwidth over `size` bytes on `threads` threads (default: all cores).

    Returns:
        `best_bytes_per_s` (the roofline uses it), `median_bytes_per_s`, `method`, `threads`,
        `buffer_bytes`, `passes_s`.
    """
    threads = threads or os.cpu_count() or 1
    binary = _compiled_kernel(cache)
    if binary is not None:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_PROC_BIND": "spread"}
        out = subprocess.run(
            [str(binary), str(size), str(repeats)], capture_output=True, text=True, env=env
        )
        seconds = [float(line.split()[0]) for line in out.stdout.splitlines() if line.strip()]
        method = "c-openmp-simd-xor"
    else:
        seconds, method = _numpy_passes(size, threads, repeats), "numpy-threads-max"
    if not seconds:
        raise RuntimeError("bandwidth kernel produced no timings")
    ordered = sorted(seconds)
    return {
        "best_bytes_per_s": size / ordered[0],
        "median_bytes_per_s": size / ordered[len(ordered) // 2],
        "method": method,
        "threads": threads,
        "buffer_bytes": size,
        "passes_s": [round(s, 5) for s in seconds],
    }


_ITEMSIZE = {1: 4, 2: 1, 3: 1, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 16: 2, 21: 0.5, 22: 0.5}
_GATHERS = {"Gather", "GatherBlockQuantized", "GatherElements", "GatherND"}


def decoder_geometry(artifact: Path) -> dict:
    """Layers, KV heads, head size and KV dtype bytes from the artifact's genai_config.json."""
    config = json.loads((Path(artifact) / "genai_config.json").read_text())
    dec = config["model"]["decoder"]
    return {
        "layers": dec["num_hidden_layers"],
        "kv_heads": dec["num_key_value_heads"],
        "head_dim": dec["head_size"],
    }


def weight_bytes_per_token(model_path: Path) -> dict:
    """Bytes of initializers a decode step reads, from the graph (weights are not loaded).

    An initializer counts when any consumer is not a gather: the tied int4 table is both the
    embedding (gathered, one row) and the lm_head (read whole), so it counts once, whole.
    GroupQueryAttention's cos/sin caches are read one row per position and are left out.
    """
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    sizes = {}
    for init in graph.initializer:
        count = 1
        for d in init.dims:
            count *= d
        sizes[init.name] = count * _ITEMSIZE.get(init.data_type, 4)
    readers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            if name in sizes:
                readers.setdefault(name, set()).add(node.op_type)
    counted = 0
    skipped = 0
    for name, ops in readers.items():
        per_row = ops <= _GATHERS or ops == {"GroupQueryAttention"}
        if per_row:
            skipped += sizes[name]
        else:
            counted += sizes[name]
    return {"weights_read": int(counted), "gathered_not_counted": int(skipped)}


def kv_bytes_per_token(geometry: dict, context: float, dtype_bytes: int = 4) -> float:
    """KV bytes one decode step reads with `context` cached positions (all layers, K and V)."""
    g = geometry
    return 2 * g["layers"] * g["kv_heads"] * g["head_dim"] * dtype_bytes * context


def roofline(artifact: Path, bandwidth: float, prompt_len: int, gen_len: int) -> dict:
    """Decode roofline for `gen_len` tokens after a `prompt_len` prompt (mean KV length)."""
    artifact = Path(artifact)
    weights = weight_bytes_per_token(artifact / "model.onnx")
    geometry = decoder_geometry(artifact)
    mean_context = prompt_len + (gen_len - 1) / 2
    kv = kv_bytes_per_token(geometry, mean_context)
    per_token = weights["weights_read"] + kv
    return {
        **weights,
        "kv_read_mean": int(kv),
        "bytes_per_token": int(per_token),
        "bandwidth_bytes_per_s": bandwidth,
        "roofline_tokens_per_s": bandwidth / per_token,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, action="append", default=[])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=128)
    parser.add_argument("--buffer-mib", type=int, default=DEFAULT_BUFFER // 2**20)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    bw = measure_bandwidth(args.buffer_mib * 2**20, args.threads)
    report = {"bandwidth": bw, "artifacts": {}}
    for artifact in args.artifact:
        report["artifacts"][str(artifact)] = roofline(
            artifact, bw["best_bytes_per_s"], args.prompt_len, args.gen_len
        )
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
