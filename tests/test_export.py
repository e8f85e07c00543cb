"""build_decoder against transformers: parity, KV cache, genai, quantized weights, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgepipe.arch.families import read_config
from edgepipe.arch.spec import expected_shapes
from edgepipe.errors import InvalidInput
from edgepipe.formats.safetensors import write_safetensors
from edgepipe.stages.export.dynamic import build_decoder

PROMPT = [151644, 872, 198, 9707, 11, 1246, 525, 498, 30, 151645, 198]
SMALL_PROMPT = [1, 17, 993, 40, 5, 123, 7]  # for the vocab-1000 extra shapes
DECODE_STEPS = 64
TOL = 1e-4


def hf_reference(model_dir: Path, prompt: list[int], steps: int) -> tuple[list[np.ndarray], list]:
    """transformers fp32 greedy: last-position logits at prefill and each decode step."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    logits, tokens = [], []
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        for _ in range(steps + 1):
            step_logits = out.logits[0, -1].numpy().copy()
            logits.append(step_logits)
            tokens.append(int(step_logits.argmax()))
            out = model(
                torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True
            )
    return logits, tokens


def ort_greedy(model_path: Path, prompt: list[int], steps: int) -> tuple[list[np.ndarray], list]:
    """Drive the exported decoder with numpy and a growing KV cache (past -> present)."""
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    past = {
        i.name: np.zeros([1, i.shape[1], 0, i.shape[3]], np.float32)
        for i in session.get_inputs()
        if i.name.startswith("past_key_values.")
    }
    out_names = [o.name for o in session.get_outputs()]
    ids = np.array([prompt], np.int64)
    total = len(prompt)
    logits, tokens = [], []
    for _ in range(steps + 1):
        feeds = {"input_ids": ids, "attention_mask": np.ones((1, total), np.int64), **past}
        outs = dict(zip(out_names, session.run(None, feeds), strict=True))
        step_logits = outs["logits"][0, -1]
        logits.append(step_logits)
        tokens.append(int(step_logits.argmax()))
        past = {n.replace("present.", "past_key_values."): outs[n] for n in out_names[1:]}
        ids = np.array([[tokens[-1]]], np.int64)
        total += 1
    return logits, tokens


def assert_parity(model_dir: Path, export_dir: Path, prompt: list[int], steps: int) -> None:
    ref_logits, ref_tokens = hf_reference(model_dir, prompt, steps)
    logits, tokens = ort_greedy(export_dir / "model.onnx", prompt, steps)
    diffs = [float(np.abs(a - b).max()) for a, b in zip(logits, ref_logits, strict=True)]
    assert max(diffs) <= TOL, f"max |logits diff| per step: {diffs}"
    assert tokens == ref_tokens


