"""Recipe and device-profile schema: shipped files load, bad files report file + field + fix."""

from __future__ import annotations

import textwrap
import typing
from pathlib import Path

import pytest

from edgepipe import schema
from edgepipe.errors import InvalidInput
from edgepipe.schema import shipped as resources
from edgepipe.schema.recipe import BuiltinText

SHIPPED_PROFILES = sorted(resources.profile_files())
SHIPPED_RECIPES = sorted(resources.recipe_files())

GOOD_RECIPE = """\
name: {name}
description: a recipe written in a test
source:
  preset: {{name: tiny-qwen2, seed: 0}}
targets: [cpu-x64, cpu-arm64, directml, qnn-htp]
calibration: {{builtin: mixed, max_tokens: 64}}
"""


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def recipe_text(name: str = "mine", **replace: str) -> str:
    text = GOOD_RECIPE.format(name=name)
    for old, new in replace.items():
        assert old in text or old.startswith("+"), old
        text = text + textwrap.dedent(new) if old.startswith("+") else text.replace(old, new)
    return text


def problems_for(tmp_path: Path, text: str, name: str = "mine.yaml") -> list[str]:
    return schema.validate_files([write(tmp_path, name, text)])


@pytest.fixture(scope="module")
def loaded_recipes() -> dict[str, schema.Recipe]:
    return schema.shipped_recipes()


# ------------------------------------------------------------------------- shipped files


def test_shipped_files_are_all_there():
    assert SHIPPED_PROFILES == ["cpu-arm64", "cpu-x64", "directml", "qnn-htp"]
    assert set(SHIPPED_RECIPES) == {
        "qwen2.5-0.5b-instruct", "qwen2.5-1.5b-instruct", "qwen2.5-3b-instruct",
        "qwen2.5-coder-1.5b-instruct", "qwen2.5-math-1.5b-instruct", "qwen3-0.6b",
        "qwen3-1.7b", "qwen3-4b", "tiny-qwen2", "tiny-qwen3", "tiny-trained",
    }  # fmt: skip


def test_every_shipped_file_validates_without_problems():
    files = [*resources.profile_files().values(), *resources.recipe_files().values()]
    assert schema.validate_files(files) == []


@pytest.mark.parametrize("name", SHIPPED_PROFILES)
def test_shipped_profile_loads_with_its_file_name(name):
    profile = schema.load_profile(name)
    assert profile.name == name
    assert profile.default_precision in profile.weight_precisions


@pytest.mark.parametrize("name", SHIPPED_RECIPES)
def test_shipped_recipe_resolves_a_precision_for_every_target(name, loaded_recipes):
    recipe = loaded_recipes[name]
    assert recipe.name == name
    for profile in recipe.target_profiles():
        resolved = recipe.precision_for(profile)
        assert resolved.profile == profile.name
        assert {resolved.weights, resolved.embedding, resolved.lm_head} <= set(
            profile.weight_precisions
        )
        if profile.graph_variant == "dynamic":
            assert resolved.block_size is not None


@pytest.mark.parametrize("name", SHIPPED_RECIPES)
def test_shipped_recipe_opens_with_its_build_command(name):
    first = resources.recipe_files()[name].read_text(encoding="utf-8").splitlines()[0]
    assert first == f"# Build:  edgepipe build recipes/{name}.yaml"


def test_hub_recipes_pin_a_commit_sha(loaded_recipes):
    hub = [r for r in loaded_recipes.values() if r.source.hub]
    assert len(hub) == 8
    for recipe in hub:
        assert schema.COMMIT_SHA.match(recipe.source.hub.revision), recipe.name
        assert recipe.source.hub.id.startswith("Qwen/")


