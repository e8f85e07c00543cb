"""Continuous batching through the server: same tokens as `Generator`, cancellation, queues, load.

Real server on 127.0.0.1, official `openai` client, the toy artifact (tests/fixtures/serve.py).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial

import httpx
import openai
import pytest

from edgepipe.runtime import Generator

PROMPTS = [
    "Hello world, this is",
    "Hi",
    "A much longer prompt with quite a few more tokens in it than the others",
    "The quick brown fox",
    "1 2 3 4 5 6 7 8 9 10",
    "Dear diary, today I",
    "def fibonacci(n):",
    "Les sanglots longs des violons",
]
WAIT_S = 20.0


@pytest.fixture(scope="module")
def toy_gen(serve_toy_dir):
    return Generator(serve_toy_dir)


def wait_for(condition, timeout: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


@pytest.mark.parametrize("clients", [1, 8])
def test_greedy_tokens_through_the_server_equal_generator_greedy(
    server_factory, serve_config, toy_gen, clients
):
    # A slightly slowed step keeps every request in flight together, so the rows share steps.
    server = server_factory(replace(serve_config, parallel=clients), slow_step_s=0.01)
    client = server.client()
    prompts = PROMPTS[:clients] if clients > 1 else PROMPTS[:3]

    def complete(prompt):
        return client.completions.create(model="toy", prompt=prompt, max_tokens=24, temperature=0)

    with ThreadPoolExecutor(clients) as pool:
        replies = list(pool.map(complete, prompts))
    for prompt, reply in zip(prompts, replies, strict=True):
        expected = toy_gen.generate(prompt, max_new_tokens=24)
        assert reply.choices[0].text == expected.text, prompt
        assert reply.usage.completion_tokens == len(expected.token_ids)


def test_repeated_prompt_reuses_the_cached_prefix_with_the_same_tokens(
    server_factory, serve_config, toy_gen
):
    server = server_factory(replace(serve_config, parallel=2))
    client = server.client()
    messages = [
        {"role": "system", "content": "You are a terse assistant who answers briefly."},
        {"role": "user", "content": "Name a colour"},
    ]
    first = client.chat.completions.create(
        model="toy", messages=messages, max_tokens=8, temperature=0
    )
    messages = messages + [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "Another one"},
    ]
    second = client.chat.completions.create(
        model="toy", messages=messages, max_tokens=8, temperature=0
    )
    assert second.usage.prompt_tokens_details.cached_tokens > 0
    assert second.choices[0].message.content == toy_gen.chat(messages, max_new_tokens=8).text
    assert server.metric("edgepipe_prefix_cache_hit_rate") > 0
    assert server.metric("edgepipe_prefix_cache_bytes") > 0


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server_factory, serve_config):
    server = server_factory(replace(serve_config, parallel=1, max_queue=0), slow_step_s=0.02)
    body = {"model": "toy", "prompt": "Hello", "max_tokens": 200, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                break
    assert wait_for(lambda: server.metric("edgepipe_cancelled_requests_total") == 1)
    assert wait_for(lambda: server.metric("edgepipe_active_requests") == 0)
    # The one slot is free again: a new request runs instead of getting 503.
    reply = server.client().completions.create(model="toy", prompt="Hi", max_tokens=2)
    assert reply.usage.completion_tokens == 2
    assert server.metric("edgepipe_requests_total", endpoint="/v1/completions", status="499") == 1


def test_a_full_queue_gives_503_with_retry_after(server_factory, serve_config):
    server = server_factory(replace(serve_config, parallel=1, max_queue=1), slow_step_s=0.05)
    body = {"model": "toy", "prompt": "Hello", "max_tokens": 100, "stream": True}
    with httpx.Client(timeout=30) as http:
        busy = [http.stream("POST", f"{server.url}/v1/completions", json=body) for _ in range(2)]
        responses = [b.__enter__() for b in busy]
        try:
            assert wait_for(lambda: server.metric("edgepipe_queue_depth") == 1)
            with pytest.raises(openai.InternalServerError) as info:
                server.client().completions.create(model="toy", prompt="Hi", max_tokens=2)
            assert info.value.status_code == 503
            assert info.value.response.headers["Retry-After"]
        finally:
            for stream, response in zip(busy, responses, strict=True):
                stream.__exit__(None, None, None)
                assert response.status_code == 200
    assert wait_for(lambda: server.metric("edgepipe_active_requests") == 0)


def test_load_32_clients_lose_nothing(server_factory, serve_config):
    server = server_factory(replace(serve_config, parallel=8, max_queue=32))
    client = server.client()
    per_client, started = 3, time.monotonic()

    def run(i):
        results = []
        for j in range(per_client):
            if time.monotonic() - started > 120:  # bounded in time as well as in count
                break
            stream = j % 2 == 0
            reply = client.completions.create(
                model="toy", prompt=f"Request {i}-{j}", max_tokens=6, temperature=0, stream=stream
            )
            if stream:
                results.append(sum(1 for c in reply if c.choices and c.choices[0].text is not None))
            else:
                results.append(reply.usage.completion_tokens)
        return results

    with ThreadPoolExecutor(32) as pool:
        results = [r for rs in pool.map(run, range(32)) for r in rs]
    assert len(results) == 32 * per_client
    assert all(r >= 1 for r in results)
    # The counter moves when the handler returns, which may be just after the client has read
    # the last reply.
    served = partial(
        server.metric, "edgepipe_requests_total", endpoint="/v1/completions", status="200"
    )
    assert wait_for(lambda: served() == 32 * per_client), served()
    assert wait_for(lambda: server.metric("edgepipe_active_requests") == 0)


def test_a_request_past_the_timeout_gets_504_and_its_slot_back(server_factory, serve_config):
    config = replace(serve_config, parallel=1, request_timeout_s=0.3)
    server = server_factory(config, slow_step_s=0.05)
    with pytest.raises(openai.APIStatusError) as info:
        server.client().completions.create(model="toy", prompt="Hello", max_tokens=200)
    assert info.value.status_code == 504
    assert wait_for(lambda: server.metric("edgepipe_active_requests") == 0)
    reply = server.client().completions.create(model="toy", prompt="Hi", max_tokens=2)
    assert reply.usage.completion_tokens == 2


def test_the_runner_builds_the_vocabulary_byte_table_once(serve_config, monkeypatch):
    from edgepipe.runtime.detokenize import TokenBytes
    from edgepipe.serve.runner import Runner

    built = []
    init = TokenBytes.__init__

    def counting_init(self, *args, **kwargs):
        built.append(self)
        init(self, *args, **kwargs)

    monkeypatch.setattr(TokenBytes, "__init__", counting_init)
    runner = Runner.open(serve_config, start=False)
    assert len(built) == 1
    assert runner.batch.token_bytes is runner.gen.token_bytes is built[0]
