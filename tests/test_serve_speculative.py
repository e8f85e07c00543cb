"""Speculative decoding through the server: the request field, `--speculative`, its refusals.

Real server on 127.0.0.1, official `openai` client, the bundled trained model as shipped
(`trained_shipped_dir`): it copies code from its context, so prompt-lookup drafts get accepted
and the tests cannot pass without speculating.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import openai
import pytest

from edgepipe.runtime import Generator

CODE = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n"
GROUNDED = (
    "Rewrite the file with add renamed to plus.\n\n" + CODE + "\n\nRewritten file:\n" + CODE[:20]
)
FREE = "Hello world, this is"
SPECULATE = {"speculative": "ngram"}
ACCEPTED = "edgepipe_speculative_accepted_tokens_total"


@pytest.fixture(scope="module")
def trained(trained_shipped_dir):
    return Generator(trained_shipped_dir)


@pytest.fixture
def trained_config(trained_shipped_dir):
    from edgepipe.serve.config import ServeConfig

    return ServeConfig(artifact=trained_shipped_dir, model_name="trained", parallel=2)


def complete(client, prompt, max_tokens, stream=False, **kwargs):
    """(text, finish reason, completion tokens) of a greedy completion, whole or streamed."""
    if not stream:
        reply = client.completions.create(
            model="trained", prompt=prompt, max_tokens=max_tokens, temperature=0, **kwargs
        )
        choice = reply.choices[0]
        return choice.text, choice.finish_reason, reply.usage.completion_tokens
    chunks = client.completions.create(
        model="trained",
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        **kwargs,
    )
    texts, reason, usage = [], None, None
    for chunk in chunks:
        if chunk.choices:
            texts.append(chunk.choices[0].text)
            reason = chunk.choices[0].finish_reason or reason
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
    return "".join(texts), reason, usage


def expected(gen, prompt, max_tokens, **kwargs):
    result = gen.generate(prompt, max_new_tokens=max_tokens, do_sample=False, **kwargs)
    return result.text, result.finish_reason, len(result.token_ids)


@pytest.mark.parametrize("stream", [False, True])
def test_a_speculative_request_gives_the_plain_greedy_completion(
    server_factory, trained_config, trained, stream
):
    server = server_factory(trained_config)
    client = server.client()
    for prompt in (GROUNDED, FREE):
        got = complete(client, prompt, 64, stream, extra_body=SPECULATE)
        assert got == expected(trained, prompt, 64), prompt
    assert server.metric(ACCEPTED) > 0  # drafts were verified and kept
    assert server.metric("edgepipe_speculative_verify_calls_total") > 0


def test_the_server_default_speculates_on_greedy_requests_and_never_fails_others(
    server_factory, trained_config, trained
):
    server = server_factory(replace(trained_config, speculative="ngram"))
    client = server.client()
    assert complete(client, GROUNDED, 48) == expected(trained, GROUNDED, 48)
    assert server.metric(ACCEPTED) > 0
    # Sampled: decodes without speculation instead of failing.
    sampled = client.completions.create(
        model="trained", prompt=GROUNDED, max_tokens=8, temperature=0.8, seed=1
    )
    assert sampled.usage.completion_tokens >= 1


def test_a_speculating_and_a_plain_request_together_each_give_their_greedy_completion(
    server_factory, trained_config, trained
):
    # A slowed step keeps both in flight together, so they share steps before one is alone.
    server = server_factory(trained_config, slow_step_s=0.01)
    client = server.client()
    jobs = [(GROUNDED, 80, SPECULATE), (FREE, 12, {})]
    with ThreadPoolExecutor(2) as pool:
        replies = list(
            pool.map(lambda job: complete(client, job[0], job[1], extra_body=job[2]), jobs)
        )
    for (prompt, max_tokens, _), got in zip(jobs, replies, strict=True):
        assert got == expected(trained, prompt, max_tokens), prompt
    assert server.metric(ACCEPTED) > 0


@pytest.mark.parametrize("max_tokens", [1, 3, 9])
def test_a_speculative_request_stops_at_max_tokens_exactly(
    server_factory, trained_config, trained, max_tokens
):
    server = server_factory(trained_config)
    for stream in (False, True):
        got = complete(server.client(), GROUNDED, max_tokens, stream, extra_body=SPECULATE)
        assert got == expected(trained, GROUNDED, max_tokens)
        assert got[2] == max_tokens and got[1] == "length"


def test_a_speculative_request_ends_at_its_stop_string(server_factory, trained_config, trained):
    text = expected(trained, GROUNDED, 40)[0]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    server = server_factory(trained_config)
    for stream in (False, True):
        got = complete(server.client(), GROUNDED, 40, stream, stop=[stop], extra_body=SPECULATE)
        text, reason, tokens = expected(trained, GROUNDED, 40, stop_strings=(stop,))
        assert reason == "stop_string" and tokens < 40
        assert got == (text, "stop", tokens)  # OpenAI's finish reason for a stop string


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"temperature": 0.7}, "temperature 0"),
        ({"response_format": {"type": "json_object"}}, "drop 'speculative' or the constraint"),
        ({"speculative": "medusa"}, "speculative"),
    ],
)
def test_a_speculative_request_that_cannot_speculate_gets_a_400_naming_the_field(
    server_factory, trained_config, body, words
):
    server = server_factory(trained_config)
    request = {"max_tokens": 4, "temperature": 0, **SPECULATE, **body}
    messages = [{"role": "user", "content": "Hi"}]
    with pytest.raises(openai.BadRequestError) as info:
        server.client().chat.completions.create(
            model="trained", messages=messages, extra_body=request
        )
    assert info.value.body["param"] == "speculative"
    assert words in info.value.body["message"]


def test_speculation_on_a_decoder_that_cannot_verify_gets_a_400(
    server_factory, serve_config, toy_verifies
):
    server = server_factory(serve_config)
    client = server.client()
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(
            model="toy", prompt="Hi", max_tokens=2, temperature=0, extra_body=SPECULATE
        )
    assert info.value.body["param"] == "speculative"
    assert "rebuild" in info.value.body["message"]
    # The server-wide default does not fail it.
    server = server_factory(replace(serve_config, speculative="ngram"))
    reply = server.client().completions.create(model="toy", prompt="Hi", max_tokens=2)
    assert reply.usage.completion_tokens >= 1


@pytest.fixture
def toy_verifies(serve_toy_dir):
    """The serve toy's decoder returns the last position's logits only (checked, not assumed)."""
    assert not Generator(serve_toy_dir).engine.verifies
