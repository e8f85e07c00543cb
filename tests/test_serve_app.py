"""The server's OpenAI semantics, driven by the official `openai` client against a real server.

Every test runs uvicorn on 127.0.0.1 with the toy artifact (tests/fixtures/serve.py).
"""

from __future__ import annotations

import time
from dataclasses import replace

import httpx
import openai
import pytest

from edgepipe.runtime import Generator

MESSAGES = [{"role": "user", "content": "Write a short poem about the sea"}]


@pytest.fixture(scope="module")
def toy_gen(serve_toy_dir):
    return Generator(serve_toy_dir)


@pytest.fixture
def server(server_factory, serve_config):
    return server_factory(serve_config)


def test_chat_returns_the_generator_greedy_answer_with_usage(server, toy_gen):
    reply = server.client().chat.completions.create(
        model="toy", messages=MESSAGES, max_tokens=12, temperature=0
    )
    expected = toy_gen.chat(MESSAGES, max_new_tokens=12)
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 12
    assert reply.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12


def test_completion_matches_generate_and_defaults_to_16_tokens(server, toy_gen):
    client = server.client()
    reply = client.completions.create(model="toy", prompt="Once upon a time", temperature=0)
    expected = toy_gen.generate("Once upon a time", max_new_tokens=16)
    assert reply.object == "text_completion"
    assert reply.choices[0].text == expected.text
    assert reply.usage.completion_tokens == len(expected.token_ids) == 16
    ids = toy_gen.encode("Once upon a time")
    by_ids = client.completions.create(model="toy", prompt=ids, max_tokens=16, temperature=0)
    assert by_ids.choices[0].text == expected.text


def test_stream_has_one_id_role_first_finish_reason_last_and_no_usage(server, toy_gen):
    stream = server.client().chat.completions.create(
        model="toy", messages=MESSAGES, max_tokens=10, temperature=0, stream=True
    )
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices for c in chunks)
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert all(c.usage is None for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == toy_gen.chat(MESSAGES, max_new_tokens=10).text


def test_stream_with_include_usage_ends_with_a_usage_chunk_then_done(server):
    with httpx.stream(
        "POST",
        f"{server.url}/v1/chat/completions",
        json={
            "model": "toy",
            "messages": MESSAGES,
            "max_tokens": 5,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        timeout=30,
    ) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    import json

    events = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 5
    assert all("usage" in e and e["usage"] is None for e in events[:-1])


def test_completion_stream_joins_to_the_non_streamed_text(server):
    client = server.client()
    whole = client.completions.create(model="toy", prompt="Hello", max_tokens=8, temperature=0)
    pieces = client.completions.create(
        model="toy", prompt="Hello", max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in pieces) == whole.choices[0].text


def test_stop_string_cuts_the_text_and_finishes_with_stop(server, toy_gen):
    full = toy_gen.generate("Once upon a time", max_new_tokens=24).text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), full
    reply = server.client().completions.create(
        model="toy", prompt="Once upon a time", max_tokens=24, temperature=0, stop=[stop]
    )
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].text == full[: full.index(stop)]


def test_the_same_seed_gives_the_same_sample(server):
    client = server.client()

    def sample(seed):
        reply = client.chat.completions.create(
            model="toy",
            messages=MESSAGES,
            max_tokens=16,
            temperature=1.0,
            top_p=0.95,
            seed=seed,
            extra_body={"top_k": 50, "min_p": 0.01, "repetition_penalty": 1.1},
        )
        return reply.choices[0].message.content

    assert sample(7) == sample(7)
    assert len({sample(s) for s in (1, 2, 3)}) > 1


