"""Where a decode step's time goes, and what the CPU kernels do with each layout choice.

The speed issue's remaining gaps to llama.cpp are inside onnxruntime's kernels; these
measurements say which ones and why a layout change does or does not help. Four parts, each
its own subcommand (all on this machine's CPU provider, 2 intra-op threads unless said):

* `step`: onnxruntime's profiler over a 512-token prompt and greedy decoding after it, on the
  shipped artifact (`edgepipe build`'s graph, the "edgepipe" kind of benchmarks/common.py) of
  the shape-exact Qwen2.5-0.5B and Qwen3-0.6B and on the `variants` rewrites that apply: kernel
  time by op type per decode step and for the prompt, nodes per step, the lm_head's share.
  Kernel times isolate what a rewrite changes from this VM's run-to-run drift.
* `kernels`: single MatMulNBits calls (M = 1, the decode case) per layout (bits, block,
  symmetric) on the shapes' MLP and lm_head matrices, as GB/s of the bytes they read; and one
  decode step of GroupQueryAttention per KV cache type (float32, float16, int8 per tensor / per
  channel) at two context lengths.
* `variants`: end-to-end decode and prefill of the shipped graph against rewritten copies,
  alternated in fresh processes: gate and up packed into one MatMulNBits + Split; an int8 KV
  cache (GroupQueryAttention's `k_quant_type`/`v_quant_type` PER_CHANNEL with fixed scales: a
  speed probe only, the scales are not calibrated).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/kernel_costs.py step
    PYTHONPATH=$PWD .venv/bin/python benchmarks/kernel_costs.py kernels
    PYTHONPATH=$PWD .venv/bin/python benchmarks/kernel_costs.py variants --rounds 3

Results: `results/kernel_costs-{step,kernels,variants}.json` and one markdown table each. Timings
are medians within one run; compare ratios, not absolute figures, across runs (this VM's read
bandwidth drifts between 24 and 36 GB/s).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
from common import CACHE, REPO, RESULTS, cached_build, machine_facts, source_model  # noqa: E402

MODELS = ("qwen2.5-0.5b", "qwen3-0.6b")
PROFILE_PROMPT = list(range(2000, 2512))  # 512 ids (random weights: any ids do)
SPIN = {"session.intra_op.allow_spinning": "1"}


def shipped(name: str) -> Path:
    """The artifact `edgepipe build` ships for the shape-exact model (built once, cached)."""
    return Path(cached_build("edgepipe", name, source_model(name))["artifact"])


# -- step -----------------------------------------------------------------------------------


def profile_step(artifact: Path, tokens: int = 64) -> dict:
    """Kernel time of a 512-token prompt and per decode step after it, by op type
    (onnxruntime's profiler, spinning on)."""
    import onnxruntime as ort

    from edgepipe.runtime import Generator, dtypes

    dtypes.ORT_NUMPY_DTYPES.setdefault("tensor(int8)", np.int8)  # the int8-KV probe's cache
    options = ort.SessionOptions()
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = str(Path(tmp) / "step")
        gen = Generator(
            artifact, session_options=options, spinning="on", verify=False, prefix_cache_bytes=0
        )
        gen.generate(PROFILE_PROMPT, max_new_tokens=tokens, temperature=0)
        events = json.loads(Path(gen.session.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"]
    prompt, decode_runs = runs[0], runs[1:]
    start = decode_runs[0]["ts"]
    by_type: collections.Counter = collections.Counter()
    prompt_by_type: collections.Counter = collections.Counter()
    by_node: collections.Counter = collections.Counter()
    nodes = 0
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        if e["ts"] >= start:
            by_type[e["args"]["op_name"]] += e["dur"]
            by_node[e["name"].removesuffix("_kernel_time")] += e["dur"]
            nodes += 1
        elif e["ts"] >= prompt["ts"]:
            prompt_by_type[e["args"]["op_name"]] += e["dur"]
    steps = len(decode_runs)
    kernel_us = sum(by_type.values()) / steps
    head = sum(v for k, v in by_node.items() if k.startswith("lm_head/")) / steps
    return {
        "steps": steps,
        "run_us": statistics.median(e["dur"] for e in decode_runs),
        "kernel_us": kernel_us,
        "nodes_per_step": nodes / steps,
        "lm_head_us": head,
        "by_type_us": {k: v / steps for k, v in by_type.most_common()},
        "prompt_ms": prompt["dur"] / 1e3,
        "prompt_by_type_ms": {k: v / 1e3 for k, v in prompt_by_type.most_common()},
    }


def step_results(work: Path) -> dict:
    """`profile_step` of each model's shipped graph and of each rewrite that applies to it."""
    out = {}
    for name in MODELS:
        artifact = shipped(name)
        out[name] = profile_step(artifact)
        for label, rewrite in VARIANTS.items():
            copy = _copy_rewritten(artifact, work / name / label.replace(" ", "-"), rewrite)
            if copy is not None:
                out[f"{name}, {label}"] = profile_step(copy)
    return out


def step_table(results: dict) -> str:
    lines = []
    for name, r in results.items():
        lines += [
            f"### {name}",
            "",
            f"{r['nodes_per_step']:.0f} nodes per decode step; session run {r['run_us']:.0f} us "
            f"(median), kernels {r['kernel_us']:.0f} us, lm_head {r['lm_head_us']:.0f} us "
            f"({100 * r['lm_head_us'] / r['kernel_us']:.0f}% of kernel time). 512-token prompt: "
            f"{r['prompt_ms']:.0f} ms.",
            "",
            "| op type | decode us per step | share | prompt ms |",
            "|---|---:|---:|---:|",
        ]
        for op, us in list(r["by_type_us"].items())[:10]:
            prompt_ms = r["prompt_by_type_ms"].get(op, 0.0)
            share = 100 * us / r["kernel_us"]
            lines.append(f"| {op} | {us:.0f} | {share:.1f}% | {prompt_ms:.1f} |")
        lines.append("")
    return "\n".join(lines)


# -- kernels --------------------------------------------------------------------------------


def _session(model, threads: int = 2):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    for key, value in SPIN.items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(model.SerializeToString(), options, ["CPUExecutionProvider"])


def _median_ms(call, repeats: int = 30, warmup: int = 5) -> float:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def matmulnbits_ms(k: int, n: int, copies: int, bits: int, block: int, symmetric: bool) -> tuple:
    """(ms, GB/s) of `copies` MatMulNBits [1, K] x [K, N] in one graph (accuracy_level 4)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    blocks = -(-k // block)
    nodes, inits, outputs = [], [], []
    for c in range(copies):
        inputs = ["x", f"w{c}", f"s{c}"]
        codes = rng.integers(0, 255, size=(n, blocks, block * bits // 8), dtype=np.uint8)
        scales = (rng.random(n * blocks, dtype=np.float32) * 0.01 + 0.001).astype(np.float32)
        inits += [numpy_helper.from_array(codes, f"w{c}"), numpy_helper.from_array(scales, f"s{c}")]
        if not symmetric:
            zp = rng.integers(0, 255, size=n * (-(-blocks * bits // 8)), dtype=np.uint8)
            inits.append(numpy_helper.from_array(zp, f"z{c}"))
            inputs.append(f"z{c}")
        attrs = {"K": k, "N": n, "bits": bits, "block_size": block, "accuracy_level": 4}
        nodes.append(
            helper.make_node("MatMulNBits", inputs, [f"y{c}"], domain="com.microsoft", **attrs)
        )
        outputs.append(helper.make_tensor_value_info(f"y{c}", TensorProto.FLOAT, [1, 1, n]))
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, k])
    graph = helper.make_graph(nodes, "g", [x_info], outputs, inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    session = _session(helper.make_model(graph, opset_imports=opsets))
    x = rng.standard_normal((1, 1, k)).astype(np.float32)
    ms = _median_ms(lambda: session.run(None, {"x": x}))
    read = copies * n * k * (bits / 8 + 4 / block + (0 if symmetric else bits / 8 / block))
    return ms, read / ms / 1e6


#: (label, K, N, copies): the shapes' MLP up/gate matrices (one per layer) and lm_heads.
MATRICES = (
    ("qwen2.5-0.5b gate, 24 layers", 896, 4864, 24),
    ("qwen2.5-0.5b lm_head", 896, 151936, 1),
    ("qwen3-0.6b gate, 28 layers", 1024, 3072, 28),
    ("qwen3-0.6b lm_head", 1024, 151936, 1),
)
LAYOUTS = (
    (4, 32, False),
    (4, 32, True),
    (4, 64, True),
    (4, 128, True),
    (4, 256, True),
    (8, 128, True),
)


def attention_ms(heads, kv_heads, head_dim, layers, context, cache: str) -> float:
    """One decode step of `layers` GroupQueryAttention nodes (rotary inside, shared buffers of
    4096 positions) at `context` cached positions, KV cache of type `cache`."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    capacity, f32 = 4096, TensorProto.FLOAT
    kinds = {"float32": (f32, np.float32), "float16": (TensorProto.FLOAT16, np.float16)}
    quant = cache.startswith("int8")
    act_type, act_np = kinds.get(cache, kinds["float32"])
    cache_type, cache_np = (TensorProto.INT8, np.int8) if quant else (act_type, act_np)
    width = (heads + 2 * kv_heads) * head_dim
    vi = helper.make_tensor_value_info
    inputs = [
        vi("qkv", act_type, [1, 1, width]),
        vi("seqlens_k", TensorProto.INT32, [1]),
        vi("total", TensorProto.INT32, []),
        vi("cos", act_type, [capacity, head_dim // 2]),
        vi("sin", act_type, [capacity, head_dim // 2]),
    ]
    scale_shape = [1] if cache == "int8-tensor" else [1, kv_heads, 1, head_dim]
    inits = [numpy_helper.from_array(np.full(scale_shape, 4 / 127, np.float32), n) for n in "kv"]
    nodes, outputs = [], []
    for i in range(layers):
        inputs += [
            vi(f"pk{i}", cache_type, [1, kv_heads, capacity, head_dim]),
            vi(f"pv{i}", cache_type, [1, kv_heads, capacity, head_dim]),
        ]
        names = ["qkv", "", "", f"pk{i}", f"pv{i}", "seqlens_k", "total", "cos", "sin"]
        attrs = {"num_heads": heads, "kv_num_heads": kv_heads, "do_rotary": 1}
        if quant:
            names += ["", "", "", "k", "v"]
            kind = "PER_TENSOR" if cache == "int8-tensor" else "PER_CHANNEL"
            attrs.update(k_quant_type=kind, v_quant_type=kind, kv_cache_bit_width=8)
        outs = [f"o{i}", f"kout{i}", f"vout{i}"]
        nodes.append(
            helper.make_node("GroupQueryAttention", names, outs, domain="com.microsoft", **attrs)
        )
        outputs += [
            vi(outs[0], act_type, None),
            vi(outs[1], cache_type, None),
            vi(outs[2], cache_type, None),
        ]
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    session = _session(helper.make_model(graph, opset_imports=opsets))
    rng = np.random.default_rng(0)
    angles = np.arange(capacity)[:, None] / 1e6 ** (np.arange(head_dim // 2) * 2 / head_dim)
    feed = {
        "qkv": rng.standard_normal((1, 1, width)).astype(act_np),
        "seqlens_k": np.array([context - 1], np.int32),
        "total": np.array(context, np.int32),
        "cos": np.cos(angles).astype(act_np),
        "sin": np.sin(angles).astype(act_np),
    }
    binding = session.io_binding()
    for key, value in feed.items():
        binding.bind_cpu_input(key, value)
    buffers = []
    for i in range(layers):
        for kind in ("k", "v"):
            buffer = np.zeros((1, kv_heads, capacity, head_dim), cache_np)
            buffers.append(ort.OrtValue.ortvalue_from_numpy(buffer))
            binding.bind_ortvalue_input(f"p{kind}{i}", buffers[-1])
            binding.bind_ortvalue_output(f"{kind}out{i}", buffers[-1])
        binding.bind_output(f"o{i}")
    return _median_ms(lambda: session.run_with_iobinding(binding), repeats=20, warmup=3)


#: name -> (heads, kv heads, head_dim, layers)
ATTENTION = {"qwen2.5-0.5b": (14, 2, 64, 24), "qwen3-0.6b": (16, 8, 128, 28)}
CACHES = ("float32", "float16", "int8-tensor", "int8-channel")


def kernel_results() -> dict:
    out: dict = {"matmulnbits": [], "attention": []}
    for label, k, n, copies in MATRICES:
        for bits, block, symmetric in LAYOUTS:
            ms, gbs = matmulnbits_ms(k, n, copies, bits, block, symmetric)
            row = {"matrix": label, "bits": bits, "block": block, "symmetric": symmetric}
            out["matmulnbits"].append({**row, "ms": ms, "gb_s": gbs})
            print(f"{label}: int{bits} b{block} {'sym' if symmetric else 'asym'} {ms:.2f} ms")
    for name, geometry in ATTENTION.items():
        for context in (192, 640):
            for cache in CACHES:
                ms = attention_ms(*geometry, context, cache)
                out["attention"].append(
                    {"model": name, "context": context, "cache": cache, "ms": ms}
                )
                print(f"{name} attention at {context}, {cache}: {ms:.2f} ms")
    return out


def kernel_table(r: dict) -> str:
    lines = [
        "### MatMulNBits, M = 1",
        "",
        "| matrices | layout | ms | GB/s read |",
        "|---|---|---:|---:|",
    ]
    for m in r["matmulnbits"]:
        layout = f"int{m['bits']} block {m['block']} {'sym' if m['symmetric'] else 'asym'}"
        lines.append(f"| {m['matrix']} | {layout} | {m['ms']:.2f} | {m['gb_s']:.1f} |")
    lines += ["", "### GroupQueryAttention, one decode step of every layer", ""]
    lines += ["| model | context | KV cache | ms | vs float32 |", "|---|---:|---|---:|---:|"]
    base = {(a["model"], a["context"]): a["ms"] for a in r["attention"] if a["cache"] == "float32"}
    for a in r["attention"]:
        ratio = a["ms"] / base[a["model"], a["context"]]
        lines.append(
            f"| {a['model']} | {a['context']} | {a['cache']} | {a['ms']:.2f} | {ratio:.2f} |"
        )
    return "\n".join(lines) + "\n"


# -- variants -------------------------------------------------------------------------------


def _copy_rewritten(artifact: Path, out: Path, rewrite) -> Path | None:
    """`artifact` with its graph rewritten by `rewrite(onnx.ModelProto)` (weights loaded;
    returns whether it changed anything); None when it did not."""
    import onnx

    model = onnx.load(str(artifact / "model.onnx"))
    if not rewrite(model):
        return None
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for f in artifact.iterdir():
        if not f.name.startswith("model.onnx") and f.name != "manifest.json":
            shutil.copy(f, out / f.name)
    onnx.save(
        model,
        str(out / "model.onnx"),
        save_as_external_data=True,
        location="model.onnx.data",
        size_threshold=1024,
    )
    return out


def pack_gate_up(model) -> bool:
    """Each layer's gate and up MatMulNBits as one (N = 2 x intermediate) and a Split."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    by_name = {n.name: n for n in graph.node}
    nodes, dropped = [], set()
    for node in graph.node:
        if node.name in dropped:
            continue
        if node.op_type != "MatMulNBits" or ".mlp.gate_proj" not in node.name:
            nodes.append(node)
            continue
        up = by_name[node.name.replace("gate_proj", "up_proj")]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        n, prefix = attrs["N"], node.name.replace("gate_proj/MatMulNBits", "gate_up")
        packed = []
        for i, suffix in ((1, "qweight"), (2, "scales")):
            both = [numpy_helper.to_array(inits[x.input[i]]) for x in (node, up)]
            packed.append(numpy_helper.from_array(np.concatenate(both), f"{prefix}.{suffix}"))
            for x in (node, up):
                graph.initializer.remove(inits[x.input[i]])
        if len(node.input) > 3:
            raise ValueError("pack_gate_up: symmetric layouts only (no zero points)")
        sizes = numpy_helper.from_array(np.array([n, n], np.int64), f"{prefix}.split_sizes")
        graph.initializer.extend([*packed, sizes])
        attrs["N"] = 2 * n
        inputs = [node.input[0], packed[0].name, packed[1].name]
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                inputs,
                [f"{prefix}/out"],
                name=f"{prefix}/MatMulNBits",
                domain="com.microsoft",
                **attrs,
            )
        )
        nodes.append(
            helper.make_node(
                "Split", [f"{prefix}/out", sizes.name], [node.output[0], up.output[0]], axis=-1
            )
        )
        dropped.add(up.name)
    del graph.node[:]
    graph.node.extend(nodes)
    return bool(dropped)


def int8_kv(model) -> bool:
    """GroupQueryAttention over an int8 KV cache, per-channel scales of 0.05 (speed only)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    cache_names = set()
    for node in graph.node:
        if node.op_type != "GroupQueryAttention":
            continue
        kv_heads = next(a.i for a in node.attribute if a.name == "kv_num_heads")
        cache_names |= {node.input[3], node.input[4], node.output[1], node.output[2]}
        inputs = [*node.input, *[""] * (9 - len(node.input))][:9]
        scales = [f"{node.name}.k_scale", f"{node.name}.v_scale"]
        del node.input[:]
        node.input.extend([*inputs, "", "", "", *scales])
        keep = [a for a in node.attribute if a.name not in ("k_quant_type", "v_quant_type")]
        del node.attribute[:]
        node.attribute.extend(keep)
        node.attribute.extend(
            [
                helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                helper.make_attribute("v_quant_type", "PER_CHANNEL"),
                helper.make_attribute("kv_cache_bit_width", 8),
            ]
        )
        head_dim = None
        for value in graph.input:
            if value.name == node.input[3]:
                head_dim = value.type.tensor_type.shape.dim[3].dim_value
        for name in scales:
            scale = np.full((1, kv_heads, 1, head_dim), 0.05, np.float32)
            graph.initializer.append(numpy_helper.from_array(scale, name))
    for value in [*graph.input, *graph.output]:
        if value.name in cache_names:
            value.type.tensor_type.elem_type = TensorProto.INT8
    return bool(cache_names)


VARIANTS = {"gate-up packed": pack_gate_up, "int8 KV cache": int8_kv}

_CHILD = """
import json, sys
import numpy as np
from edgepipe.runtime import dtypes
dtypes.ORT_NUMPY_DTYPES.setdefault("tensor(int8)", np.int8)  # the int8-KV probe's cache
from edgepipe.runtime import Generator
gen = Generator(sys.argv[1], spinning="on", verify=False, prefix_cache_bytes=0)
gen.generate(list(range(1000, 1016)), max_new_tokens=4, temperature=0)
out = {}
for n in (128, 512):
    m = gen.generate(list(range(2000 + n, 2000 + 2 * n)), max_new_tokens=128, temperature=0).metrics
    out[n] = [m.prefill_tokens_per_s, m.decode_tokens_per_s]
print(json.dumps(out))
"""


def variant_results(rounds: int, work: Path) -> dict:
    results = {}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for name in MODELS:
        artifact = shipped(name)
        contenders = {"shipped": artifact}
        for label, rewrite in VARIANTS.items():
            copy = _copy_rewritten(artifact, work / name / label.replace(" ", "-"), rewrite)
            if copy is not None:  # the rewrite applies to this model
                contenders[label] = copy
        runs = collections.defaultdict(list)
        for r in range(rounds):
            order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
            for label in order:
                cmd = [sys.executable, "-c", _CHILD, str(contenders[label])]
                line = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
                runs[label].append(json.loads(line.stdout.strip().splitlines()[-1]))
                print(name, label, runs[label][-1], flush=True)
        results[name] = {
            label: {
                f"{what} tok/s after {n}"
                if what == "decode"
                else f"prefill tok/s at {n}": statistics.median(run[str(n)][i] for run in values)
                for n in (128, 512)
                for i, what in enumerate(("prefill", "decode"))
            }
            for label, values in runs.items()
        }
    return results


def variant_table(results: dict) -> str:
    lines = []
    for name, rows in results.items():
        metrics = list(rows["shipped"])  # a variant that changes nothing here has no column
        lines += [
            f"### {name}",
            "",
            "| metric | " + " | ".join(rows) + " |",
            "|---|" + "---:|" * len(rows),
        ]
        for metric in metrics:
            base = rows["shipped"][metric]
            cells = [
                f"{r[metric]:.1f}" + ("" if k == "shipped" else f" ({r[metric] / base:.2f}x)")
                for k, r in rows.items()
            ]
            lines.append(f"| {metric} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def write(part: str, data: dict, table: str, argv: list[str]) -> None:
    RESULTS.mkdir(exist_ok=True)
    payload = {
        "command": " ".join(["benchmarks/kernel_costs.py", *argv]),
        "machine": machine_facts(),
        "results": data,
    }
    (RESULTS / f"kernel_costs-{part}.json").write_text(json.dumps(payload, indent=2) + "\n")
    header = f"# {part}\n\n`{payload['command']}`\n\n"
    (RESULTS / f"kernel_costs-{part}.md").write_text(header + table)
    print(table)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=("step", "kernels", "variants"))
    parser.add_argument("--rounds", type=int, default=3, help="variants: alternated rounds")
    args = parser.parse_args(argv)
    if args.part == "step":
        data = step_results(CACHE / "variants")
        write("step", data, step_table(data), argv)
    elif args.part == "kernels":
        data = kernel_results()
        write("kernels", data, kernel_table(data), argv)
    else:
        work = CACHE / "variants"
        data = variant_results(args.rounds, work)
        write("variants", data, variant_table(data), argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