@pytest.fixture(scope="session")
def qwen2_export(tiny_qwen2_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qwen2-export")
    build_decoder(tiny_qwen2_dir, out, context_length=1024)
    return out


@pytest.fixture(scope="session")
def qwen3_export(tiny_qwen3_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qwen3-export")
    build_decoder(tiny_qwen3_dir, out, context_length=1024)
    return out


def op_types(model_path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(model_path), load_external_data=False).graph.node]


# ---------------------------------------------------------------------------------------------
# Parity with transformers


def test_qwen2_matches_transformers_at_prefill_and_64_decode_steps(tiny_qwen2_dir, qwen2_export):
    assert_parity(tiny_qwen2_dir, qwen2_export, PROMPT, DECODE_STEPS)


def test_qwen3_matches_transformers_at_prefill_and_64_decode_steps(tiny_qwen3_dir, qwen3_export):
    assert_parity(tiny_qwen3_dir, qwen3_export, PROMPT, DECODE_STEPS)


def test_greedy_tokens_are_varied_so_parity_is_meaningful(qwen2_export, qwen3_export):
    for folder in (qwen2_export, qwen3_export):
        _, tokens = ort_greedy(folder / "model.onnx", PROMPT, 31)
        assert len(set(tokens)) >= 16, tokens


EXTRA_SHAPES = {
    "qwen2-odd-hidden-kv1": (
        "qwen2",
        {"hidden_size": 80, "num_attention_heads": 5, "num_key_value_heads": 1},
    ),
    "qwen2-untied-gqa4": (
        "qwen2",
        {
            "hidden_size": 128,
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
            "tie_word_embeddings": False,
        },
    ),
    "qwen3-odd-hidden-headdim48-kv1": (
        "qwen3",
        {"hidden_size": 100, "num_attention_heads": 3, "num_key_value_heads": 1, "head_dim": 48},
    ),
    "qwen3-untied-bf16-sharded": (
        "qwen3",
        {"tie_word_embeddings": False, "dtype": "bfloat16", "max_shard_size": "200KB"},
    ),
    "qwen2-fp16-storage-3-layers": ("qwen2", {"dtype": "float16", "num_hidden_layers": 3}),
}


@pytest.mark.parametrize("case", sorted(EXTRA_SHAPES))
def test_extra_shapes_match_transformers(case, make_tiny_model, tmp_path):
    family, options = EXTRA_SHAPES[case]
    model_dir = make_tiny_model(family, **options)
    build_decoder(model_dir, tmp_path, context_length=256)
    assert_parity(model_dir, tmp_path, SMALL_PROMPT, 32)


def test_sharded_fixture_really_has_shards(make_tiny_model):
    family, options = EXTRA_SHAPES["qwen3-untied-bf16-sharded"]
    folder = make_tiny_model(family, **options)
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("model-*.safetensors"))) > 1


def test_rotary_embedding_nodes_variant_matches_transformers(tiny_qwen3_dir, tmp_path):
    build_decoder(tiny_qwen3_dir, tmp_path, rotary_in_attention=False, context_length=256)
    ops = op_types(tmp_path / "model.onnx")
    assert ops.count("RotaryEmbedding") == 2 * 2  # q and k in each of 2 layers
    assert_parity(tiny_qwen3_dir, tmp_path, PROMPT, 32)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_directml_layout_matches_transformers(family, tiny_qwen2_dir, tiny_qwen3_dir, tmp_path):
    # Rotary nodes, three q/k/v projections (no Split), bias as an Add, q/k norms as Reshape ->
    # SimplifiedLayerNormalization -> Reshape: directml.yaml's layout.
    model_dir = {"qwen2": tiny_qwen2_dir, "qwen3": tiny_qwen3_dir}[family]
    build_decoder(
        model_dir, tmp_path, rotary_in_attention=False, packed_qkv=False, fused_bias=False,
        branchwise_norm=False, context_length=256,
    )  # fmt: skip
    ops = op_types(tmp_path / "model.onnx")
    assert "Split" not in ops and ops.count("RotaryEmbedding") == 4
    assert "BranchwiseRMSNorm" not in ops
    assert_parity(model_dir, tmp_path, PROMPT, 16)


def test_qwen3_norms_q_and_k_with_branchwise_nodes_and_no_reshape(qwen3_export):
    # cpu-x64's layout: one BranchwiseRMSNorm on q and one on k, each over its heads, with the
    # shared gamma; no Reshape around them. Parity: test_qwen3_matches_transformers_...
    model = onnx.load(str(qwen3_export / "model.onnx"), load_external_data=False)
    norms = [n for n in model.graph.node if n.op_type == "BranchwiseRMSNorm"]
    assert len(norms) == 2 * 2  # q and k in each of 2 layers
    assert not [n for n in model.graph.node if n.op_type == "Reshape" and "_norm" in n.name]
    cfg = json.loads((qwen3_export / "genai_config.json").read_text())["model"]["decoder"]
    branches = {n.name.rsplit(".", 1)[-1]: n.attribute[0] for n in norms}
    heads = {k: onnx.helper.get_attribute_value(a) for k, a in branches.items()}
    assert heads == {"q_norm": cfg["num_attention_heads"], "k_norm": cfg["num_key_value_heads"]}


