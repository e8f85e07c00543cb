"""onnxruntime-genai's `genai_config.json`, as edgepipe writes it beside every graph.

Every artifact carries one so that it also loads in onnxruntime-genai based apps (tested, not
assumed): the dynamic decoder in genai's plain `decoder` schema, the static prefill + decode
graphs in its `decoder-pipeline` schema (genai parses it; edgepipe.runtime drives them).
`edgepipe.stages.package` later adds the recipe's sampling defaults and the profile's provider
options.
"""

from __future__ import annotations

from typing import Any

from edgepipe.arch.spec import DecoderConfig
from edgepipe.arch.tokens import CHAT_EOS_IDS, ENDOFTEXT_ID

FILE = "genai_config.json"
# Qwen's end tokens: <|im_end|> ends a chat turn, <|endoftext|> ends a document.
QWEN_EOS = list(CHAT_EOS_IDS)
QWEN_BOS = ENDOFTEXT_ID
QWEN_PAD = ENDOFTEXT_ID


def genai_config(
    cfg: DecoderConfig, *, context_length: int, model_file: str = "model.onnx"
) -> dict[str, Any]:
    """The genai_config.json onnxruntime-genai 0.18 reads for this decoder."""
    extra = [t for t in cfg.eos_token_id if t not in QWEN_EOS]
    eos = [*QWEN_EOS, *extra]
    bos = cfg.bos_token_id if cfg.bos_token_id is not None else QWEN_BOS
    pad = QWEN_PAD
    vocab = cfg.vocab_size
    if max(eos + [bos, pad]) >= vocab:
        # genai refuses special ids outside the vocabulary; only test models with a reduced
        # vocabulary get here: keep the ids that exist, else stop on the last id.
        eos = [t for t in eos if t < vocab] or [vocab - 1]
        bos, pad = (t if t < vocab else 0 for t in (bos, pad))
    return {
        "model": {
            "type": cfg.family.name,
            "bos_token_id": bos,
            "context_length": context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": model_file,
                "head_size": cfg.head_dim,
                "hidden_size": cfg.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": cfg.num_attention_heads,
                "num_hidden_layers": cfg.num_hidden_layers,
                "num_key_value_heads": cfg.num_key_value_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "vocab_size": cfg.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context_length,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": True,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def static_genai_config(
    cfg: DecoderConfig,
    *,
    chunk: int,
    kv_capacity: int,
    files: tuple[str, str],
) -> dict[str, Any]:
    """genai_config.json for the two-graph pipeline, in onnxruntime-genai's `decoder-pipeline`
    schema (it parses with `onnxruntime_genai.Config`; edgepipe.runtime drives the graphs)."""
    base = genai_config(cfg, context_length=kv_capacity)
    decoder = base["model"]["decoder"]
    del decoder["filename"]
    decoder["inputs"]["position_ids"] = "position_ids"
    io_names = [
        "input_ids",
        "position_ids",
        "attention_mask",
        *[
            f"past_key_values.{i}.{k}"
            for i in range(cfg.num_hidden_layers)
            for k in ("key", "value")
        ],
    ]
    out_names = [
        "logits",
        *[f"present.{i}.{k}" for i in range(cfg.num_hidden_layers) for k in ("key", "value")],
    ]
    decoder["sliding_window"] = {
        "window_size": chunk,
        "pad_value": base["model"]["pad_token_id"],
        "alignment": "left",
        "slide_key_value_cache": False,
        "slide_inputs": True,
    }
    decoder["pipeline"] = [
        {
            "prefill": {
                "filename": files[0],
                "inputs": io_names,
                "outputs": out_names,
                "run_on_prompt": True,
                "run_on_token_gen": False,
            }
        },
        {
            "decode": {
                "filename": files[1],
                "inputs": io_names,
                "outputs": out_names,
                "run_on_prompt": False,
                "run_on_token_gen": True,
            }
        },
    ]
    base["model"]["type"] = "decoder-pipeline"
    base["search"]["past_present_share_buffer"] = False
    return base
