"""Tool calling and `response_format` through the server, driven by the official `openai` client.

Most tests serve the flattened toy (tests/fixtures/constrained.py: Qwen3's template with tools,
1024 positions, sampled replies that differ): its random weights write gibberish, so what
validates, validates because of the constraint.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import openai
import pytest

from edgepipe.runtime import Generator
from tests.fixtures.constrained import SEARCH_TOOL, TOOLS, WEATHER_TOOL
from tests.fixtures.serve import script_replies

jsonschema = pytest.importorskip("jsonschema")
needs_llguidance = pytest.mark.skipif(
    importlib.util.find_spec("llguidance") is None, reason="needs edgepipe[constrained]"
)

WEATHER, SEARCH = WEATHER_TOOL, SEARCH_TOOL
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "Weather in Paris?"}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
# Top-k keeps sampling off a full sort of the 151,936 logits (as the runtime's tests do).
SAMPLED = {"temperature": 1.0, "extra_body": {"top_k": 20}}


@pytest.fixture(scope="module")
def flat_gen(flat_toy_dirs):
    return Generator(flat_toy_dirs["qwen3"])


@pytest.fixture
def tool_server(server_factory, serve_config, flat_toy_dirs):
    return server_factory(replace(serve_config, artifact=flat_toy_dirs["qwen3"]))


def stream_parts(chunks) -> tuple[str, str, list[dict]]:
    """(reasoning, content, calls) of a streamed chat reply, calls accumulated by index."""
    reasoning, content, calls = "", "", {}
    for chunk in chunks:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        for part in delta.tool_calls or []:
            entry = calls.setdefault(part.index, {"id": None, "name": "", "arguments": ""})
            entry["id"] = entry["id"] or part.id
            entry["name"] += part.function.name or ""
            entry["arguments"] += part.function.arguments or ""
    return reasoning, content, [calls[i] for i in sorted(calls)]


def assert_valid_calls(tool_calls, allowed=tuple(PARAMETERS)) -> list[tuple[str, dict]]:
    assert tool_calls
    parsed = []
    for call in tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in allowed
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, PARAMETERS[call.function.name])
        parsed.append((call.function.name, arguments))
    return parsed


@needs_llguidance
def test_required_calls_fit_their_schema_and_stream_as_they_return_whole(tool_server, flat_gen):
    client = tool_server.client()
    request = dict(model="toy", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=200)
    reply = client.chat.completions.create(**request, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = assert_valid_calls(choice.message.tool_calls)
    alone = flat_gen.chat(
        ASK, tools=TOOLS, tool_choice="required", max_new_tokens=200, do_sample=False
    )
    assert calls == [(c.name, c.arguments) for c in alone.tool_calls]

    chunks = list(client.chat.completions.create(**request, temperature=0, stream=True))
    reasoning, content, streamed = stream_parts(chunks)
    assert reasoning == "" and content == ""
    assert [(c["name"], c["arguments"]) for c in streamed] == [
        (c.function.name, c.function.arguments) for c in choice.message.tool_calls
    ]
    assert all(c["id"].startswith("call_") for c in streamed)
    assert [c.choices[0].finish_reason for c in chunks][-1] == "tool_calls"


@needs_llguidance
def test_a_named_tool_choice_gives_one_call_of_that_tool(tool_server):
    client = tool_server.client()
    choice = {"type": "function", "function": {"name": "search"}}
    for seed in range(3):
        reply = client.chat.completions.create(
            model="toy",
            messages=ASK,
            tools=TOOLS,
            tool_choice=choice,
            seed=seed,
            max_tokens=120,
            **SAMPLED,
        )
        assert reply.choices[0].finish_reason == "tool_calls"
        assert len(assert_valid_calls(reply.choices[0].message.tool_calls, ("search",))) == 1


def test_auto_replies_of_a_random_model_are_well_formed(tool_server, flat_gen):
    client = tool_server.client()
    request = dict(model="toy", messages=ASK, tools=TOOLS, max_tokens=24)
    greedy = client.chat.completions.create(**request, temperature=0).choices[0]
    alone = flat_gen.chat(ASK, tools=TOOLS, max_new_tokens=24, do_sample=False)
    assert greedy.message.content == alone.text and greedy.message.tool_calls is None
    assert greedy.finish_reason == alone.finish_reason == "length"
    _, content, calls = stream_parts(client.chat.completions.create(**request, stream=True))
    assert content == alone.text and calls == []
    for seed in range(4):
        choice = client.chat.completions.create(**request, seed=seed, **SAMPLED).choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls"
            for call in choice.message.tool_calls:
                assert isinstance(json.loads(call.function.arguments), dict)
        else:
            assert isinstance(choice.message.content, str)
            assert choice.finish_reason in ("stop", "length")


CALL = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
SECOND = '{"name": "search", "arguments": {"query": "rain"}}'
SCRIPT = (
    "<think>\nThe user wants the weather.\n</think>\n\n"
    f"<tool_call>\n{CALL}\n</tool_call>\n<tool_call>\n{SECOND}\n</tool_call>"
)


def pieces(text: str, size: int = 3) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


@pytest.mark.parametrize("stream", [False, True])
def test_a_reply_that_thinks_then_calls_tools(tool_server, stream):
    script_replies(tool_server, pieces(SCRIPT))
    client = tool_server.client()
    reply = client.chat.completions.create(
        model="toy",
        messages=ASK,
        tools=TOOLS,
        max_tokens=len(pieces(SCRIPT)) + 4,
        temperature=0,
        stream=stream,
    )
    if stream:
        chunks = list(reply)
        reasoning, content, calls = stream_parts(chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        message = reply.choices[0].message
        reasoning, content = message.model_extra["reasoning_content"], message.content
        calls = [
            {"name": c.function.name, "arguments": c.function.arguments} for c in message.tool_calls
        ]
        finish = reply.choices[0].finish_reason
    assert reasoning.strip() == "The user wants the weather."
    assert not content
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"}),
        ("search", {"query": "rain"}),
    ]
    assert finish == "tool_calls"


@pytest.mark.parametrize("stream", [False, True])
def test_parallel_tool_calls_false_ends_the_reply_at_its_first_call(tool_server, stream):
    script = pieces(SCRIPT)
    first_close = next(
        i for i, _ in enumerate(script) if "</tool_call>" in "".join(script[: i + 1])
    )
    script_replies(tool_server, script)
    client = tool_server.client()
    reply = client.chat.completions.create(
        model="toy",
        messages=ASK,
        tools=TOOLS,
        parallel_tool_calls=False,
        max_tokens=200,
        temperature=0,
        stream=stream,
        stream_options={"include_usage": True} if stream else None,
    )
    if stream:
        chunks = list(reply)
        _, _, calls = stream_parts(chunks)
        names = [c["name"] for c in calls]
        usage, finish = chunks[-1].usage, chunks[-2].choices[0].finish_reason
    else:
        names = [c.function.name for c in reply.choices[0].message.tool_calls]
        usage, finish = reply.usage, reply.choices[0].finish_reason
    assert names == ["get_weather"] and finish == "tool_calls"
    # Generation stopped at the token that closed the call, not at max_tokens.
    assert usage.completion_tokens == first_close + 1
    assert tool_server.metric("edgepipe_cancelled_requests_total") == 0
    assert (
        tool_server.metric("edgepipe_requests_total", endpoint="/v1/chat/completions", status="200")
        == 1
    )


@needs_llguidance
def test_20_sampled_json_schema_replies_all_validate(server_factory, serve_config, flat_toy_dirs):
    server = server_factory(replace(serve_config, artifact=flat_toy_dirs["qwen3"], parallel=4))
    client = server.client()

    def ask(seed):
        return client.chat.completions.create(
            model="toy",
            messages=ASK,
            response_format=PERSON_FORMAT,
            seed=seed,
            max_tokens=120,
            **SAMPLED,
        ).choices[0]

    with ThreadPoolExecutor(4) as pool:
        choices = list(pool.map(ask, range(20)))
    for choice in choices:
        jsonschema.validate(json.loads(choice.message.content), PERSON)
        assert choice.finish_reason == "stop"
    assert len({c.message.content for c in choices}) > 1  # sampled, not one forced answer


@needs_llguidance
def test_json_object_replies_are_json_objects(tool_server):
    client = tool_server.client()

    def ask(seed):
        return client.chat.completions.create(
            model="toy",
            messages=ASK,
            response_format={"type": "json_object"},
            seed=seed,
            max_tokens=120,
            **SAMPLED,
        ).choices[0]

    # A random model may write one endless string: only the finished replies can parse.
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(ask, range(8)))
    assert all(r.message.content.startswith("{") for r in replies)
    finished = [r for r in replies if r.finish_reason == "stop"]
    assert finished and all(isinstance(json.loads(r.message.content), dict) for r in finished)


def schema_format(schema) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


BAD_TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}
THINKING_ON = {"chat_template_kwargs": {"enable_thinking": True}}


@needs_llguidance
@pytest.mark.parametrize(
    ("extra", "param", "message"),
    [
        ({"response_format": schema_format({"type": "objekt"})}, "response_format", "objekt"),
        (
            {"response_format": schema_format({"type": "object", "dependentSchemas": {}})},
            "response_format",
            "dependentSchemas",
        ),
        ({"response_format": schema_format([1])}, "response_format.json_schema.schema", "schema"),
        ({"tools": [BAD_TOOL], "tool_choice": "required"}, "tools", "objekt"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "nope",
        ),
        (
            {"tools": TOOLS, "response_format": {"type": "json_object"}},
            "response_format",
            "tool_choice 'none'",
        ),
        (
            {"response_format": {"type": "json_object"}, "extra_body": THINKING_ON},
            "chat_template_kwargs",
            "cannot think",
        ),
    ],
)
def test_bad_constraints_are_400_before_any_generation(tool_server, extra, param, message):
    with pytest.raises(openai.BadRequestError) as info:
        tool_server.client().chat.completions.create(
            model="toy", messages=ASK, max_tokens=4, **extra
        )
    assert info.value.body["param"] == param
    assert message in info.value.body["message"]
    assert tool_server.metric("edgepipe_generated_tokens_total") == 0
    assert tool_server.metric("edgepipe_prompt_tokens_total") == 0


def test_without_llguidance_constraints_are_501_naming_the_extra(tool_server, monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)  # `import llguidance` fails
    client = tool_server.client()
    for extra, param in (
        ({"response_format": PERSON_FORMAT}, "response_format"),
        ({"tools": TOOLS, "tool_choice": "required"}, "tool_choice"),
    ):
        with pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(model="toy", messages=ASK, max_tokens=4, **extra)
        assert info.value.status_code == 501 and info.value.body["param"] == param
        assert "pip install 'edgepipe[constrained]'" in info.value.body["message"]
    # Unconstrained tool use needs no llguidance.
    reply = client.chat.completions.create(model="toy", messages=ASK, tools=TOOLS, max_tokens=4)
    assert reply.usage.completion_tokens == 4


@needs_llguidance
def test_a_constrained_reply_does_not_think(server_factory, serve_config, thinking_toy_dir):
    server = server_factory(replace(serve_config, artifact=thinking_toy_dir))
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    reply = server.client().chat.completions.create(
        model="toy",
        messages=ASK,
        max_tokens=40,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "ok", "schema": schema}},
        extra_body={"thinking_budget": 5},
    )
    message = reply.choices[0].message
    assert (message.model_extra or {}).get("reasoning_content") is None
    jsonschema.validate(json.loads(message.content), schema)


def tool_conversation(arguments: str | dict) -> list[dict]:
    """A user turn, the assistant's call (OpenAI sends arguments as JSON text), its result."""
    call = {"id": "call_1", "type": "function"}
    call["function"] = {"name": "get_weather", "arguments": arguments}
    return ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    ]


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_tool_calls_and_results_render_as_render_chat_does(
    server_factory, serve_config, flat_toy_dirs, family
):
    from edgepipe.serve.prompts import prepare_chat
    from edgepipe.serve.schemas import ChatRequest

    config = replace(serve_config, artifact=flat_toy_dirs[family])
    gen = Generator(flat_toy_dirs[family])
    arguments = {"city": "Paris", "unit": "celsius"}
    messages = tool_conversation(json.dumps(arguments))
    body = {"model": "toy", "messages": messages, "tools": TOOLS, "max_tokens": 8}
    prepared = prepare_chat(ChatRequest.model_validate(body), gen, config, 1024)
    # Arguments given as JSON text reach the template as the object the model wrote.
    expected = gen.render_chat(tool_conversation(arguments), tools=TOOLS)
    assert prepared.prompt == gen.encode(expected)
    assert '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}' in expected
    assert '{"temp": 21}' in expected

    reply = (
        server_factory(config)
        .client()
        .chat.completions.create(
            model="toy", messages=messages, tools=TOOLS, max_tokens=8, temperature=0
        )
    )
    assert reply.usage.prompt_tokens == len(prepared.prompt)
    alone = gen.chat(messages, tools=TOOLS, max_new_tokens=8, do_sample=False)
    assert reply.choices[0].message.content == alone.text