def test_qwen3_recipes_carry_the_model_card_sampling(loaded_recipes):
    for name in ("qwen3-0.6b", "qwen3-1.7b", "qwen3-4b"):
        gen = loaded_recipes[name].generation
        on, off = gen.sampling_for(thinking=True), gen.sampling_for(thinking=False)
        assert (on.temperature, on.top_p, on.top_k) == (0.6, 0.95, 20)
        assert (off.temperature, off.top_p, off.top_k) == (0.7, 0.8, 20)
        assert loaded_recipes[name].resolve_family() == "qwen3"
    gen = loaded_recipes["qwen2.5-0.5b-instruct"].generation
    assert (gen.temperature, gen.top_p, gen.top_k, gen.repetition_penalty) == (0.7, 0.8, 20, 1.05)


def test_shipped_profiles_match_their_devices():
    x64, arm, dml, qnn = (
        schema.load_profile(n) for n in ("cpu-x64", "cpu-arm64", "directml", "qnn-htp")
    )
    assert (x64.default_precision, x64.accuracy_level, x64.default_block_size) == ("int4", 4, 128)
    assert x64.default_symmetric and not arm.default_symmetric  # arm64: not measured yet
    assert arm.default_precision == "int4" and arm.accuracy_level == 4
    assert dml.activation_dtype == "float16" and dml.default_precision == "int4"
    assert (qnn.graph_variant, qnn.default_precision, qnn.prefill_chunk) == ("static", "int8", 64)
    assert qnn.qnn.htp_arch == 73 and qnn.qnn.activation_quantization == "uint16"
    assert all("::" not in op for op in qnn.ops), "qnn-htp must list standard ops only"
    for profile in (x64, arm):
        for op in ("GroupQueryAttention", "MatMulNBits", "GatherBlockQuantized",
                   "SkipSimplifiedLayerNormalization", "RotaryEmbedding"):  # fmt: skip
            assert profile.accepts_op(op, "com.microsoft"), (profile.name, op)
        assert profile.accepts_op("SimplifiedLayerNormalization")


def test_directml_profile_carries_the_layout_its_kernels_need():
    dml = schema.load_profile("directml")
    assert (dml.decoder.rotary, dml.decoder.qkv, dml.decoder.matmul_bias) == (
        "node", "separate", "add",
    )  # fmt: skip
    assert dml.decoder.fp16_guard == "auto"
    assert dml.session_config == {"ep.dml.enable_graph_capture": "1"}
    assert not dml.accepts_op("GatherBlockQuantized", "com.microsoft")
    x64, arm = schema.load_profile("cpu-x64"), schema.load_profile("cpu-arm64")
    assert x64.decoder == arm.decoder == schema.DecoderLayout()  # the CPU's fused layout
    assert (arm.architecture, arm.default_block_size) == ("arm64", 128)
    assert x64.architecture == "x86_64" and dml.architecture == "any"


def test_qnn_session_options_carry_the_typed_knobs_as_strings():
    options = schema.load_profile("qnn-htp").session_provider_options()
    assert options["soc_model"] == "60" and options["htp_arch"] == "73"
    assert options["backend_type"] == "htp"
    assert all(isinstance(v, str) for v in options.values())


# ---------------------------------------------------------------- precision resolution


def test_precision_merges_profile_entry_over_recipe_over_profile_default(tmp_path):
    text = recipe_text(**{"+": """\
        precision:
          weights: int4
          block_size: 64
          lm_head: int8
          profiles:
            cpu-arm64: {block_size: 128, accuracy_level: 0}
            directml: {lm_head: same}
        """})  # fmt: skip
    recipe = schema.load_recipe(write(tmp_path, "mine.yaml", text))
    x64 = recipe.precision_for("cpu-x64")
    assert (x64.block_size, x64.accuracy_level) == (64, 4)
    assert (x64.lm_head, x64.embedding) == ("int8", "int4")
    arm = recipe.precision_for("cpu-arm64")
    assert (arm.block_size, arm.accuracy_level) == (128, 0)
    qnn = recipe.precision_for("qnn-htp")
    assert qnn.weights == "int4" and qnn.block_size is None, "static keeps per-channel scales"
    # The static token table has one scale: int4 "same" would lose it, so it stays int8.
    assert (qnn.embedding, x64.embedding) == ("int8", "int4")


