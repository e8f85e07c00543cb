"""The bundled trained tiny model: compact size, exact expansion, transformers load, output."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from edgepipe.arch.bundled import (
    BUNDLED,
    IDS_TENSOR,
    bundled_folder,
    expand_bundled,
    expand_embedding,
)
from edgepipe.errors import InvalidInput
from edgepipe.formats.safetensors import SINGLE_FILE, read_header, read_tensor

VOCAB = 151936
# Not standard-library text (written for this test), so it is held out by construction.
SNIPPET = '''import os


class Cache:
    """Keep the last results of a function."""

    def __init__(self, size=128):
        self.size = size
        self.items = {}

    def get(self, key, default=None):
        if key in self.items:
            return self.items[key]
        return default
'''


@pytest.fixture(scope="module")
def expanded(tmp_path_factory):
    return expand_bundled("tiny-trained", tmp_path_factory.mktemp("tiny-trained"))


@pytest.fixture(scope="module")
def full_model(expanded):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(expanded, dtype=torch.float64).eval()


@pytest.fixture(scope="module")
def tokenizer(expanded):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(expanded / "tokenizer.json"))


def _compact():
    """(ids, {name: float32 tensor}) of the compact file."""
    infos = read_header(bundled_folder("tiny-trained") / SINGLE_FILE)
    ids = read_tensor(infos.pop(IDS_TENSOR)).astype(np.int64)
    return ids, {name: torch.from_numpy(read_tensor(info)) for name, info in infos.items()}


def test_compact_folder_is_at_most_25_mb():
    total = sum(f.stat().st_size for f in BUNDLED["tiny-trained"].rglob("*") if f.is_file())
    assert total <= 25_000_000


def test_compact_ids_are_distinct_and_include_the_special_tokens():
    ids, weights = _compact()
    assert len(np.unique(ids)) == len(ids)
    assert {151643, 151644, 151645} <= set(ids.tolist())
    assert weights["model.embed_tokens.weight"].shape[0] == len(ids) + 1


def test_expanded_folder_loads_in_transformers_with_the_full_vocabulary(expanded, full_model):
    config = json.loads((expanded / "config.json").read_text())
    assert config["vocab_size"] == VOCAB and config["tie_word_embeddings"] is True
    assert full_model.get_input_embeddings().weight.shape[0] == VOCAB
    assert full_model.lm_head.weight.data_ptr() == full_model.model.embed_tokens.weight.data_ptr()


def test_expanded_log_probs_equal_the_reduced_models(full_model, tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    ids, weights = _compact()
    rows = len(ids) + 1
    config = {**full_model.config.to_dict(), "vocab_size": rows}
    config.update(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    reduced = Qwen2ForCausalLM(Qwen2Config(**config)).double().eval()
    reduced.load_state_dict(weights, strict=False)  # lm_head is tied to the embedding
    x = torch.tensor([tokenizer.encode(SNIPPET).ids])
    lookup = torch.full((VOCAB,), rows - 1)  # real id -> reduced row; unused -> shared row
    lookup[torch.from_numpy(ids)] = torch.arange(len(ids))
    with torch.no_grad():
        hidden = reduced.model(input_ids=lookup[x]).last_hidden_state
        bias = torch.zeros(rows)
        bias[-1] = math.log(VOCAB - len(ids))
        table = reduced.get_input_embeddings().weight
        small = torch.log_softmax(hidden @ table.T + bias.double(), -1)
        full = torch.log_softmax(full_model(input_ids=x).logits, -1)
    unused = np.setdiff1d(np.arange(VOCAB), ids)[[0, 1000, -1]]
    torch.testing.assert_close(full[..., ids], small[..., :-1], atol=1e-6, rtol=0)
    for real_id in unused:
        torch.testing.assert_close(full[..., real_id], small[..., -1] - bias[-1], atol=1e-6, rtol=0)


def test_held_out_snippet_is_predicted_far_better_than_uniform(full_model, tokenizer):
    x = torch.tensor([tokenizer.encode(SNIPPET).ids])
    with torch.no_grad():
        logits = full_model(input_ids=x).logits[0, :-1]
    nll = torch.nn.functional.cross_entropy(logits, x[0, 1:]).item()
    assert nll < 0.5 * math.log(VOCAB)  # uniform: 11.9 nats per token


def _greedy(model, tokenizer, prompt: str, new_tokens: int) -> str:
    ids = tokenizer.encode(prompt).ids
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(input_ids=torch.tensor([ids]), logits_to_keep=1).logits
            ids.append(int(logits[0, -1].argmax()))
    return tokenizer.decode(ids[len(tokenizer.encode(prompt).ids) :])


def test_greedy_completion_of_a_method_header_closes_it_like_python(full_model, tokenizer):
    completion = _greedy(full_model, tokenizer, "class Parser:\n    def __init__(self", 12)
    assert "):" in completion and "\n" in completion


def test_expand_bundled_rejects_an_unknown_name(tmp_path):
    with pytest.raises(InvalidInput, match="tiny-trained"):
        expand_bundled("no-such-model", tmp_path)


def test_expand_embedding_puts_used_rows_at_their_ids_and_shares_the_rest():
    reduced = np.arange(12, dtype=np.float32).reshape(4, 3)
    full = expand_embedding(reduced, np.array([5, 0, 2]), 7)
    np.testing.assert_array_equal(full[[5, 0, 2]], reduced[:3])
    np.testing.assert_array_equal(full[[1, 3, 4, 6]], np.tile(reduced[3], (4, 1)))
