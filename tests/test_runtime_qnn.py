"""QNN sessions from onnxruntime-qnn's plug-in library: placement with CPU fallback disabled,
the missing-package error, and a clean stdout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edgepipe.runtime.qnn as qnn
from tests.fixtures.static import HTP, needs_qnn, one_op_graph


@needs_qnn
@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_both_static_graphs_place_every_node_on_the_htp(small_static_build, family):
    artifact = Path(small_static_build(family, "int8").artifact)
    for name in ("prefill.onnx", "decode.onnx"):
        session = qnn.qnn_session(artifact / name, HTP)  # CPU fallback disabled
        assert session.get_providers()[0] == "QNNExecutionProvider"


@needs_qnn
def test_a_node_the_htp_refuses_fails_only_with_fallback_disabled(tmp_path):
    path = one_op_graph(tmp_path / "einsum.onnx", "Einsum", equation="ij->ji")
    with pytest.raises(Exception, match="fallback to CPU EP has been explicitly disabled"):
        qnn.qnn_session(path, HTP)
    session = qnn.qnn_session(path, HTP, cpu_fallback=True)
    x = np.arange(16, dtype=np.float32).reshape(4, 4)
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], x.T)


def test_a_missing_onnxruntime_qnn_names_its_pip_package():
    # A fresh interpreter, where the plug-in was never registered, with its import made to fail.
    code = (
        "import sys\n"
        "sys.modules['onnxruntime_qnn'] = None\n"
        "import edgepipe.runtime.qnn as q\n"
        "from edgepipe.runtime import ProviderUnavailable\n"
        "print(q.qnn_available())\n"
        "try:\n"
        "    q.qnn_session_options({'backend_type': 'htp'})\n"
        "except ProviderUnavailable as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    available, message = out.stdout.splitlines()
    assert available == "False"
    assert "pip install onnxruntime-qnn" in message


@needs_qnn
def test_the_htp_library_banner_stays_off_stdout(tmp_path):
    path = one_op_graph(tmp_path / "relu.onnx", "Relu")
    code = (
        "import edgepipe.runtime.qnn as q\n"
        f"q.qnn_session({str(path)!r}, {HTP!r})\n"
        "print('only this')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout == "only this\n"