@pytest.mark.parametrize("packed_qkv", [True, False])
def test_branchwise_and_reshape_head_norms_give_the_same_tokens(
    tiny_qwen3_dir, qwen3_export, packed_qkv, tmp_path
):
    # The two forms of Qwen3's q/k norm (profile decoder.head_norm) compute the same thing:
    # logits within float rounding and the same greedy tokens over 32 steps, packed or not.
    reshape = tmp_path / "reshape"
    build_decoder(
        tiny_qwen3_dir, reshape, branchwise_norm=False, packed_qkv=packed_qkv, context_length=1024
    )
    assert "BranchwiseRMSNorm" not in op_types(reshape / "model.onnx")
    branchwise = qwen3_export
    if not packed_qkv:
        branchwise = tmp_path / "branchwise"
        build_decoder(tiny_qwen3_dir, branchwise, packed_qkv=False, context_length=1024)
    assert op_types(branchwise / "model.onnx").count("BranchwiseRMSNorm") == 2 * 2
    a_logits, a_tokens = ort_greedy(branchwise / "model.onnx", PROMPT, 32)
    b_logits, b_tokens = ort_greedy(reshape / "model.onnx", PROMPT, 32)
    assert a_tokens == b_tokens
    assert max(float(np.abs(a - b).max()) for a, b in zip(a_logits, b_logits, strict=True)) < 1e-4


def test_unfused_bias_gives_the_fused_int4_logits(tiny_qwen2_dir, tmp_path):
    from edgepipe.stages.quantize.plan import QuantPlan

    plan = QuantPlan.from_precision("int4", block_size=32, symmetric=True, lm_head="int4")
    for fused in (True, False):
        build_decoder(
            tiny_qwen2_dir, tmp_path / str(fused), quant=plan, packed_qkv=False,
            fused_bias=fused, context_length=256,
        )  # fmt: skip
    graph = onnx.load(str(tmp_path / "False" / "model.onnx"), load_external_data=False).graph
    q_proj = next(n for n in graph.node if n.name == "layers.0.attn.q_proj/MatMulNBits")
    assert list(q_proj.input)[3] == ""  # symmetric: an empty zero-point slot, four inputs
    fused, unfused = (ort_greedy(tmp_path / f / "model.onnx", PROMPT, 4) for f in ("True", "False"))
    assert fused[1] == unfused[1]
    np.testing.assert_allclose(fused[0], unfused[0], atol=1e-4)


def test_all_logits_returns_every_prompt_position(tiny_qwen2_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    build_decoder(tiny_qwen2_dir, tmp_path, all_logits=True, context_length=256)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"))
    feeds = {"input_ids": np.array([PROMPT]), "attention_mask": np.ones((1, len(PROMPT)), np.int64)}
    for i in session.get_inputs()[2:]:
        feeds[i.name] = np.zeros([1, i.shape[1], 0, i.shape[3]], np.float32)
    logits = session.run(["logits"], feeds)[0]
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32)
    with torch.no_grad():
        ref = model(torch.tensor([PROMPT])).logits.numpy()
    assert logits.shape == (1, len(PROMPT), 151936)
    assert np.abs(logits - ref).max() <= TOL


# logits_to_keep on the shipped graph (exported, then optimized as the build does)


@pytest.fixture(scope="module")
def shipped(tiny_qwen3_dir, tmp_path_factory) -> dict[str, Path]:
    """fp32 and int4 (accuracy_level 4, as cpu-x64) shipped graphs, and the all-logits export."""
    from edgepipe.stages.optimize import optimize_model
    from edgepipe.stages.quantize.plan import QuantPlan

    root = tmp_path_factory.mktemp("shipped")
    int4 = QuantPlan.from_precision("int4", accuracy_level=4, lm_head="int8")
    folders = {}
    for name, quant in (("fp32", None), ("int4", int4)):
        build_decoder(tiny_qwen3_dir, root / f"{name}-export", quant=quant, context_length=256)
        record = optimize_model(root / f"{name}-export", root / name, level="all")
        assert record["applied"], record["reason"]  # the optimized graph is what ships
        folders[name] = root / name
    build_decoder(tiny_qwen3_dir, root / "all", all_logits=True, context_length=256)
    folders["all"] = root / "all"
    return folders