@needs_llguidance
def test_constrained_and_free_rows_share_steps_without_changing_the_free_row(
    server_factory, serve_config, flat_toy_dirs, flat_gen
):
    server = server_factory(
        replace(serve_config, artifact=flat_toy_dirs["qwen3"], parallel=2), slow_step_s=0.01
    )
    batch = server.state.runner.batch
    heights, step = [], batch.step
    lock = threading.Lock()

    def counted_step():
        with lock:
            heights.append(batch.active)
        return step()

    batch.step = counted_step
    client = server.client()

    def constrained():
        return client.chat.completions.create(
            model="toy", messages=ASK, response_format=PERSON_FORMAT, max_tokens=60, temperature=0
        )

    def free():
        return client.completions.create(
            model="toy", prompt="Once upon a time", max_tokens=40, temperature=0
        )

    with ThreadPoolExecutor(2) as pool:
        json_reply, text_reply = pool.submit(constrained), pool.submit(free)
        json_reply, text_reply = json_reply.result(), text_reply.result()
    assert max(heights) == 2  # the two rows were decoded in the same steps
    assert (
        text_reply.choices[0].text
        == flat_gen.generate("Once upon a time", max_new_tokens=40, do_sample=False).text
    )
    alone = flat_gen.chat(ASK, json_schema=PERSON, max_new_tokens=60, do_sample=False)
    assert json_reply.choices[0].message.content == alone.text
    jsonschema.validate(json.loads(alone.text), PERSON)
