"""Static checks of a graph against its device profile, for providers that cannot run here.

DirectML needs Windows, an Arm build's kernels need an Arm CPU and an NPU profile its NPU: the
validate stage cannot run those providers on a Linux x86 build machine, so it checks what it can
without them and says plainly what it did not run:

* every node's op (`domain::OpType`, subgraphs included) is one the profile declares in `ops`;
* every tensor dtype the graph holds is one of the profile's `tensor_dtypes`: graph inputs and
  outputs, initializers, `value_info`, Constant values and Cast targets (every other dtype in
  the graph is produced from those by ops whose output dtype follows their inputs);
* `provider_status` records whether the profile's provider (and CPU architecture) actually ran.

The checks read the graph only (no weights), so they run for every profile, including the CPU
ones, where they catch an exporter change that the profile does not cover.
"""

from __future__ import annotations

import platform
from collections.abc import Iterator
from pathlib import Path

from edgepipe.errors import InvalidInput

# onnx TensorProto names -> the profile's tensor_dtypes names.
_DTYPE_NAMES = {"FLOAT": "float32", "DOUBLE": "float64"}
_MACHINES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}
EXAMPLES = 3  # node or value names quoted per offending op or dtype


def _dtype_name(elem_type: int) -> str:
    import onnx

    name = onnx.TensorProto.DataType.Name(elem_type)
    return _DTYPE_NAMES.get(name, name.lower())


def _nodes(graph) -> Iterator:
    import onnx

    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _nodes(sub)


def _graph_dtypes(graph) -> Iterator[tuple[str, str]]:
    """(dtype, where) for every dtype the graph declares."""
    import onnx

    for value in [*graph.input, *graph.output, *graph.value_info]:
        kind = value.type.WhichOneof("value")
        if kind == "tensor_type" and value.type.tensor_type.elem_type:
            yield _dtype_name(value.type.tensor_type.elem_type), value.name
    for tensor in graph.initializer:
        yield _dtype_name(tensor.data_type), tensor.name
    for node in _nodes(graph):
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to":
                yield _dtype_name(attr.i), f"{node.name} (Cast to)"
            elif attr.type == onnx.AttributeProto.TENSOR:
                yield _dtype_name(attr.t.data_type), f"{node.name} ({attr.name})"


def check_graph(model_path: Path | str, profile) -> dict:
    """Check a graph's ops and dtypes against a device profile.

    Args:
        model_path: the `.onnx` file (its external weights are not read).
        profile: an `edgepipe.schema.DeviceProfile`.

    Returns:
        `ops` (every `domain::OpType` used, with counts), `dtypes` (every dtype seen),
        `ops_outside` and `dtypes_outside` (each offending op or dtype with up to 3 node or
        value names), `failures` (one sentence each, naming the op or dtype and the profile)
        and `passed`.

    Raises:
        InvalidInput: the file is not an ONNX model.
    """
    import onnx

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, OSError, ...
        raise InvalidInput(f"{model_path}: not a readable ONNX model ({exc})") from exc
    ops: dict[str, int] = {}
    ops_outside: dict[str, list[str]] = {}
    for node in _nodes(model.graph):
        domain = "" if node.domain in ("", "ai.onnx") else node.domain
        key = f"{domain}::{node.op_type}" if domain else node.op_type
        ops[key] = ops.get(key, 0) + 1
        if not profile.accepts_op(node.op_type, domain):
            names = ops_outside.setdefault(key, [])
            if len(names) < EXAMPLES:
                names.append(node.name or "(unnamed)")
    dtypes: set[str] = set()
    dtypes_outside: dict[str, list[str]] = {}
    for dtype, where in _graph_dtypes(model.graph):
        dtypes.add(dtype)
        if dtype not in profile.tensor_dtypes:
            names = dtypes_outside.setdefault(dtype, [])
            if len(names) < EXAMPLES:
                names.append(where)
    failures = [
        f"op {op} (node {', '.join(nodes)}) is not in profile {profile.name}'s ops"
        for op, nodes in sorted(ops_outside.items())
    ]
    failures += [
        f"dtype {dtype} ({', '.join(where)}) is not in profile {profile.name}'s tensor_dtypes "
        f"({', '.join(profile.tensor_dtypes)})"
        for dtype, where in sorted(dtypes_outside.items())
    ]
    return {
        "profile": profile.name,
        "ops": dict(sorted(ops.items())),
        "dtypes": sorted(dtypes),
        "ops_outside": ops_outside,
        "dtypes_outside": dtypes_outside,
        "failures": failures,
        "passed": not failures,
    }


def this_machine() -> str:
    """This CPU's architecture as profiles name it (`x86_64`, `arm64`, or the raw name)."""
    raw = platform.machine().lower()
    return _MACHINES.get(raw, raw)


def provider_status(profile, used_provider: str, simulated_backend: str | None = None) -> dict:
    """Whether the profile's provider, on its CPU architecture, is what validation ran.

    Args:
        profile: the `DeviceProfile` built for.
        used_provider: the provider validation's session actually used.
        simulated_backend: the provider's backend ran in simulation (QNN's HTP on x86-64):
            named in `ran_on` and explained in the note.

    Returns:
        `provider`, `architecture` (the profile's), `ran_on` (provider and this machine),
        `provider_run` (True only when both match) and `note` (a sentence when not).
    """
    machine = this_machine()
    arch_ok = profile.architecture in ("any", machine)
    ran = used_provider == profile.provider and arch_ok
    note = None
    if used_provider != profile.provider:
        note = (
            f"{profile.provider} was NOT run: this onnxruntime does not have it "
            f"(`pip install {profile.package}` on a machine with that provider). The same graph "
            f"ran on {used_provider} ({machine}) for the quality checks, and its ops and dtypes "
            f"were checked statically against profile {profile.name}."
        )
    elif not arch_ok:
        note = (
            f"Profile {profile.name} targets {profile.architecture} CPUs; this build ran on "
            f"{machine}, so {profile.provider}'s {profile.architecture} kernels were NOT run. "
            f"The graph ran on {used_provider} here for the quality checks, and its ops and "
            f"dtypes were checked statically against the profile."
        )
    ran_on = used_provider
    if ran and simulated_backend is not None:
        ran_on = f"{used_provider} ({simulated_backend}, simulated)"
        note = (
            f"{profile.provider} ran here with its {simulated_backend} backend in simulation "
            f"(onnxruntime-qnn on {machine}): every node was placed on the HTP with CPU fallback "
            "disabled and its logits were checked. No Snapdragon device ran, so the build "
            "records no device timings."
        )
    return {
        "provider": profile.provider,
        "architecture": profile.architecture,
        "ran_on": {"provider": ran_on, "machine": machine},
        "provider_run": ran,
        "note": note,
    }