def prefill_feeds(session: ort.InferenceSession, prompts: list[list[int]]) -> dict:
    feeds = {
        "input_ids": np.array(prompts, np.int64),
        "attention_mask": np.ones((len(prompts), len(prompts[0])), np.int64),
    }
    for i in session.get_inputs()[2:]:
        feeds[i.name] = np.zeros([len(prompts), i.shape[1], 0, i.shape[3]], np.float32)
    return feeds


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_optimized_graph_keeps_logits_to_keep_an_input_with_default_one(shipped, precision):
    model_path = shipped[precision] / "model.onnx"
    graph = onnx.load(str(model_path), load_external_data=False).graph
    (default,) = [t for t in graph.initializer if t.name == "logits_to_keep"]
    assert onnx.numpy_helper.to_array(default).tolist() == 1
    assert "logits_to_keep" in [i.name for i in graph.input]
    # Not folded into a constant: a node of the optimized graph still reads it.
    assert any("logits_to_keep" in node.input for node in graph.node)
    session = ort.InferenceSession(str(model_path))
    assert "logits_to_keep" not in [i.name for i in session.get_inputs()]  # genai never sees it
    assert [i.name for i in session.get_overridable_initializers()] == ["logits_to_keep"]
    assert session.get_outputs()[0].shape[1:] == [1, 151936]  # genai: last-position logits
    feeds = prefill_feeds(session, [PROMPT])
    for keep in (1, 4, len(PROMPT)):
        logits = session.run(["logits"], {**feeds, "logits_to_keep": np.array(keep)})[0]
        assert logits.shape == (keep, 1, 151936)


def test_kept_logits_are_the_all_logits_exports_last_rows(shipped):
    session = ort.InferenceSession(str(shipped["fp32"] / "model.onnx"))
    every = ort.InferenceSession(str(shipped["all"] / "model.onnx"))
    prompts = [PROMPT, PROMPT[::-1]]
    feeds = prefill_feeds(session, prompts)
    reference = every.run(["logits"], feeds)[0]  # [2, len, vocab]
    default = session.run(["logits"], feeds)[0]
    assert default.shape == (2, 1, 151936)
    np.testing.assert_allclose(default[:, 0], reference[:, -1], atol=1e-4)
    for keep in (1, 3, 6, 0):  # 0: every position, as transformers' logits_to_keep=0
        logits = session.run(["logits"], {**feeds, "logits_to_keep": np.array(keep)})[0]
        rows = keep or len(PROMPT)
        assert logits.shape == (2 * rows, 1, 151936)  # batch-major rows
        np.testing.assert_allclose(logits.reshape(2, rows, -1), reference[:, -rows:], atol=1e-4)


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_prefill_computes_the_lm_head_for_the_last_position_only(shipped, precision, tmp_path):
    """onnxruntime's profile gives each node's output shape: the lm_head's is one row."""
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "profile")
    session = ort.InferenceSession(str(shipped[precision] / "model.onnx"), options)
    session.run(["logits"], prefill_feeds(session, [PROMPT]))
    events = json.loads(Path(session.end_profiling()).read_text())
    shapes = {
        e["args"]["op_name"]: e["args"]["output_type_shape"]
        for e in events
        if e.get("cat") == "Node" and e["name"].startswith("lm_head/") and "op_name" in e["args"]
    }
    head = {"fp32": "Gemm", "int4": "MatMulNBits"}[precision]
    (out,) = shapes[head][0].values()
    assert int(np.prod(out[:-1])) == 1 and out[-1] == 151936  # one row, not len(PROMPT)


