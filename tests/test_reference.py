"""Tests for edgepipe.stages.validate.reference: the transformers reference agrees with the
float32 export of the same model, teacher-forced and greedy."""

from __future__ import annotations

import numpy as np
import pytest
import torch  # noqa: F401  (the test extra installs it: fail, don't skip, when it's broken)
import transformers  # noqa: F401

from edgepipe.stages.validate.reference import transformers_greedy, transformers_logits
from edgepipe.stages.validate.runner import DecoderRunner

IDS = [1, 17, 993, 40, 5, 123, 7, 300, 2, 64]


@pytest.fixture(scope="module")
def model_and_export(make_tiny_model, tmp_path_factory):
    from edgepipe.stages.export.dynamic import build_decoder

    model = make_tiny_model("qwen3", vocab_size=1000)
    out = tmp_path_factory.mktemp("reference-export")
    build_decoder(model, out, context_length=64)
    return model, DecoderRunner(out / "model.onnx")


def test_teacher_forced_logits_match_the_fp32_export(model_and_export):
    model, runner = model_and_export
    logits = transformers_logits(model, IDS)
    assert logits.shape == (len(IDS), 1000)
    np.testing.assert_allclose(logits, runner.teacher_forced(IDS), atol=1e-4)


def test_greedy_continuation_matches_the_fp32_export(model_and_export):
    model, runner = model_and_export
    tokens = transformers_greedy(model, IDS[:5], 12)
    assert len(tokens) == 12 and tokens == runner.greedy(IDS[:5], 12)
