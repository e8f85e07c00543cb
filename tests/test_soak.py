"""Soak: 10,000 generated tokens over many requests, streams and batches, with RSS sampled.

A leak of one KV buffer, IOBinding or detokenizer per request grows the resident set by
megabytes over a few hundred requests; the bound leaves room for allocator noise only.
"""

from __future__ import annotations

import os

import pytest

from edgepipe.runtime import ChatSession, Generator
from tests.fixtures.toy import build_toy_artifact

pytestmark = pytest.mark.slow

TOKENS = 10_000
GROWTH_LIMIT = 24 * 2**20  # bytes of resident-set growth allowed after warm-up


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads /proc (Linux)")
def test_ten_thousand_tokens_do_not_grow_memory(tmp_path, qwen3_tokenizer_dir):
    gen = Generator(build_toy_artifact(tmp_path / "toy", qwen3_tokenizer_dir), verify=False)
    # Greedy and top-k keep each token cheap (a full-vocabulary sort costs ~80 ms a token).
    greedy = {"max_new_tokens": 100, "stop_token_ids": [], "do_sample": False}
    top_k = {**greedy, "max_new_tokens": 60, "do_sample": True, "top_k": 20, "seed": 0}
    generated, samples, request = 0, [], 0
    while generated < TOKENS:
        kind = request % 4
        prompt = f"request {request}: tell me something"
        if kind == 0:
            rows = gen.generate([prompt + " more" * i for i in range(8)], **greedy)
            generated += sum(len(r.token_ids) for r in rows)
        elif kind == 1:
            stream = gen.stream(prompt, **top_k)
            for _ in stream:
                pass
            generated += len(stream.result.token_ids)
        elif kind == 2:
            session = ChatSession(gen, system="S", **{**greedy, "max_new_tokens": 40})
            for turn in range(2):
                generated += len(session.send(f"turn {turn}").token_ids)
        else:
            generated += len(gen.generate(prompt, **greedy).token_ids)
        request += 1
        samples.append(rss_bytes())
    baseline = max(samples[4:8])  # after a warm-up cycle: arenas and caches sized
    growth = max(samples[8:]) - baseline
    assert growth <= GROWTH_LIMIT, f"RSS grew {growth / 2**20:.1f} MiB over {request} requests"