def test_shared_past_present_buffer_gives_the_same_logits(tiny_qwen3_dir, qwen3_export):
    """The runtime binds one [batch, kv, max_length, head] buffer as both past and present."""
    ref_logits, ref_tokens = hf_reference(tiny_qwen3_dir, PROMPT, 8)
    session = ort.InferenceSession(str(qwen3_export / "model.onnx"))
    cfg = read_config(tiny_qwen3_dir)
    shape = (1, cfg.num_key_value_heads, 64, cfg.head_dim)
    buffers = {
        f"{layer}.{kind}": ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32))
        for layer in range(cfg.num_hidden_layers)
        for kind in ("key", "value")
    }
    ids, total = list(PROMPT), len(PROMPT)
    for step in range(9):
        binding = session.io_binding()
        binding.bind_cpu_input("input_ids", np.array([ids], np.int64))
        binding.bind_cpu_input("attention_mask", np.ones((1, total), np.int64))
        binding.bind_output("logits")  # bound first: copy_outputs_to_cpu keeps binding order
        for key, buf in buffers.items():
            binding.bind_ortvalue_input(f"past_key_values.{key}", buf)
            binding.bind_ortvalue_output(f"present.{key}", buf)
        session.run_with_iobinding(binding)
        logits = binding.copy_outputs_to_cpu()[0][0, -1]
        assert np.abs(logits - ref_logits[step]).max() <= TOL, step
        ids = [int(logits.argmax())]
        assert ids[0] == ref_tokens[step]
        total += 1


