"""Compare constrained-decoding libraries on the real 151,936-token Qwen vocabulary.

For llguidance, xgrammar and outlines-core (whichever are installed) this measures:

* tokenizer setup: wrapping the Qwen tokenizer (done once per Generator);
* compile: turning a nested JSON schema (objects, arrays, enums, numbers, required fields)
  into the library's matcher (done once per request, or cached by schema);
* mask: computing the allowed-token bitmask for one step, over a fixed valid token sequence
  (the tokens of a JSON document the schema accepts), median and p90 per token, plus advancing
  the matcher by that token.

Run: `PYTHONPATH=$PWD .venv/bin/python benchmarks/constrained_engines.py [--json out.json]`.
The module docstring of `edgepipe/runtime/constrain.py` quotes the numbers and the choice.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

VOCAB = 151936
EOS = 151645  # <|im_end|>

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "role": {"enum": ["admin", "user", "guest"]},
        "scores": {"type": "array", "items": {"type": "number"}, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}},
    },
    "required": ["name", "age", "role", "address"],
    "additionalProperties": False,
}
DOCUMENT = {
    "name": "Ada Lovelace",
    "age": 36,
    "role": "admin",
    "scores": [1.5, -2, 3e2],
    "address": {"city": "London", "zip": "12345"},
    "tags": ["a", "c"],
}


def _time(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _summary(times: list[float]) -> dict:
    ordered = sorted(times)
    return {
        "median_us": round(statistics.median(ordered) * 1e6, 1),
        "p90_us": round(ordered[int(0.9 * (len(ordered) - 1))] * 1e6, 1),
        "max_us": round(ordered[-1] * 1e6, 1),
    }


def bench_llguidance(tokenizer, tokens: list[int]) -> dict:
    import llguidance

    lltok, setup = _time(
        lambda: llguidance.LLTokenizer(tokenizer.to_str(), n_vocab=VOCAB, eos_token=EOS)
    )
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
    matcher, compile_s = _time(lambda: llguidance.LLMatcher(lltok, grammar, log_level=0))
    assert not matcher.is_error(), matcher.get_error()
    mask = np.zeros((VOCAB + 31) // 32, dtype=np.int32)
    mask_t, advance_t = [], []
    for token in tokens:
        _, t = _time(lambda: matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes))
        mask_t.append(t)
        assert (mask[token // 32] >> (token % 32)) & 1, f"token {token} masked out"
        ok, t = _time(lambda token=token: matcher.consume_token(token))
        assert ok, matcher.get_error()
        advance_t.append(t)
    assert matcher.is_accepting()
    return {
        "setup_s": setup,
        "compile_s": compile_s,
        "mask": _summary(mask_t),
        "advance": _summary(advance_t),
    }


def bench_xgrammar(tokenizer, tokens: list[int]) -> dict:
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>")

    def setup():
        info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=VOCAB, stop_token_ids=[EOS])
        return xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)

    compiler, setup_s = _time(setup)
    compiled, compile_s = _time(lambda: compiler.compile_json_schema(json.dumps(SCHEMA)))
    matcher = xgr.GrammarMatcher(compiled)
    mask = xgr.allocate_token_bitmask(1, VOCAB)
    mask_t, advance_t = [], []
    for token in tokens:
        _, t = _time(lambda: matcher.fill_next_token_bitmask(mask))
        mask_t.append(t)
        ok, t = _time(lambda token=token: matcher.accept_token(token))
        assert ok, f"xgrammar rejected token {token}"
        advance_t.append(t)
    return {
        "setup_s": setup_s,
        "compile_s": compile_s,
        "mask": _summary(mask_t),
        "advance": _summary(advance_t),
    }


def bench_outlines_core(tokenizer, tokens: list[int]) -> dict:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    from edgepipe.runtime.detokenize import TokenBytes

    token_bytes = TokenBytes(tokenizer)
    special = set(tokenizer.get_added_tokens_decoder())

    def setup():
        table: dict[bytes, list[int]] = {}
        for idx in range(tokenizer.get_vocab_size(with_added_tokens=True)):
            if idx in special:
                continue
            table.setdefault(token_bytes(idx), []).append(idx)
        return Vocabulary(EOS, table)

    vocabulary, setup_s = _time(setup)
    regex = build_regex_from_schema(json.dumps(SCHEMA))
    index, compile_s = _time(lambda: Index(regex, vocabulary))
    guide = Guide(index)
    mask = np.zeros((VOCAB + 31) // 32, dtype=np.int32)
    mask_t, advance_t = [], []
    for token in tokens:
        _, t = _time(lambda: guide.write_mask_into(mask.ctypes.data, mask.size, 4))
        mask_t.append(t)
        _, t = _time(lambda token=token: guide.advance(token, return_tokens=False))
        advance_t.append(t)
    return {
        "setup_s": setup_s,
        "compile_s": compile_s,
        "mask": _summary(mask_t),
        "advance": _summary(advance_t),
        "regex_chars": len(regex),
    }


def bench_apply(reps: int = 200) -> dict:
    """The numpy step the runtime does with a bitmask: unpack it and set masked logits to -inf."""
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(VOCAB).astype(np.float32)
    mask = rng.integers(-(2**31), 2**31 - 1, size=(VOCAB + 31) // 32, dtype=np.int32)
    times = []
    for _ in range(reps):
        row = logits.copy()
        start = time.perf_counter()
        allowed = np.unpackbits(mask.view(np.uint8), bitorder="little")[:VOCAB]
        np.putmask(row, allowed == 0, -np.inf)
        times.append(time.perf_counter() - start)
    return _summary(times)


ENGINES = {
    "llguidance": bench_llguidance,
    "xgrammar": bench_xgrammar,
    "outlines-core": bench_outlines_core,
}


def main() -> None:
    from edgepipe.arch.tokenizer import build_qwen_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    tokenizer = build_qwen_tokenizer("qwen2")
    # Compact separators: the form llguidance/xgrammar allow by default (no free whitespace).
    text = json.dumps(DOCUMENT, separators=(",", ":"))
    tokens = tokenizer.encode(text, add_special_tokens=False).ids
    results: dict = {"tokens": len(tokens), "vocab": VOCAB, "apply_numpy": bench_apply()}
    for name, bench in ENGINES.items():
        try:
            results[name] = bench(tokenizer, tokens)
        except ImportError as exc:
            results[name] = {"skipped": str(exc)}
        except Exception as exc:  # report one engine's failure, keep measuring the others
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        print(name, json.dumps(results[name]), flush=True)
    print("apply (numpy unpackbits + putmask)", json.dumps(results["apply_numpy"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
