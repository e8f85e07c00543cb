"""An int4 artifact gives the same greedy tokens and logits on an AVX2-only CPU (emulated).

This host has AVX-512, so onnxruntime takes other kernels here than on most laptops; upstream
has reported wrong MatMulNBits results on AVX2-only hosts for int4 with zero points at M=1.
The check builds a tiny asymmetric int4 graph (zero points, block 32, int4 lm_head) and runs
the same greedy decode natively and under `qemu-x86_64 -cpu Haswell` (AVX2, no AVX-512).
Slow (importing onnxruntime under emulation takes ~15 s); `scripts/test.sh` installs qemu-user.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgepipe.stages.export.dynamic import build_decoder
from edgepipe.stages.quantize.plan import QuantPlan

REPO = Path(__file__).resolve().parents[1]
QEMU = shutil.which("qemu-x86_64")

pytestmark = pytest.mark.slow


def probe(folder: Path, prefix: list[str]) -> dict:
    argv = [*prefix, sys.executable, "-m", "tests.fixtures.avx2_probe", str(folder)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


@pytest.mark.skipif(
    QEMU is None and os.environ.get("CI") != "true",
    reason="qemu-x86_64 not installed (scripts/test.sh installs it; CI fails without it)",
)
def test_int4_with_zero_points_decodes_the_same_on_an_avx2_only_cpu(tiny_qwen2_dir, tmp_path):
    assert QEMU is not None, "CI=true: qemu-user must be installed (scripts/test.sh does it)"
    quant = QuantPlan.from_precision("int4", block_size=32, symmetric=False, lm_head="int4")
    build_decoder(tiny_qwen2_dir, tmp_path / "int4", quant=quant, context_length=64)
    native = probe(tmp_path / "int4", [])
    haswell = probe(tmp_path / "int4", [QEMU, "-cpu", "Haswell"])
    assert haswell["tokens"] == native["tokens"]
    a, b = np.array(native["logits"]), np.array(haswell["logits"])
    scale = float(np.abs(a).max())
    assert float(np.abs(a - b).max()) <= 1e-3 * scale + 1e-4, "AVX2 logits differ from native"