# ---------------------------------------------------------------------------------------------
# onnxruntime-genai


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_onnxruntime_genai_generates_transformers_greedy_tokens(family, request):
    import onnxruntime_genai as og

    model_dir = request.getfixturevalue(f"tiny_{family}_dir")
    export_dir = request.getfixturevalue(f"{family}_export")
    _, ref_tokens = hf_reference(model_dir, PROMPT, 31)
    model = og.Model(str(export_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(PROMPT) + 32, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(PROMPT)
    tokens: list[int] = []
    while not generator.is_done() and len(tokens) < 32:
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    # genai stops at an eos id; transformers' run above does not, so compare up to there.
    assert tokens == ref_tokens[: len(tokens)]
    assert len(tokens) >= 16 or tokens[-1] in (151645, 151643)


def test_genai_config_describes_the_decoder(qwen3_export, tiny_qwen3_dir):
    config = json.loads((qwen3_export / "genai_config.json").read_text())
    decoder = config["model"]["decoder"]
    assert config["model"]["type"] == "qwen3"
    assert (decoder["head_size"], decoder["num_key_value_heads"]) == (48, 2)
    assert config["model"]["eos_token_id"] == [151645, 151643]
    assert config["search"]["past_present_share_buffer"] is True
    assert config["model"]["context_length"] == config["search"]["max_length"] == 1024
    if (tiny_qwen3_dir / "tokenizer.json").is_file():
        assert (qwen3_export / "tokenizer.json").read_bytes() == (
            tiny_qwen3_dir / "tokenizer.json"
        ).read_bytes()


# ---------------------------------------------------------------------------------------------
# Graph structure, fp16, quantized weights, determinism


def test_graph_uses_fused_contrib_ops_and_one_embedding_copy(qwen2_export):
    model = onnx.load(str(qwen2_export / "model.onnx"), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("GroupQueryAttention") == 2
    assert (
        ops.count("SkipSimplifiedLayerNormalization") == 2 * 2
    )  # post-attn x2, layer-1 input, final
    assert ops.count("SimplifiedLayerNormalization") == 1
    gqa = next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gqa.attribute}
    assert attrs["do_rotary"] == 1 and attrs["kv_num_heads"] == 2
    big = [t for t in model.graph.initializer if np.prod(t.dims) >= 151936 * 128]
    assert len(big) == 1, [t.name for t in big]  # tied: one [vocab, hidden] table
    assert [o.name for o in model.graph.output][:3] == [
        "logits",
        "present.0.key",
        "present.0.value",
    ]


def test_float16_export_tracks_float32(tiny_qwen3_dir, qwen3_export, tmp_path):
    build_decoder(tiny_qwen3_dir, tmp_path, activation_dtype="float16", context_length=256)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"))
    assert session.get_inputs()[2].type == "tensor(float16)"
    assert session.get_outputs()[0].type == "tensor(float16)"
    ref_logits, ref_tokens = hf_reference(tiny_qwen3_dir, PROMPT, 0)
    feeds = {"input_ids": np.array([PROMPT]), "attention_mask": np.ones((1, len(PROMPT)), np.int64)}
    for i in session.get_inputs()[2:]:
        feeds[i.name] = np.zeros([1, i.shape[1], 0, i.shape[3]], np.float16)
    logits = session.run(["logits"], feeds)[0][0, -1].astype(np.float32)
    assert np.abs(logits - ref_logits[0]).max() < 0.05
    assert int(logits.argmax()) == ref_tokens[0]


def _dequantized_reference(model_dir: Path, plan, out_dir: Path) -> Path:
    """A float copy of `model_dir` whose weights are what the quantized graph computes with."""
    from edgepipe.formats.safetensors import SafetensorsModel
    from edgepipe.stages.quantize.plan import quantize_embedding, quantize_weight

    shutil.copytree(model_dir, out_dir, dirs_exist_ok=True)
    weights = SafetensorsModel(model_dir)
    tensors = {}
    for name in weights.names():
        array = weights.read(name)
        spec = plan.spec_for(name)
        if spec is not None and "embed_tokens" in name:
            array = quantize_embedding(array, spec).dequantize().T
        elif spec is not None:
            array = quantize_weight(array.T, spec, name=name).dequantize().T
        tensors[name] = np.ascontiguousarray(array, np.float32)
    write_safetensors(out_dir / "model.safetensors", tensors, "float32")
    return out_dir


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_export_matches_dequantized_reference(
    bits, make_tiny_model, tmp_path, monkeypatch
):
    from edgepipe.stages.quantize.plan import QuantPlan, QuantSpec

    # Stream the 1000-row embedding in uneven chunks: chunked quantization must equal whole.
    monkeypatch.setattr("edgepipe.stages.export.common.TABLE_CHUNK_ROWS", 300)

    model_dir = make_tiny_model("qwen3", hidden_size=128, head_dim=32)
    table = QuantSpec(8, 32, False, "rtn", 0)
    plan = QuantPlan(
        default=QuantSpec(bits, 32, bits == 8, "rtn", 0), embedding=table, lm_head=table
    )
    result = build_decoder(model_dir, tmp_path / "onnx", quant=plan, context_length=256)
    ops = op_types(result.model_path)
    assert ops.count("MatMulNBits") == 2 * 5 + 1  # qkv, o, gate, up, down per layer + lm_head
    assert "GatherBlockQuantized" in ops and "Gemm" not in ops
    assert "model.layers.0.self_attn.q_proj.weight" in result.quantized
    reference = _dequantized_reference(model_dir, plan, tmp_path / "reference")
    ref_logits, ref_tokens = hf_reference(reference, SMALL_PROMPT, 8)
    logits, tokens = ort_greedy(result.model_path, SMALL_PROMPT, 8)
    assert max(float(np.abs(a - b).max()) for a, b in zip(logits, ref_logits, strict=True)) <= 1e-3
    assert tokens == ref_tokens


def test_tied_quantized_embedding_is_stored_once(make_tiny_model, tmp_path):
    from edgepipe.stages.quantize.plan import QuantPlan, QuantSpec

    model_dir = make_tiny_model("qwen2")
    table = QuantSpec(4, 32, False, "rtn", 0)
    plan = QuantPlan(default=None, embedding=table, lm_head=table)
    build_decoder(model_dir, tmp_path, quant=plan, context_length=256)
    model = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    where = {
        t.name: {e.key: e.value for e in t.external_data}
        for t in model.graph.initializer
        if t.name in ("embed_tokens.qweight", "lm_head.qweight")
    }
    assert where["embed_tokens.qweight"]["offset"] == where["lm_head.qweight"]["offset"]
    import onnxruntime_genai as og

    _, expected = ort_greedy(tmp_path / "model.onnx", SMALL_PROMPT, 11)
    model = og.Model(str(tmp_path))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(SMALL_PROMPT) + 12, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(SMALL_PROMPT)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    assert tokens == expected  # genai runs GatherBlockQuantized + the shared MatMulNBits too


def test_two_exports_are_byte_identical(tiny_qwen2_dir, tmp_path):
    a = build_decoder(tiny_qwen2_dir, tmp_path / "a", context_length=256)
    b = build_decoder(tiny_qwen2_dir, tmp_path / "b", context_length=256)
    for name in ("model.onnx", "model.onnx.data", "genai_config.json"):
        assert (a.out_dir / name).read_bytes() == (b.out_dir / name).read_bytes(), name
    sizes = (a.out_dir / "model.onnx").stat().st_size + a.data_path.stat().st_size
    assert a.bytes_written == sizes


def test_progress_reports_each_layer(make_tiny_model, tmp_path):
    seen = []
    build_decoder(make_tiny_model("qwen2"), tmp_path, progress=lambda *a: seen.append(a))
    assert [s[0] for s in seen] == ["embedding", "layer 0", "layer 1", "lm_head"]
    assert seen[-1][1] == seen[-1][2]


# ---------------------------------------------------------------------------------------------
# Bad input, as a new user would try it


@pytest.fixture()
def model_copy(make_tiny_model, tmp_path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(make_tiny_model("qwen2"), folder)
    return folder


def test_missing_config_is_a_clear_error(model_copy, tmp_path):
    (model_copy / "config.json").unlink()
    with pytest.raises(InvalidInput, match="config.json not found"):
        build_decoder(model_copy, tmp_path / "out")


def test_missing_weights_is_a_clear_error(model_copy, tmp_path):
    (model_copy / "model.safetensors").unlink()
    with pytest.raises(InvalidInput, match="no weights found"):
        build_decoder(model_copy, tmp_path / "out")


def test_pickle_checkpoint_is_refused_with_conversion_hint(model_copy, tmp_path):
    (model_copy / "model.safetensors").rename(model_copy / "pytorch_model.bin")
    with pytest.raises(InvalidInput, match="safetensors only.*save_pretrained"):
        build_decoder(model_copy, tmp_path / "out")


def test_truncated_weights_name_the_file(model_copy, tmp_path):
    weights = model_copy / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 1000)
    with pytest.raises(InvalidInput, match=r"model\.safetensors.*truncated"):
        build_decoder(model_copy, tmp_path / "out")


def _rewrite_weights(folder: Path, edit) -> None:
    from edgepipe.formats.safetensors import SafetensorsModel

    weights = SafetensorsModel(folder)
    tensors = {name: weights.read(name) for name in weights.names()}
    edit(tensors)
    write_safetensors(folder / "model.safetensors", tensors, "float32")


def test_wrong_shape_names_tensor_and_expected_shape(model_copy, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    _rewrite_weights(model_copy, lambda t: t.update({name: t[name][:-1]}))
    with pytest.raises(InvalidInput, match=rf"{name}: shape \[255, 128\], expected \[256, 128\]"):
        build_decoder(model_copy, tmp_path / "out")


def test_missing_tensors_are_all_listed(model_copy, tmp_path):
    gone = ["model.layers.0.self_attn.k_proj.bias", "model.norm.weight"]
    _rewrite_weights(model_copy, lambda t: [t.pop(n) for n in gone])
    with pytest.raises(InvalidInput) as info:
        build_decoder(model_copy, tmp_path / "out")
    assert "2 tensors missing" in str(info.value)
    assert all(n in str(info.value) for n in gone)


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_unsupported_architecture_names_the_supported_ones(model_copy, tmp_path):
    _edit_config(model_copy, architectures=["LlamaForCausalLM"], model_type="llama")
    with pytest.raises(InvalidInput, match="LlamaForCausalLM.*Qwen2ForCausalLM.*Qwen3ForCausalLM"):
        build_decoder(model_copy, tmp_path / "out")


@pytest.mark.parametrize(
    "changes",
    [
        {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}},
        {"rope_parameters": None, "rope_scaling": {"type": "linear", "factor": 2.0}},
    ],
)
def test_unsupported_rope_scaling_is_refused(changes, model_copy, tmp_path):
    _edit_config(model_copy, **changes)
    with pytest.raises(InvalidInput, match="rope type .* is not implemented; supported"):
        build_decoder(model_copy, tmp_path / "out")


def test_old_style_rope_theta_and_null_scaling_are_read(model_copy):
    _edit_config(model_copy, rope_parameters=None, rope_theta=5e5, rope_scaling=None)
    assert read_config(model_copy).rope_theta == 5e5


def test_qwen3_config_without_head_dim_is_refused(make_tiny_model, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(make_tiny_model("qwen3"), folder)
    config = json.loads((folder / "config.json").read_text())
    del config["head_dim"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidInput, match="head_dim"):
        build_decoder(folder, tmp_path / "out")


def test_head_dim_not_multiple_of_16_is_refused(make_tiny_model, tmp_path):
    folder = make_tiny_model("qwen3", head_dim=40)
    with pytest.raises(InvalidInput, match="head_dim 40.*multiple of 16"):
        build_decoder(folder, tmp_path / "out")


def test_bad_activation_dtype_lists_allowed_values(model_copy, tmp_path):
    with pytest.raises(InvalidInput, match="float32.*float16"):
        build_decoder(model_copy, tmp_path / "out", activation_dtype="bfloat16")


def test_expected_shapes_follow_config_head_dim(tiny_qwen3_dir):
    shapes = expected_shapes(read_config(tiny_qwen3_dir))
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (4 * 48, 128)
    assert shapes["model.layers.0.self_attn.k_norm.weight"] == (48,)
    assert "lm_head.weight" not in shapes


def test_gptq_quantizes_with_calibration_activations(make_tiny_model, tmp_path):
    from edgepipe.stages.quantize.plan import QuantPlan, QuantSpec

    model_dir = make_tiny_model("qwen3", hidden_size=128, head_dim=32)
    ids = np.random.default_rng(0).integers(0, 1000, 96)
    results = {}
    for method in ("rtn", "gptq"):
        plan = QuantPlan(default=QuantSpec(4, 32, False, method, 0))
        results[method] = build_decoder(
            model_dir, tmp_path / method, quant=plan, context_length=256, calibration_ids=ids
        )
        assert op_types(results[method].model_path).count("MatMulNBits") == 2 * 5
    # Same layout, different codes: the calibration activations reached the quantizer.
    rtn, gptq = (results[m].data_path.read_bytes() for m in ("rtn", "gptq"))
    assert len(rtn) == len(gptq) and rtn != gptq
    ref_logits, _ = hf_reference(model_dir, SMALL_PROMPT, 0)
    errors = {
        m: float(np.abs(ort_greedy(r.model_path, SMALL_PROMPT, 0)[0][0] - ref_logits[0]).mean())
        for m, r in results.items()
    }
    assert np.isfinite(errors["gptq"]) and errors["gptq"] < 2 * errors["rtn"], errors


def test_gptq_without_calibration_ids_says_what_to_pass(make_tiny_model, tmp_path):
    from edgepipe.stages.quantize.plan import QuantPlan, QuantSpec

    plan = QuantPlan(default=QuantSpec(4, 32, False, "gptq", 0))
    with pytest.raises(InvalidInput, match="calibration_ids"):
        build_decoder(make_tiny_model("qwen2"), tmp_path, quant=plan)


def test_bf16_preset_exports_and_matches_transformers(tmp_path):
    from edgepipe.arch.presets import write_preset

    model_dir = write_preset("tiny-qwen2", 3, tmp_path / "preset", tokenizer=False)
    result = build_decoder(model_dir, tmp_path / "onnx", context_length=256)
    assert result.config["family"] == "qwen2" and result.config["head_dim"] == 32
    assert_parity(model_dir, tmp_path / "onnx", PROMPT, 16)
