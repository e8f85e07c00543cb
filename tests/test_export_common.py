"""What both exporters share (edgepipe.stages.export.common): rotary tables, side files, steps."""

from __future__ import annotations

import numpy as np

from edgepipe.stages.export.common import TOKENIZER_FILES, Steps, copy_side_files, rotary_caches


def test_rotary_caches_match_transformers():
    import torch
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    config = Qwen3Config(head_dim=48, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    rope = Qwen3RotaryEmbedding(config)
    positions = torch.arange(300)[None]
    cos_ref, sin_ref = rope(torch.zeros(1, 300, 48), positions)
    cos, sin = rotary_caches(48, 1e6, 300, np.float32)
    # Same angles; torch's float32 cos/sin differ by a few ulps at angles ~300 rad.
    np.testing.assert_allclose(cos, cos_ref[0, :, :24].numpy(), atol=1e-5)
    np.testing.assert_allclose(sin, sin_ref[0, :, :24].numpy(), atol=1e-5)
    np.testing.assert_allclose(cos[:, -1], 1.0, atol=1e-3)  # the slowest frequency barely turns


def test_rotary_caches_are_cast_after_the_float32_angles():
    cos16, sin16 = rotary_caches(64, 1e4, 50, np.float16)
    cos32, sin32 = rotary_caches(64, 1e4, 50, np.float32)
    assert cos16.dtype == np.float16 and cos16.shape == (50, 32)
    np.testing.assert_array_equal(cos16, cos32.astype(np.float16))
    np.testing.assert_array_equal(sin16, sin32.astype(np.float16))


def test_side_files_copy_only_what_exists(tmp_path):
    src, out = tmp_path / "model", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    (src / TOKENIZER_FILES[0]).write_text("{}")
    (src / "generation_config.json").write_text("{}")
    (src / "model.safetensors").write_bytes(b"weights stay behind")
    copied = copy_side_files(src, out)
    assert sorted(p.name for p in copied) == sorted([TOKENIZER_FILES[0], "generation_config.json"])
    assert not (out / "model.safetensors").exists()
    assert copy_side_files(out, out) == []  # exporting into the model folder copies nothing


def test_steps_count_embedding_layers_and_lm_head():
    seen = []
    steps = Steps(lambda *a: seen.append(a), num_layers=2)
    for what in ("embedding", "layer 0", "layer 1", "lm_head"):
        steps.tick(what)
    assert seen == [("embedding", 1, 4), ("layer 0", 2, 4), ("layer 1", 3, 4), ("lm_head", 4, 4)]
    Steps(None, 1).tick("embedding")  # no callback: counting only