def test_models_lists_the_served_model(server):
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["toy"]
    assert client.models.retrieve("toy").id == "toy"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_thinking_budget_separates_reasoning_content(
    server_factory, serve_config, thinking_toy_dir
):
    server = server_factory(replace(serve_config, artifact=thinking_toy_dir))
    client = server.client()
    body = {"thinking_budget": 5}
    reply = client.chat.completions.create(
        model="toy", messages=MESSAGES, max_tokens=20, temperature=0, extra_body=body
    )
    message = reply.choices[0].message
    reasoning = message.model_extra["reasoning_content"]
    assert reasoning and "</think>" not in reasoning and "</think>" not in message.content
    stream = client.chat.completions.create(
        model="toy",
        messages=MESSAGES,
        max_tokens=20,
        temperature=0,
        extra_body=body,
        stream=True,
    )
    chunks = list(stream)
    streamed_reasoning = "".join(
        (c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks
    )
    streamed_content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed_reasoning.strip() == reasoning.strip()
    assert streamed_content.strip() == message.content.strip()


def test_thinking_off_returns_no_reasoning_content(server_factory, serve_config, thinking_toy_dir):
    server = server_factory(replace(serve_config, artifact=thinking_toy_dir))
    reply = server.client().chat.completions.create(
        model="toy",
        messages=MESSAGES,
        max_tokens=8,
        temperature=0,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    message = reply.choices[0].message
    assert (message.model_extra or {}).get("reasoning_content") is None
    assert message.content


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"n": 2}, "n"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
        ({"function_call": {"name": "f"}}, "function_call"),
        ({"tools": [{"type": "custom", "custom": {"name": "f"}}]}, "tools.0"),
        ({"tools": [{"type": "function", "function": {}}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {}}},
            "response_format.json_schema.name",
        ),
        ({"logprobs": True}, "logprobs"),
        ({"temperature": 5}, "temperature"),
        ({"max_tokens": 5000}, "max_tokens"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_unsupported_or_invalid_fields_get_400_naming_the_field(server, extra, param):
    with pytest.raises(openai.BadRequestError) as info:
        server.client().chat.completions.create(
            model="toy", messages=MESSAGES, **{"max_tokens": 4, **extra}
        )
    assert info.value.status_code == 400
    assert info.value.body["param"] == param


def test_unknown_model_is_404(server):
    with pytest.raises(openai.NotFoundError) as info:
        server.client().chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert info.value.body["code"] == "model_not_found"


def test_a_prompt_longer_than_the_limit_is_400(server_factory, serve_config):
    server = server_factory(replace(serve_config, max_prompt_tokens=8))
    with pytest.raises(openai.BadRequestError) as info:
        server.client().completions.create(model="toy", prompt="word " * 20, max_tokens=2)
    assert info.value.body["code"] == "context_length_exceeded"


def test_a_body_over_the_limit_is_413(server_factory, serve_config):
    server = server_factory(replace(serve_config, max_body_bytes=2000))
    long = [{"role": "user", "content": "x" * 5000}]
    with pytest.raises(openai.APIStatusError) as info:
        server.client().chat.completions.create(model="toy", messages=long, max_tokens=2)
    assert info.value.status_code == 413


def test_api_keys_give_401_without_the_key_and_health_stays_open(server_factory, serve_config):
    server = server_factory(replace(serve_config, api_keys={"alice": "sk-alice-123"}))
    with pytest.raises(openai.AuthenticationError):
        server.client("sk-wrong").chat.completions.create(model="toy", messages=MESSAGES)
    with pytest.raises(openai.AuthenticationError):
        server.client("sk-wrong").models.list()
    reply = server.client("sk-alice-123").chat.completions.create(
        model="toy", messages=MESSAGES, max_tokens=2
    )
    assert reply.usage.completion_tokens == 2
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/metrics").status_code == 401


def test_health_and_requests_are_503_when_the_model_is_not_loaded(
    server_factory, serve_config, tmp_path
):
    server = server_factory(replace(serve_config, artifact=tmp_path / "missing"), load=False)
    assert httpx.get(f"{server.url}/health").status_code == 503
    with pytest.raises(openai.InternalServerError) as info:
        server.client().chat.completions.create(model="toy", messages=MESSAGES)
    assert info.value.status_code == 503


def test_request_and_token_limits_give_429_then_recover(server_factory, serve_config):
    # 2 requests per 4 s: one comes back every 2 s, far slower than three tiny requests.
    config = replace(serve_config, requests_per_minute=2, rate_window_s=4.0)
    server = server_factory(config)
    client = server.client()
    for _ in range(2):
        client.completions.create(model="toy", prompt="Hi", max_tokens=1)
    with pytest.raises(openai.RateLimitError) as info:
        client.completions.create(model="toy", prompt="Hi", max_tokens=1)
    retry_after = int(info.value.response.headers["Retry-After"])
    assert 1 <= retry_after <= 2
    time.sleep(retry_after)
    client.completions.create(model="toy", prompt="Hi", max_tokens=1)

    # 12 tokens per 2 s: one request's 30 generated tokens put the bucket well below zero.
    config = replace(serve_config, tokens_per_minute=12, rate_window_s=2.0)
    client = server_factory(config).client()
    client.completions.create(model="toy", prompt="one two three", max_tokens=30)
    with pytest.raises(openai.RateLimitError) as info:
        client.completions.create(model="toy", prompt="one two three", max_tokens=1)
    time.sleep(int(info.value.response.headers["Retry-After"]))
    client.completions.create(model="toy", prompt="one two three", max_tokens=1)


def test_max_completion_tokens_bounds_the_answer(server):
    reply = server.client().chat.completions.create(
        model="toy", messages=MESSAGES, max_completion_tokens=3, temperature=0
    )
    assert reply.usage.completion_tokens == 3 and reply.choices[0].finish_reason == "length"
