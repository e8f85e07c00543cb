"""Cost of a LoRA adapter in the export: peak RSS and wall time with and without it.

Exports the same shape-exact random preset (common.source_model, bf16) twice in child
processes measured by common.run_measured: plain, then with a random rank-`r` PEFT-format
adapter on every linear (`target_modules: all-linear`) merged as the weights stream through
(`edgepipe.stages.lora`). The adapter is written with numpy in PEFT's file layout (no peft or
torch needed). Also times reading the adapter alone (every A and B once), the floor the merge
cannot go below. Run from the repository root:

    PYTHONPATH=$PWD .venv/bin/python benchmarks/adapter_export.py --models qwen2.5-0.5b

Goals (issue 20): peak RSS with the adapter <= 1.2x without; the extra wall time no more than
reading the adapter plus noise.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
from common import folder_bytes, run_measured, source_model  # noqa: E402

CHILD = (
    "import sys, json; from pathlib import Path; "
    "from edgepipe.stages.export.dynamic import build_decoder; "
    "from edgepipe.stages.lora import open_merged; "
    "src, out, adapter = Path(sys.argv[1]), sys.argv[2], sys.argv[3]; "
    "tied = json.loads((src / 'config.json').read_text())['tie_word_embeddings']; "
    "w = open_merged(src, adapter, tied=tied) if adapter else None; "
    "r = build_decoder(src, out, weights=w); print('bytes_written', r.bytes_written)"
)
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_random_adapter(src: Path, out: Path, rank: int, seed: int = 0) -> Path:
    """A PEFT-layout LoRA adapter (float32 A and B) on every linear of the model in `src`."""
    from edgepipe.formats.safetensors import SafetensorsModel, write_safetensors

    base = SafetensorsModel(src)
    rng = np.random.default_rng(seed)
    tensors = {}
    for name in base.names():
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in LINEAR:
            n_out, n_in = base.info(name).shape
            key = f"base_model.model.{module}"
            tensors[f"{key}.lora_A.weight"] = rng.normal(0, 0.02, (rank, n_in)).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = rng.normal(0, 0.02, (n_out, rank)).astype(np.float32)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "adapter_model.safetensors", tensors)
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": "all-linear",
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def read_seconds(adapter: Path) -> float:
    """Wall time to read the adapter's config and every A and B tensor once."""
    from edgepipe.formats.peft import read_adapter
    from edgepipe.formats.safetensors import read_tensor

    started = time.perf_counter()
    for pair in read_adapter(adapter).pairs.values():
        read_tensor(pair.a), read_tensor(pair.b)
    return time.perf_counter() - started


def bench_model(name: str, work: Path, rank: int, keep: bool) -> dict:
    src = source_model(name)
    adapter = write_random_adapter(src, work / f"{name}-lora-r{rank}", rank)
    row: dict = {"model": name, "rank": rank, "adapter_bytes": folder_bytes(adapter)}
    row["adapter_read_s"] = round(read_seconds(adapter), 3)
    for label, adapter_arg in (("plain", ""), ("adapter", str(adapter))):
        out = work / f"{name}-{label}"
        row[label] = run_measured([sys.executable, "-c", CHILD, str(src), str(out), adapter_arg])
        row[label].pop("stdout", None)
        print(f"[{name}] {label} {row[label]}", flush=True)
        if not keep:
            shutil.rmtree(out, ignore_errors=True)
    if row["plain"]["rc"] == 0 and row["adapter"]["rc"] == 0:
        row["rss_ratio"] = round(row["adapter"]["peak_rss_mib"] / row["plain"]["peak_rss_mib"], 3)
        row["extra_wall_s"] = round(row["adapter"]["wall_s"] - row["plain"]["wall_s"], 2)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgepipe-adapter-bench"))
    parser.add_argument("--models", nargs="+", default=["qwen2.5-0.5b"], help="preset names")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--keep", action="store_true", help="keep the written folders")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    rows = [bench_model(name, args.work, args.rank, args.keep) for name in args.models]
    print(json.dumps(rows, indent=2))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
