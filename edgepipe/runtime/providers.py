"""Execution provider names and the pip package that brings each one: the one table of both.

The runtime raises `ProviderUnavailable` with the package to install; the build side checks a
profile's `package` against the same table (the build side may import the runtime, never the
reverse).
"""

from __future__ import annotations

CPU_PROVIDER = "CPUExecutionProvider"
DML_PROVIDER = "DmlExecutionProvider"
QNN_PROVIDER = "QNNExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"

# Provider -> the pip packages whose onnxruntime build has it; the first is the one to install.
# Every onnxruntime wheel has the CPU provider, so a CPU profile may name any of them.
PROVIDER_PACKAGES: dict[str, tuple[str, ...]] = {
    CPU_PROVIDER: ("onnxruntime", "onnxruntime-directml", "onnxruntime-qnn"),
    DML_PROVIDER: ("onnxruntime-directml",),
    QNN_PROVIDER: ("onnxruntime-qnn",),
    CUDA_PROVIDER: ("onnxruntime-gpu",),
}

# Providers whose GroupQueryAttention cannot append several tokens after cached ones: DirectML's
# kernel binds the past length only for one-token calls and takes any longer call as the first
# of a sequence (its past length is forced to 0; onnxruntime's DmlOperatorGroupQueryAttention).
# On them a prompt is prefilled in one call (no chunks) and a chat turn re-feeds the whole
# conversation instead of continuing the previous turn's cache.
ONE_CALL_PREFILL = frozenset({DML_PROVIDER})


def install_package(provider: str) -> str | None:
    """The pip package to install for `provider`, or None when the table does not know it.

    Args:
        provider: an onnxruntime execution provider name.
    """
    packages = PROVIDER_PACKAGES.get(provider)
    return packages[0] if packages else None
