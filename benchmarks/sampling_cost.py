"""Cost of picking one token over the 151,936-entry vocabulary: this checkout vs a git revision.

Both versions of `edgepipe/runtime/sampling.py` run in one process, alternated (ABBA) per case;
the minimum over rounds is reported (the least disturbed by other load) with the medians.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/sampling_cost.py --baseline e575115
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
VOCAB = 151936
CASES = {
    "greedy": {},
    "qwen2.5 defaults (T0.7 k20 p0.8)": {
        "do_sample": True,
        "temperature": 0.7,
        "top_k": 20,
        "top_p": 0.8,
    },
    "top_p 0.9 only, flat logits": {"do_sample": True, "top_p": 0.9},
    "top_p 0.9 only, peaked logits": {"do_sample": True, "top_p": 0.9},
    "min_p 0.05 only": {"do_sample": True, "min_p": 0.05},
}


def load_baseline(revision: str):
    source = subprocess.run(
        ["git", "show", f"{revision}:edgepipe/runtime/sampling.py"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "sampling_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("sampling_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["sampling_baseline"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def time_pick(module, params: dict, logits: np.ndarray, n: int) -> float:
    sampler = module.Sampler(module.SamplingParams(seed=0, **params))
    started = time.perf_counter()
    for _ in range(n):
        sampler.pick(logits, ())
    return (time.perf_counter() - started) / n * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="e575115", help="git revision to compare with")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args(argv)
    import edgepipe.runtime.sampling as current

    versions = {"baseline": load_baseline(args.baseline), "current": current}
    rng = np.random.default_rng(0)
    flat = (rng.standard_normal(VOCAB) * 3).astype(np.float32)
    peaked = (rng.standard_normal(VOCAB) * 8).astype(np.float32)
    print(f"load {os.getloadavg()}")
    for name, params in CASES.items():
        logits = peaked if "peaked" in name else flat
        times: dict[str, list[float]] = {"baseline": [], "current": []}
        for r in range(args.rounds):
            for which in ("baseline", "current") if r % 2 == 0 else ("current", "baseline"):
                times[which].append(time_pick(versions[which], params, logits, args.calls))
        old, new = min(times["baseline"]), min(times["current"])
        medians = [statistics.median(times[k]) for k in ("baseline", "current")]
        print(
            f"{name}: baseline {old:.0f} us, current {new:.0f} us, current/baseline "
            f"{new / old:.3f} (min of {args.rounds} ABBA rounds; medians "
            f"{medians[0]:.0f} / {medians[1]:.0f})"
        )
    print(f"load {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
