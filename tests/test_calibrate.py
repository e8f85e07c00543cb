"""Tests for edgepipe.arch.reference (the numpy layer forward, against transformers' decoder
layers) and edgepipe.stages.quantize.gptq_inputs (GPTQ's layer-by-layer calibration)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgepipe.arch.reference import LayerConfig, layer_forward, rms_norm
from edgepipe.errors import InvalidInput
from edgepipe.stages.quantize.gptq_inputs import LayerCalibrator


def _tiny_layer(model_type: str):
    """A seeded random transformers decoder layer with rotary, plus its HF-style weights."""
    torch.manual_seed(0)
    kwargs = dict(
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=1,
        vocab_size=32,
        rope_theta=10000.0,
        attn_implementation="eager",
    )
    if model_type == "qwen3":
        from transformers import Qwen3Config as Config
        from transformers.models.qwen3 import modeling_qwen3 as modeling

        kwargs["head_dim"] = 24  # != hidden / heads, as in Qwen3-0.6B
        layer_cls, rope_cls = modeling.Qwen3DecoderLayer, modeling.Qwen3RotaryEmbedding
    else:
        from transformers import Qwen2Config as Config
        from transformers.models.qwen2 import modeling_qwen2 as modeling

        layer_cls, rope_cls = modeling.Qwen2DecoderLayer, modeling.Qwen2RotaryEmbedding
    config = Config(**kwargs)
    layer = layer_cls(config, layer_idx=0).eval()
    with torch.no_grad():
        for p in layer.parameters():  # norms start at 1 and biases at 0: randomise them too
            p.copy_(
                torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 and p.numel() in (24, 64) else 0)
            )
    weights = {f"model.layers.0.{k}": v.detach().numpy() for k, v in layer.state_dict().items()}
    return config, layer, rope_cls(config), weights


def _hf_forward(layer, rope, hidden: np.ndarray, capture: dict) -> np.ndarray:
    hooks = []
    for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"):
        module = layer.get_submodule(name)
        hooks.append(
            module.register_forward_hook(
                lambda _m, args, _out, name=name: capture.__setitem__(name, args[0].numpy())
            )
        )
    x = torch.from_numpy(hidden)
    b, t, _ = x.shape
    pos = torch.arange(t)[None].expand(b, t)
    mask = torch.full((t, t), float("-inf")).triu(1)[None, None].expand(b, 1, t, t)
    with torch.no_grad():
        out = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=rope(x, pos))
    for hook in hooks:
        hook.remove()
    return (out[0] if isinstance(out, tuple) else out).numpy()


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_layer_forward_matches_transformers_decoder_layer(model_type):
    config, layer, rope, weights = _tiny_layer(model_type)
    cfg = LayerConfig.from_hf_config({**config.to_dict(), "model_type": model_type})
    assert cfg.qk_norm == (model_type == "qwen3")
    hidden = np.random.default_rng(1).standard_normal((2, 9, 64)).astype(np.float32)
    captured: dict = {}
    ref = _hf_forward(layer, rope, hidden, captured)
    acts = layer_forward(hidden, weights, cfg)
    np.testing.assert_allclose(acts.hidden_out, ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(acts.attn_in, captured["self_attn.q_proj"], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(acts.o_proj_in, captured["self_attn.o_proj"], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(acts.mlp_in, captured["mlp.up_proj"], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(acts.down_proj_in, captured["mlp.down_proj"], atol=1e-4, rtol=1e-4)
    q_in = acts.for_weight("model.layers.0.self_attn.k_proj.weight")
    assert q_in.shape == (18, 64)
    assert acts.for_weight("model.layers.0.mlp.down_proj.weight").shape == (18, 96)


def test_layer_forward_is_causal():
    config, _, _, weights = _tiny_layer("qwen3")
    cfg = LayerConfig.from_hf_config({**config.to_dict(), "model_type": "qwen3"})
    hidden = np.random.default_rng(2).standard_normal((6, 64)).astype(np.float32)
    full = layer_forward(hidden, weights, cfg).hidden_out
    prefix = layer_forward(hidden[:4], weights, cfg).hidden_out
    np.testing.assert_allclose(full[0, :4], prefix[0], atol=1e-5)


def test_layer_forward_reports_missing_weights_and_unknown_linears():
    config, _, _, weights = _tiny_layer("qwen3")
    cfg = LayerConfig.from_hf_config({**config.to_dict(), "model_type": "qwen3"})
    partial = {k: v for k, v in weights.items() if "k_norm" not in k}
    with pytest.raises(InvalidInput, match="k_norm"):
        layer_forward(np.zeros((3, 64), np.float32), partial, cfg)
    acts = layer_forward(np.zeros((3, 64), np.float32), weights, cfg)
    with pytest.raises(InvalidInput, match="not a decoder-layer linear"):
        acts.for_weight("lm_head.weight")


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_layer_by_layer_streaming_reproduces_transformers_hidden_states(make_tiny_model, family):
    """The builder's intended use: embed once, then one layer at a time from the checkpoint."""
    import json

    from transformers import AutoModelForCausalLM

    from edgepipe.formats.safetensors import SafetensorsModel

    folder = make_tiny_model(family)
    config = json.loads((folder / "config.json").read_text())
    model_file = SafetensorsModel(folder)
    weights = {name: model_file.read(name) for name in model_file.names()}
    cfg = LayerConfig.from_hf_config(config)
    ids = np.random.default_rng(0).integers(0, config["vocab_size"], size=(1, 12))
    cal = LayerCalibrator(config, weights["model.embed_tokens.weight"], ids[0])
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        acts = cal.advance({k: v for k, v in weights.items() if k.startswith(prefix)})
        assert acts.for_weight(prefix + "mlp.down_proj.weight").shape == (12, 256)
    hidden = cal.hidden

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(torch.from_numpy(ids), output_hidden_states=True)
    # hidden_states[-1] has the final norm applied; the one before it is the last layer's input.
    last_in = out.hidden_states[-2].numpy()
    prev = weights["model.embed_tokens.weight"][ids].astype(np.float32)
    for i in range(config["num_hidden_layers"] - 1):
        layer = {k: v for k, v in weights.items() if k.startswith(f"model.layers.{i}.")}
        prev = layer_forward(prev, layer, cfg).hidden_out
    np.testing.assert_allclose(prev, last_in, atol=1e-4, rtol=1e-4)
    final = rms_norm(hidden, weights["model.norm.weight"], cfg.rms_norm_eps)
    np.testing.assert_allclose(final, out.hidden_states[-1].numpy(), atol=1e-4, rtol=1e-4)


def test_calibrator_cuts_tokens_into_sequences_and_rejects_empty_text():
    config = {
        "hidden_size": 8,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "model_type": "qwen2",
    }
    table = np.arange(40, dtype=np.float32).reshape(5, 8)
    cal = LayerCalibrator(config, table, np.arange(10) % 5, max_tokens_per_sequence=4)
    assert cal.hidden.shape == (2, 4, 8) and cal.tokens == 8
    assert LayerCalibrator(config, table, [1, 2, 3]).hidden.shape == (1, 3, 8)
    with pytest.raises(InvalidInput, match="calibration text"):
        LayerCalibrator(config, table, [1])
