"""What the tied head's precision costs in quality, alone, and whether a split by rows helps.

The head (the tied token table as lm_head) is a quarter of a decode step's bytes on the
Qwen2.5-0.5B / Qwen3-0.6B shapes at 8 bits. This measures, on the trained tiny model, the KL
(vs the float model, teacher-forced on the recipe's held-out evaluation text) of quantizing the
head ONLY (the body and the embedding stay float, so nothing else contributes): 8-bit, 4-bit,
and 8-bit rows for ids below N with 4-bit rows above (Qwen's ids follow BPE merge order, so
low ids are the frequent tokens). Symmetric round-to-nearest in blocks of 128 along hidden,
the value of largest magnitude mapped to -2^(bits-1): what `rtn` with `symmetric: true` makes.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/head_split.py   # -> results/head_split.json

Needs the expanded trained model (`edgepipe.arch.bundled.expand_bundled`); it is written into
the benchmark cache when missing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
from common import CACHE, REPO, RESULTS, machine_facts  # noqa: E402

TOKENS = 2048
SPLITS = (16384, 32768, 65536)


def quantized(table: np.ndarray, bits: int, block: int = 128) -> np.ndarray:
    """`table` [rows, hidden] after symmetric round-to-nearest in blocks along hidden."""
    rows, hidden = table.shape
    blocks = table.reshape(rows, hidden // block, block)
    peak = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    scale = np.where(peak == 0, 1.0, peak / low)
    return (np.clip(np.round(blocks / scale), low, high) * scale).reshape(rows, hidden)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def main() -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from edgepipe.arch.bundled import expand_bundled
    from edgepipe.arch.tokenizer import build_qwen_tokenizer
    from edgepipe.schema import load_recipe

    model_dir = CACHE / "models" / "tiny-trained"
    if not (model_dir / "config.json").is_file():
        expand_bundled("tiny-trained", model_dir)
    evaluation = load_recipe(REPO / "recipes" / "tiny-trained.yaml").evaluation
    ids = build_qwen_tokenizer("qwen2").encode(evaluation.read(), add_special_tokens=False).ids
    ids = ids[:TOKENS]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
    hidden = out.hidden_states[-1][0].numpy()  # after the final norm: what the head reads
    table = model.lm_head.weight.detach().numpy()
    reference = log_softmax(hidden @ table.T)
    probs = np.exp(reference)

    def score(head: np.ndarray) -> dict:
        logp = log_softmax(hidden @ head.T)
        kl = float((probs * (reference - logp)).sum(-1).mean())
        top1 = float((logp.argmax(-1) == reference.argmax(-1)).mean())
        return {"kl": round(kl, 6), "top1_agreement": round(top1, 4)}

    eight, four = quantized(table, 8), quantized(table, 4)
    rows = {"head 8-bit": score(eight), "head 4-bit": score(four)}
    for split in SPLITS:
        mixed = four.copy()
        mixed[:split] = eight[:split]
        rows[f"head 8-bit below id {split}, 4-bit above"] = score(mixed)
    for name, row in rows.items():
        print(f"{name}: KL {row['kl']:.5f}, top-1 {row['top1_agreement']:.3f}")
    doc = {"machine": machine_facts(), "tokens": len(ids), "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "head_split.json").write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
