"""On-disk size of int4 builds vs the theoretical bytes, and vs onnxruntime-genai's int4 build.

A shape-exact random Qwen2.5-0.5B (preset "qwen2.5-0.5b", bf16 safetensors) is exported with
`build_decoder` at int4 block 32 (rtn) in the `VARIANTS` below (symmetric or not, a shared int4
or int8 embedding, float32 or float16 activations), and by onnxruntime-genai's model builder
(`-p int4 -e cpu`) from the same folder. The theoretical size counts, per quantized `[K, N]`
weight: K·N·bits/8 bytes of codes, N·ceil(K/32) scales in the activation dtype and, when
asymmetric, N·ceil(ceil(K/32)·bits/8) zero-point bytes; plus every float tensor (norms, q/k/v
biases) and the rotary cos/sin caches (context × head_dim/2 × 2) in the activation dtype.
Graph protobuf overhead is the difference.

Measured (2026-11, onnxruntime 1.31.1, onnxruntime-genai 0.18.0), bytes of model.onnx(+.data):

| build | bytes | theoretical |
|---|---|---|
| edgepipe int4 sym, shared int4 embedding, fp32 | 317,538,047 | 317,400,576 (1.0004x) |
| onnxruntime-genai `-p int4 -e cpu` (the same layout) | 317,592,547 | |
| edgepipe int4 asym, shared int4 embedding, fp32 | 325,280,867 | 325,118,720 (1.0005x) |
| edgepipe int4 asym, shared int8 embedding, fp32 | 395,475,316 | 395,313,152 (1.0004x) |
| edgepipe int4 asym, shared int4 embedding, fp16 | 290,070,812 | 289,908,736 (1.0006x) |

Like for like, the weight bytes are identical to onnxruntime-genai's (its data file is exactly
the theoretical 317,400,576); edgepipe's graph is 54 KB smaller. Zero points cost 2.4%, fp16
scales save 8.7%.

    .venv/bin/python benchmarks/quant_sizes.py [--preset qwen2.5-0.5b] [--skip-genai] [--json]

Needs the bench extra: pip install 'edgepipe[bench]'.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import folder_bytes as common_folder_bytes  # noqa: E402
from common import genai_builder_cmd  # noqa: E402

# (embedding, symmetric, activation dtype). onnxruntime-genai's `-p int4 -e cpu` build is
# symmetric int4 block 32, float32 scales, one int4 table shared by embedding and lm_head, so the
# first row is the like-for-like comparison.
VARIANTS = (
    ("int4", True, "float32"),
    ("int4", False, "float32"),
    ("int8", False, "float32"),
    ("int4", False, "float16"),
)


def folder_bytes(folder: Path) -> int:
    """Bytes of the ONNX graph and its external data in `folder`."""
    return common_folder_bytes(folder, "model.onnx")


def theoretical_bytes(
    config: dict,
    embedding_bits: int,
    bits: int = 4,
    block: int = 32,
    symmetric: bool = False,
    dtype: str = "float32",
) -> dict:
    """The arithmetic of the module docstring, term by term."""
    fb = 4 if dtype == "float32" else 2  # scales, norms and caches are in the activation dtype
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    layers, vocab = config["num_hidden_layers"], config["vocab_size"]

    def quantized(k: int, n: int, b: int) -> int:
        nb = -(-k // block)
        zero_points = 0 if symmetric else n * (-(-nb * b // 8))
        return n * nb * (block * b // 8) + n * nb * fb + zero_points

    per_layer = (
        quantized(hidden, heads * head_dim, bits)  # q
        + 2 * quantized(hidden, kv * head_dim, bits)  # k, v
        + quantized(heads * head_dim, hidden, bits)  # o
        + 2 * quantized(hidden, inter, bits)  # gate, up
        + quantized(inter, hidden, bits)  # down
    )
    floats_per_layer = 2 * hidden + (heads + 2 * kv) * head_dim  # norms + q/k/v biases
    if config.get("model_type") == "qwen3":
        floats_per_layer = 2 * hidden + 2 * head_dim  # norms + q/k norms, no biases
    terms = {
        "layers_quantized": layers * per_layer,
        "layers_float": layers * floats_per_layer * fb,
        "embedding_shared": quantized(hidden, vocab, embedding_bits),
        "final_norm": hidden * fb,
        "rotary_caches": config["max_position_embeddings"] * (head_dim // 2) * 2 * fb,
    }
    terms["total"] = sum(terms.values())
    return terms


def edgepipe_build(
    model_dir: Path, out: Path, embedding: str, symmetric: bool, dtype: str
) -> tuple[int, float]:
    from edgepipe.stages.export.dynamic import build_decoder
    from edgepipe.stages.quantize.plan import QuantPlan

    plan = QuantPlan.from_precision(
        "int4", block_size=32, symmetric=symmetric, embedding=embedding, lm_head=embedding
    )
    t = time.perf_counter()
    build_decoder(model_dir, out, activation_dtype=dtype, quant=plan)
    return folder_bytes(out), time.perf_counter() - t


def genai_build(model_dir: Path, out: Path, cache: Path) -> tuple[int, float]:
    t = time.perf_counter()
    subprocess.run(genai_builder_cmd(model_dir, out, cache), check=True, capture_output=True)
    return folder_bytes(out), time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen2.5-0.5b")
    parser.add_argument("--skip-genai", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    from edgepipe.arch.presets import write_preset

    results: dict = {"preset": args.preset}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = write_preset(args.preset, 0, tmp / "model", tokenizer=False)
        config = json.loads((model_dir / "config.json").read_text())
        for emb, symmetric, dtype in VARIANTS:
            bits = 4 if emb == "int4" else 8
            name = f"edgepipe_int4_{'sym' if symmetric else 'asym'}_embedding_{emb}_{dtype}"
            size, secs = edgepipe_build(model_dir, tmp / name, emb, symmetric, dtype)
            theory = theoretical_bytes(config, bits, symmetric=symmetric, dtype=dtype)
            results[name] = {
                "bytes": size,
                "seconds": round(secs, 1),
                "theoretical": theory,
                "ratio_to_theoretical": round(size / theory["total"], 4),
            }
            shutil.rmtree(tmp / name)
        if not args.skip_genai:
            size, secs = genai_build(model_dir, tmp / "genai", tmp / "genai-cache")
            results["onnxruntime_genai_int4"] = {"bytes": size, "seconds": round(secs, 1)}
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for key, value in results.items():
            if isinstance(value, dict):
                ratio = value.get("ratio_to_theoretical")
                extra = f", {ratio:.3f} x theoretical" if ratio else ""
                print(f"{key}: {value['bytes'] / 1e6:.1f} MB in {value['seconds']} s{extra}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
