"""The transformers reference: what the source model computes, to compare an export with.

torch and transformers are optional (`edgepipe[build]` installs neither): each function returns
None without them and the caller falls back to the unquantized export.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _load(model_dir: Path):
    try:
        import torch
        import transformers
    except ImportError:
        return None, None
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32
    ).eval()
    return torch, model


def transformers_logits(model_dir: str | Path, ids: list[int]) -> np.ndarray | None:
    """Teacher-forced fp32 logits of the source model in transformers.

    Args:
        model_dir: a transformers model folder (`config.json` + safetensors).
        ids: the token ids.

    Returns:
        `[len(ids), vocab]` float32 (row t is the distribution after `ids[: t + 1]`), or None
        when torch or transformers is not importable.
    """
    torch, model = _load(Path(model_dir))
    if model is None:
        return None
    with torch.no_grad():
        out = model(torch.tensor([[int(i) for i in ids]], dtype=torch.long)).logits[0]
    return out.float().numpy()


def transformers_greedy(model_dir: str | Path, ids: list[int], steps: int) -> list[int] | None:
    """Greedy fp32 continuation of `ids` by the source model in transformers.

    Args:
        model_dir: a transformers model folder.
        ids: the prompt's token ids.
        steps: tokens to generate; end-of-sequence does not stop it, so the continuation
            always has `steps` ids (as the runtime with `stop_token_ids=[]`).

    Returns:
        The generated ids, or None when torch or transformers is not importable.
    """
    torch, model = _load(Path(model_dir))
    if model is None:
        return None
    model.generation_config.eos_token_id = None  # a fixed length, whatever it generates
    prompt = torch.tensor([[int(i) for i in ids]], dtype=torch.long)
    with torch.no_grad():
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=steps,
            do_sample=False,
        )
    return [int(t) for t in out[0, len(ids) :]]