def test_recipe_wide_gptq_is_rtn_on_a_static_target_and_refused_in_its_own_entry(tmp_path):
    text = recipe_text(**{"+": "precision: {method: gptq}\n"})
    recipe = schema.load_recipe(write(tmp_path, "mine.yaml", text))
    assert recipe.precision_for("cpu-x64").method == "gptq"
    assert recipe.precision_for("qnn-htp").method == "rtn"
    text = recipe_text(**{"+": "precision: {profiles: {qnn-htp: {method: gptq}}}\n"})
    with pytest.raises(InvalidInput, match="precision.profiles.qnn-htp.method: static QDQ"):
        schema.load_recipe(write(tmp_path, "mine.yaml", text))


def test_same_embedding_falls_back_to_activation_dtype_without_a_quantized_gather(tmp_path):
    recipe = schema.load_recipe(write(tmp_path, "mine.yaml", recipe_text()))
    dml = recipe.precision_for("directml")
    assert (dml.weights, dml.embedding, dml.lm_head) == ("int4", "fp16", "int4")
    assert recipe.precision_for("qnn-htp").embedding == "int8"


def test_for_weight_applies_exclude_then_first_matching_override():
    resolved = schema.ResolvedPrecision(
        profile="cpu-x64", weights="int4", method="rtn", block_size=32, symmetric=False,
        accuracy_level=4, embedding="int4", lm_head="int8", exclude=("*.0.mlp.*",),
        overrides=(
            schema.Override(pattern="*down_proj*", weights="int8"),
            schema.Override(pattern="*proj*", weights="int4", block_size=128),
        ),
    )  # fmt: skip
    assert resolved.for_weight("model.layers.0.mlp.down_proj.weight") is None
    assert resolved.for_weight("model.layers.1.mlp.down_proj.weight") == ("int8", 32)
    assert resolved.for_weight("model.layers.1.self_attn.q_proj.weight") == ("int4", 128)
    assert resolved.for_weight("model.norm.weight") == ("int4", 32)


@pytest.mark.parametrize(
    ("embedding", "lm_head", "table"),
    [
        ("int4", "int8", "int8"),  # the shipped Qwen recipes: one 8-bit table
        ("int8", "int4", "int8"),
        ("int4", "int4", "int4"),
        ("int4", "fp32", "fp32"),  # a float head reads a float table
        ("fp16", "fp32", "fp32"),
        ("fp16", "int4", None),  # no quantized gather (directml): a quantized head copy
    ],
)
def test_a_tied_table_takes_the_more_precise_of_embedding_and_lm_head(embedding, lm_head, table):
    from edgepipe.schema.precision import tied_table

    assert tied_table(embedding, lm_head) == table


def test_for_model_records_the_one_table_a_tied_dynamic_model_holds(tmp_path):
    plan = "{weights: int4, embedding: same, lm_head: int8, profiles: {directml: {lm_head: same}}}"
    text = recipe_text(**{"+": f"precision: {plan}\n"})
    recipe = schema.load_recipe(write(tmp_path, "mine.yaml", text))
    x64 = recipe.precision_for("cpu-x64")
    assert x64.tied is None, "the model's tie is not known from the recipe alone"
    tied = x64.for_model(True, "dynamic")
    assert (tied.embedding, tied.lm_head, tied.tied) == ("int8", "int8", True)
    untied = x64.for_model(False, "dynamic")
    assert (untied.embedding, untied.lm_head, untied.tied) == ("int4", "int8", False)
    # A static graph stores two tables (its Gather needs one scale), each at its own precision.
    qnn = recipe.precision_for("qnn-htp").for_model(True, "static")
    assert qnn.tied is False and qnn.embedding == recipe.precision_for("qnn-htp").embedding
    dml = recipe.precision_for("directml").for_model(True, "dynamic")
    assert (dml.embedding, dml.lm_head, dml.tied) == ("fp16", "int4", False)


