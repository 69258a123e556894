"""Structured outputs and tool calls through the HTTP API in process (no Ray), with the official openai client.

The tiny model's output is random text, so whatever it answers under a JSON
schema or a forced tool call must validate, over several seeds. The same
app runs under Ray Serve in tests/cluster/test_serve_api.py.
"""
from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pydantic
import pytest

from raytp.config import EngineConfig
from tests.unit.test_api import Server, sse_chunks

pytestmark = pytest.mark.timeout(180)

SEEDS = range(5)
CHAT = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]},
                   "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather forecast", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
        "additionalProperties": False}}},
    {"type": "function", "function": {"name": "ping"}},  # no parameters: the empty object
]
PARAMETERS = {t["function"]["name"]: t["function"].get("parameters", {"type": "object", "maxProperties": 0})
              for t in TOOLS}


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=12)
    population: int = pydantic.Field(ge=0, le=10**9)
    coastal: bool


@pytest.fixture(scope="module")
def server():
    made = Server(EngineConfig(model="tiny", device="cpu", max_model_len=512, max_num_seqs=4))
    yield made
    made.close()


@pytest.fixture(scope="module")
def client(server):
    """The official async client, over the app in process; `run` awaits one of its calls on the server's loop."""
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=server.client._transport.app), base_url="http://raytp")
    made = openai.AsyncOpenAI(api_key="unused", base_url="http://raytp/v1", http_client=http, max_retries=0)
    made.run = server.call
    return made


def chat(server, **body) -> httpx.Response:
    return server.post("/v1/chat/completions", {"model": "tiny", "messages": CHAT, **body}, headers={})


def test_json_schema_answers_validate_over_seeds(server):
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER, "strict": True}}
    for seed in SEEDS:
        choice = chat(server, response_format=fmt, seed=seed).json()["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["message"]["content"]), WEATHER)
    # Completions take it too (as in vLLM).
    r = server.post("/v1/completions", {"model": "tiny", "prompt": "Weather:", "max_tokens": 200, "seed": 1,
                                        "response_format": fmt}, headers={})
    jsonschema.validate(json.loads(r.json()["choices"][0]["text"]), WEATHER)


def test_json_object_starts_an_object_and_ends_as_one(server):
    answers = [chat(server, response_format={"type": "json_object"}, seed=seed, max_tokens=300).json()["choices"][0]
               for seed in SEEDS]
    assert all(a["message"]["content"].startswith("{") for a in answers)
    finished = [a for a in answers if a["finish_reason"] == "stop"]
    assert finished  # random text can fill a string key to max_tokens; those end with "length"
    assert all(isinstance(json.loads(a["message"]["content"]), dict) for a in finished)


def test_the_openai_client_parses_a_pydantic_response_format(client):
    for seed in SEEDS:
        res = client.run(client.chat.completions.parse(model="tiny", messages=CHAT, response_format=City, seed=seed))
        assert isinstance(res.choices[0].message.parsed, City), res.choices[0].message.content


@pytest.mark.parametrize("body,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "launch_rocket"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
      "tool_choice": "required"}, "tools"),
], ids=["malformed-schema", "no-schema", "unknown-type", "unknown-function", "choice-without-tools", "bad-parameters"])
def test_bad_grammars_are_400_naming_the_field(server, body, param):
    r = chat(server, **body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert chat(server, max_tokens=2).status_code == 200  # and the server keeps serving


def test_named_tool_calls_validate_and_the_client_reads_them(client):
    for seed in SEEDS:
        res = client.run(client.chat.completions.create(
            model="tiny", messages=CHAT, tools=TOOLS, seed=seed,
            tool_choice={"type": "function", "function": {"name": "get_weather"}}))
        choice = res.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER)


def test_required_tool_calls_validate_against_their_function(client):
    names = set()
    for seed in SEEDS:
        res = client.run(client.chat.completions.create(model="tiny", messages=CHAT, tools=TOOLS, seed=seed,
                                                        tool_choice="required", max_tokens=400))
        choice = res.choices[0]
        assert choice.finish_reason == "tool_calls", choice.message.content
        assert choice.message.tool_calls and len({c.id for c in choice.message.tool_calls}) == len(choice.message.tool_calls)
        for call in choice.message.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])
            names.add(call.function.name)
    assert len(names) > 1  # the grammar lets the model pick among the functions
    single = client.run(client.chat.completions.create(model="tiny", messages=CHAT, tools=TOOLS, seed=0,
                                                       tool_choice="required", parallel_tool_calls=False))
    assert len(single.choices[0].message.tool_calls) == 1


def test_streamed_tool_calls_match_the_whole_answer(server):
    """OpenAI's stream shape: the first delta of a call has index, id, type and name, the next ones argument
    fragments; joined they are the non-streamed call."""
    for choice in ({"type": "function", "function": {"name": "get_weather"}}, "required"):
        body = dict(tools=TOOLS, tool_choice=choice, seed=2, max_tokens=400)
        whole = chat(server, **body).json()["choices"][0]
        chunks = sse_chunks(chat(server, **body, stream=True).text)
        calls: dict[int, dict] = {}
        for chunk in chunks[1:]:
            for delta in chunk["choices"][0]["delta"].get("tool_calls", []):
                if delta["index"] not in calls:
                    assert delta["id"].startswith("call_") and delta["type"] == "function" and delta["function"]["name"]
                    calls[delta["index"]] = {"name": delta["function"]["name"], "arguments": ""}
                calls[delta["index"]]["arguments"] += delta["function"].get("arguments", "")
        assert [calls[i] for i in sorted(calls)] == [c["function"] for c in whole["message"]["tool_calls"]]
        assert chunks[-1]["choices"][0]["finish_reason"] == whole["finish_reason"] == "tool_calls"
        assert not any(c["choices"][0]["delta"].get("content") for c in chunks)


def test_tool_choice_auto_and_none_answer_text_when_the_model_calls_nothing(server):
    for choice in ("auto", "none"):
        res = chat(server, tools=TOOLS, tool_choice=choice, seed=1, max_tokens=8).json()["choices"][0]
        assert res["message"]["content"] and res["message"]["tool_calls"] == [] and res["finish_reason"] == "length"
