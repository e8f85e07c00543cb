"""The graph holds what the manifest says: every resolved precision field read back from built
graphs (`edgepipe.stages.validate.precision_check`), and a tied table stored once."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import yaml

from edgepipe.arch.families import read_config
from edgepipe.build.plan import plan_builds
from edgepipe.build.run import BuildOptions, build_all
from edgepipe.errors import BuildFailed
from edgepipe.formats.external_data import duplicate_initializers
from edgepipe.schema import ResolvedPrecision
from edgepipe.schema import shipped as resources
from edgepipe.stages.export.dynamic import build_decoder
from edgepipe.stages.quantize.plan import QuantPlan
from edgepipe.stages.validate.precision_check import check_artifact_weights, check_precision
from tests.fixtures.quantize import int4_resolved

# (recipe, --precision, precision block changes): the tiny recipes in int4 and int8, and the
# variants whose fields a graph could silently drop.
VARIANTS = {
    "qwen2-int4": ("tiny-qwen2", "int4", {}),
    "qwen3-int8": ("tiny-qwen3", "int8", {}),
    "qwen2-head8-override-exclude": (
        "tiny-qwen2",
        "int4",
        {
            "embedding": "int4",
            "lm_head": "int8",
            "exclude": ["model.layers.0.mlp.down_proj.weight"],
            "overrides": [
                {"pattern": "model.layers.1.*", "weights": "int8", "block_size": 64},
            ],
        },
    ),
    "qwen3-sym-float-head": ("tiny-qwen3", "int4", {"symmetric": True, "lm_head": "fp32"}),
}


class _Builds(dict):
    """variant -> (artifact folder, manifest), each variant built on first use."""

    def __init__(self, tmp_path_factory):
        super().__init__()
        self.factory = tmp_path_factory
        self.cache = tmp_path_factory.mktemp("cache")

    def __missing__(self, key):
        recipe, precision, changes = VARIANTS[key]
        folder = self.factory.mktemp(key)
        data = yaml.safe_load(resources.resolve_recipe(recipe).read_text(encoding="utf-8"))
        data["precision"].update(changes)
        data["targets"] = ["cpu-x64"]
        data["name"] = f"{recipe}-{key}"
        path = folder / f"{data['name']}.yaml"
        path.write_text(yaml.safe_dump(data), encoding="utf-8")
        plans = plan_builds([str(path)], ["cpu-x64"], precision)
        (result,) = build_all(plans, BuildOptions(folder / "dist", precision, self.cache))
        artifact = Path(result.artifact)
        self[key] = (artifact, json.loads((artifact / "manifest.json").read_text()))
        return self[key]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> _Builds:
    return _Builds(tmp_path_factory)


def _recorded(manifest: dict) -> ResolvedPrecision:
    return ResolvedPrecision(**manifest["export"]["resolved_precision"])


def _initializer_types(model_path) -> dict[str, int]:
    model = onnx.load(str(model_path), load_external_data=False)
    return {t.name: t.data_type for t in model.graph.initializer}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_recorded_precision_field_is_what_the_graph_holds(built, variant, tmp_path):
    artifact, manifest = built[variant]
    recorded = _recorded(manifest)
    assert recorded.tied is True  # the tiny presets tie their head, like every Qwen
    assert recorded.embedding == recorded.lm_head
    # The source config is not part of the artifact: the preset writes the same one again.
    from edgepipe.arch.presets import write_preset

    source = manifest["source"]
    cfg = read_config(write_preset(source["preset"], source["seed"], tmp_path / "src"))
    record = check_precision(artifact / "model.onnx", recorded, cfg, "float32")
    assert record["passed"], record["failures"]
    assert record["checked"] == 7 * cfg.num_hidden_layers + 2
    assert manifest["validation"]["precision_check"]["passed"]
    assert duplicate_initializers(artifact / "model.onnx") == []


def test_an_int8_head_asked_beside_an_int4_embedding_makes_one_8_bit_table(built):
    artifact, manifest = built["qwen2-head8-override-exclude"]
    recorded = _recorded(manifest)
    assert (recorded.weights, recorded.embedding, recorded.lm_head) == ("int4", "int8", "int8")
    model = onnx.load(str(artifact / "model.onnx"), load_external_data=False)
    bits = {
        n.op_type: {a.name: a.i for a in n.attribute}.get("bits")
        for n in model.graph.node
        if n.op_type in ("GatherBlockQuantized", "MatMulNBits")
        and n.name.startswith(("embed_tokens/", "lm_head/"))
    }
    assert bits == {"GatherBlockQuantized": 8, "MatMulNBits": 8}


def test_a_float_head_makes_the_tied_table_float(built):
    artifact, manifest = built["qwen3-sym-float-head"]
    recorded = _recorded(manifest)
    assert (recorded.embedding, recorded.lm_head, recorded.tied) == ("fp32", "fp32", True)
    types = _initializer_types(artifact / "model.onnx")
    assert types["embed_tokens.weight"] == onnx.TensorProto.FLOAT
    assert "lm_head.qweight" not in types and "embed_tokens.qweight" not in types


@pytest.fixture(scope="module")
def int4_export(tmp_path_factory):
    from edgepipe.arch.presets import write_preset

    folder = tmp_path_factory.mktemp("export")
    source = write_preset("tiny-qwen2", 0, folder / "src")
    plan = QuantPlan.from_precision("int4", block_size=32, embedding="int4", lm_head="int4")
    build_decoder(source, folder / "onnx", quant=plan, context_length=128)
    return folder / "onnx", read_config(source)


def _int4(**changes) -> ResolvedPrecision:
    return int4_resolved(**{"tied": True, **changes})


def test_matching_precision_passes(int4_export):
    folder, cfg = int4_export
    assert check_artifact_weights(folder / "model.onnx", _int4(), cfg, "float32")["passed"]


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"lm_head": "int8", "embedding": "int8"}, "bits 8"),
        ({"block_size": 64}, "block_size 64"),
        ({"symmetric": True}, "recorded symmetric"),
        ({"accuracy_level": 4}, "accuracy_level 4"),
        ({"weights": "int8"}, "bits 8"),
        ({"exclude": ("model.layers.0.mlp.up_proj.weight",)}, "graph holds it quantized"),
        ({"lm_head": "int8"}, "tied: one table recorded as int4 and int8"),
    ],
)
def test_a_manifest_the_graph_disagrees_with_fails_the_build(int4_export, changes, says):
    folder, cfg = int4_export
    with pytest.raises(BuildFailed, match=says):
        check_artifact_weights(folder / "model.onnx", _int4(**changes), cfg, "float32")