def test_precision_for_refuses_a_precision_the_profile_cannot_run(tmp_path):
    text = recipe_text(**{"+": "precision:\n  weights: int8\n"})
    problems = problems_for(tmp_path, text)
    refused = "mine.yaml: precision.weights: int8 is not accepted by profile directml (int4, fp16)"
    assert refused in problems
    assert not any("cpu-x64" in p for p in problems), "cpu-x64 accepts int8"


# --------------------------------------------------------------------------- bad recipes


@pytest.fixture(autouse=True)
def _cwd(tmp_path, monkeypatch):
    # Problems name files relative to the working directory, as a user sees them.
    monkeypatch.chdir(tmp_path)


BAD_RECIPES = {
    "unknown key": (
        {"calibration:": "calibraton:"},
        ["mine.yaml: calibraton: unknown key 'calibraton' (did you mean 'calibration'?)",
         "allowed keys: name, description, source"],
    ),
    "wrong type": (
        {"+": "precision: {block_size: big}\n"},
        ["mine.yaml: precision.block_size: Input should be a valid integer", "got 'big'"],
    ),
    "unknown profile in targets": (
        {"directml, qnn-htp": "directml, cpu-x86"},
        ["mine.yaml: targets[3]: unknown profile 'cpu-x86'; known profiles: "
         "cpu-arm64, cpu-x64, directml, qnn-htp"],
    ),
    "two sources": (
        {"  preset:": "  hub: {id: Qwen/Qwen3-0.6B, revision: v1.0}\n  preset:"},
        [
            "mine.yaml: source: give exactly one of hub, modelscope, path, preset, bundled "
            "(got hub, preset)"
        ],
    ),
    "no source": (
        {"  preset: {name: tiny-qwen2, seed: 0}\n": "  {}\n"},
        [
            "mine.yaml: source: give exactly one of hub, modelscope, path, preset, bundled "
            "(got none)"
        ],
    ),
    "block size not a power of two": (
        {"+": "precision: {block_size: 48}\n"},
        ["mine.yaml: precision.block_size: must be a power of two from 16 to 256"],
    ),
    "bits not in the set": (
        {"+": "precision: {weights: int3}\n"},
        ["mine.yaml: precision.weights: must be one of 'int4', 'int8', 'fp16' or 'fp32'; "
         "got 'int3'"],
    ),
    "method not registered": (
        {"+": "precision: {method: awq}\n"},
        ["mine.yaml: precision.method: must be one of 'rtn', 'hqq' or 'gptq'; got 'awq'"],
    ),
    "branch instead of a pinned revision": (
        {"  preset: {name: tiny-qwen2, seed: 0}": "  hub: {id: Qwen/Qwen3-0.6B, revision: main}"},
        ["mine.yaml: source.hub.revision: must pin the weights: a 40-hex"],
    ),
    "unknown preset": (
        {"name: tiny-qwen2": "name: tiny-llama"},
        ["mine.yaml: source.preset.name: unknown preset 'tiny-llama'; allowed: tiny-qwen2"],
    ),
    "unknown builtin text": (
        {"builtin: mixed": "builtin: wikitext"},
        ["mine.yaml: calibration.builtin: must be one of 'prose', 'code', 'cjk' or 'mixed'"],
    ),
    "missing required field": (
        {"description: a recipe written in a test\n": ""},
        ["mine.yaml: description: required field is missing"],
    ),
    "profile entry for a profile not targeted": (
        {"+": "precision:\n  profiles:\n    cpu-x86: {weights: int8}\n"},
        ["mine.yaml: precision.profiles.cpu-x86: 'cpu-x86' is not in targets"],
    ),
    "precision the profile refuses": (
        {"+": "precision:\n  profiles:\n    directml: {weights: int8}\n"},
        ["mine.yaml: precision.profiles.directml.weights: int8 is not accepted by profile "
         "directml (int4, fp16)"],
    ),
    "static target without calibration": (
        {"calibration: {builtin: mixed, max_tokens: 64}\n": ""},
        ["mine.yaml: calibration: the static QDQ graph of qnn-htp needs calibration text"],
    ),
    "hqq on the static graph": (
        {"+": "precision: {method: hqq}\n"},
        ["mine.yaml: precision.method: hqq makes int4 weights with float zero points"],
    ),
    "symmetric hqq": (
        {"+": "precision: {method: hqq, symmetric: true}\n"},
        ["mine.yaml: precision.symmetric: hqq optimizes a zero point per block, so it is "
         "asymmetric only"],
    ),
    "gptq without calibration text": (
        {"calibration: {builtin: mixed, max_tokens: 64}\n": "", "+": "precision: {method: gptq}\n"},
        ["mine.yaml: calibration: method gptq needs calibration text"],
    ),
    "thinking on a qwen2 model": (
        {"+": "generation: {enable_thinking: true}\n"},
        ["mine.yaml: generation.enable_thinking: thinking is a Qwen3 feature"],
    ),
    "greedy thinking": (
        {"name: tiny-qwen2": "name: tiny-qwen3",
         "+": "generation: {thinking: {temperature: 0}}\n"},
        ["mine.yaml: generation: thinking.temperature 0 (greedy) makes Qwen3 thinking loop"],
    ),
    "key given twice": (
        {"+": "targets: [cpu-x64]\n"},
        ["mine.yaml: line 7, column 1: malformed YAML: key 'targets' is given twice"],
    ),
    "malformed yaml": (
        {"description: a recipe written in a test": "description: broken: here"},
        ["mine.yaml: line 2, column 20: malformed YAML: mapping values are not allowed here"],
    ),
    "a single target instead of a list": (
        {"targets: [cpu-x64, cpu-arm64, directml, qnn-htp]": "targets: cpu-x64"},
        ["mine.yaml: targets: must be a list, e.g. [cpu-x64] or one `- item` per line"],
    ),
    "a value where a mapping belongs": (
        {"+": "precision: int4\n"},
        ["mine.yaml: precision: must be a mapping of keys (one `key: value` per line); "
         "got 'int4'"],
    ),
    "key abbreviated": (
        {"seed: 0}": "sd: 0}"},
        ["mine.yaml: source.preset.sd: unknown key 'sd' (did you mean 'seed'?); "
         "allowed keys: name, seed"],
    ),
    "name differs from the file name": (
        {"name: mine": "name: yours"},
        ["mine.yaml: name: 'yours' differs from the file name 'mine.yaml'"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_RECIPES))
def test_bad_recipe_names_file_field_and_fix(case, tmp_path):
    replace, expected = BAD_RECIPES[case]
    problems = problems_for(tmp_path, recipe_text(**replace))
    assert problems, case
    text = "\n".join(problems)
    for fragment in expected:
        assert fragment in text, f"{case}: {fragment!r} not in:\n{text}"


def test_every_problem_is_reported_at_once(tmp_path):
    text = recipe_text(**{
        "name: tiny-qwen2": "name: tiny-llama",
        "directml, qnn-htp": "directml, npu",
        "+": "precision: {weights: int3, block_size: 48, blocksize: 32}\n",
    })  # fmt: skip
    fields = [p.split(": ")[1] for p in problems_for(tmp_path, text)]
    assert fields == [
        "source.preset.name", "targets[3]", "precision.weights", "precision.block_size",
        "precision.blocksize",
    ]  # fmt: skip


def test_missing_file_says_so(tmp_path):
    assert schema.validate_files([tmp_path / "nope.yaml"]) == ["nope.yaml: file not found"]


def test_a_top_level_list_is_not_a_recipe(tmp_path):
    problems = problems_for(tmp_path, "- name: x\n")
    assert problems == [
        "mine.yaml: (top level): expected a mapping of keys (name: ...), got a list"
    ]


def test_load_recipe_raises_invalid_input_with_every_problem(tmp_path):
    path = write(tmp_path, "mine.yaml", recipe_text(**{"+": "precision: {block_size: 48}\n"}))
    with pytest.raises(InvalidInput) as info:
        schema.load_recipe(path)
    assert info.value.problems == schema.validate_files([path])


def test_relative_paths_resolve_against_the_recipe_folder(tmp_path, monkeypatch):
    model = tmp_path / "recipes" / "weights"
    write(model, "config.json", '{"model_type": "qwen3"}')
    write(tmp_path / "recipes", "texts/calib.txt", "hello there")
    text = recipe_text(**{
        "  preset: {name: tiny-qwen2, seed: 0}": "  path: weights",
        "{builtin: mixed, max_tokens: 64}": "{file: texts/calib.txt}",
    })  # fmt: skip
    path = write(tmp_path / "recipes", "mine.yaml", text)
    monkeypatch.chdir(tmp_path / "recipes" / "texts")
    recipe = schema.load_recipe(path)
    assert recipe.source.path == model.resolve()
    assert recipe.calibration.read() == "hello there"
    assert recipe.resolve_family({"model_type": "qwen3"}) == "qwen3"


def test_path_source_without_a_model_folder_is_reported(tmp_path):
    text = recipe_text(**{"  preset: {name: tiny-qwen2, seed: 0}": "  path: nowhere"})
    problems = problems_for(tmp_path, text)
    assert any(p.startswith("mine.yaml: source.path: ") and "config.json" in p for p in problems)


def test_family_cannot_be_guessed_from_a_bare_folder(tmp_path):
    recipe = schema.Recipe.model_validate(
        {
            "name": "x",
            "description": "d",
            "source": {"path": str(tmp_path)},
            "targets": ["cpu-x64"],
        },
        context={"profiles": {"cpu-x64": None}},
    )
    with pytest.raises(InvalidInput, match="family"):
        recipe.resolve_family()


def test_targets_may_name_a_profile_file_next_to_the_recipe(tmp_path):
    profile = resources.profile_files()["cpu-x64"].read_text(encoding="utf-8")
    write(tmp_path, "profiles/my-cpu.yaml", profile.replace("name: cpu-x64", "name: my-cpu"))
    text = recipe_text(**{"[cpu-x64, cpu-arm64, directml, qnn-htp]": "[profiles/my-cpu.yaml]"})
    path = write(tmp_path, "mine.yaml", text)
    recipe = schema.load_recipe(path)
    assert [p.name for p in recipe.target_profiles()] == ["my-cpu"]
    assert recipe.precision_for("profiles/my-cpu.yaml").weights == "int4"


# -------------------------------------------------------------------------- bad profiles


def profile_text(**replace: str) -> str:
    text = resources.profile_files()["qnn-htp"].read_text(encoding="utf-8")
    text = text.replace("name: qnn-htp", "name: mine")
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    return text


BAD_PROFILES = {
    "provider not in the closed set": (
        {"provider: QNNExecutionProvider": "provider: CUDAExecutionProvider"},
        "mine.yaml: provider: must be one of 'CPUExecutionProvider', 'DmlExecutionProvider' or "
        "'QNNExecutionProvider'; got 'CUDAExecutionProvider'",
    ),
    "static without prefill chunk": (
        {"prefill_chunk: 64 ": "# "},
        "mine.yaml: prefill_chunk: required for graph_variant static",
    ),
    "qnn provider without its knobs": (
        {"qnn:\n": "other:\n"},
        "mine.yaml: other: unknown key 'other'",
    ),
    "package that lacks the provider": (
        {"package: onnxruntime-qnn": "package: onnxruntime"},
        "mine.yaml: package: QNNExecutionProvider comes with onnxruntime-qnn",
    ),
    "op that is not an op name": (
        {"  - Where": "  - where clause"},
        "mine.yaml: ops[29]: must be 'OpType' or 'domain::OpType'",
    ),
    "htp arch not in the set": (
        {"htp_arch: 73": "htp_arch: 70"},
        "mine.yaml: qnn.htp_arch: must be one of 68, 69, 73, 75, 79 or 81; got 70",
    ),
    "knob set twice": (
        {"provider_options:\n": "provider_options:\n  soc_model: 60\n"},
        "mine.yaml: provider_options: set soc_model under qnn:",
    ),
    "accuracy level out of range": (
        {"accuracy_level: 0": "accuracy_level: 7"},
        "mine.yaml: accuracy_level: Input should be less than or equal to 4; got 7",
    ),
    "decoder layout on a static graph": (
        {"ops:\n": "decoder: {rotary: node}\nops:\n"},
        "mine.yaml: decoder: only for graph_variant dynamic; remove it",
    ),
    "fp16 guard on a float32 graph": (
        {"ops:\n": "decoder: {fp16_guard: auto}\nops:\n"},
        "mine.yaml: decoder.fp16_guard: only for activation_dtype float16; set it to off",
    ),
    "rotary placement not in the set": (
        {"ops:\n": "decoder: {rotary: gqa}\nops:\n"},
        "mine.yaml: decoder.rotary: must be one of 'attention' or 'node'; got 'gqa'",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_PROFILES))
def test_bad_profile_names_file_field_and_fix(case, tmp_path):
    replace, expected = BAD_PROFILES[case]
    problems = problems_for(tmp_path, profile_text(**replace))
    assert any(expected in p for p in problems), f"{case}: {expected!r} not in {problems}"


def test_branchwise_head_norm_needs_its_kernel_in_ops(tmp_path):
    text = resources.profile_files()["cpu-x64"].read_text(encoding="utf-8")
    text = text.replace("name: cpu-x64", "name: mine")
    line = next(x for x in text.splitlines(keepends=True) if "::BranchwiseRMSNorm" in x)
    without = text.replace(line, "")
    expected = (
        "mine.yaml: decoder.head_norm: branchwise needs com.microsoft::BranchwiseRMSNorm in ops "
        "(CPU provider); add it, or set head_norm: reshape"
    )
    assert problems_for(tmp_path, without) == [expected]
    reshaped = without.replace("ops:\n", "decoder: {head_norm: reshape}\nops:\n", 1)
    assert problems_for(tmp_path, reshaped) == []


def test_missing_qnn_block_is_reported_at_its_field(tmp_path):
    text = profile_text()
    text = text[: text.index("qnn:\n")] + text[text.index("ops:\n") :]
    problems = problems_for(tmp_path, text)
    assert problems == ["mine.yaml: qnn: required for QNNExecutionProvider (soc_model, htp_arch)"]


def test_file_kind_tells_recipes_from_profiles(tmp_path):
    assert schema.file_kind(tmp_path / "x.yaml", {"source": {}}) == "recipe"
    assert schema.file_kind(tmp_path / "x.yaml", {"provider": "x"}) == "profile"
    assert schema.file_kind(tmp_path / "x.yaml", {"name": "x"}) is None
    assert problems_for(tmp_path, "name: x\n") == [
        "mine.yaml: (top level): neither a recipe (it would have source:) nor a device profile "
        "(it would have provider:)"
    ]


# ------------------------------------------------------------------------------ registries


def test_preset_names_follow_the_presets_registry():
    from edgepipe.arch.presets import PRESETS

    names = schema.preset_names()
    assert names == tuple(PRESETS)
    assert {"tiny-qwen2", "tiny-qwen3"} <= set(names)


def test_builtin_text_names_match_the_shipped_samples():
    assert typing.get_args(BuiltinText) == resources.BUILTIN_TEXTS


def test_profile_providers_are_the_runtime_provider_names():
    from typing import get_args

    from edgepipe.runtime import providers
    from edgepipe.schema.profile import Provider

    expected = {providers.CPU_PROVIDER, providers.DML_PROVIDER, providers.QNN_PROVIDER}
    assert set(get_args(Provider)) == expected
    assert set(get_args(Provider)) <= set(providers.PROVIDER_PACKAGES)
