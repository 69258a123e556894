"""The OpenAI-compatible API served by Ray Serve, through the official `openai` client and raw HTTP.

One Serve application (tiny, TP=2 on CPU) on the session's Ray cluster for
the whole module. Every bad request checks the status and OpenAI's error
body, then checks that the next good request gets exactly the answer it got
before any error (a greedy reference taken at module start).
"""
from __future__ import annotations

import concurrent.futures
import json
import time
from dataclasses import dataclass

import httpx
import openai
import pytest

from raytp.cluster.comm import free_port

MODEL = "tiny"
APP_NAME = "raytp-api-test"
MAX_MODEL_LEN = 256
REF_PROMPT = "The quick brown fox"
REF_MAX_TOKENS = 12

pytestmark = pytest.mark.timeout(180)


@dataclass
class Server:
    base_url: str  # http://127.0.0.1:PORT

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url + "/v1", api_key="none", max_retries=0, timeout=60)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=60)


def start_serve() -> int:
    """Start Serve on a free port (or reuse a running Serve's port); returns the HTTP port."""
    from ray import serve
    from ray.serve.context import _get_global_client

    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    return _get_global_client().http_config.port


@pytest.fixture(scope="module")
def server(ray_cluster):
    from ray import serve

    from raytp.serve.app import build_app

    port = start_serve()
    # No spare rank: nothing here kills a rank, and a spare's start-up would only slow the module down.
    app = build_app({"model": MODEL, "tensor_parallel_size": 2, "device": "cpu", "max_model_len": MAX_MODEL_LEN,
                     "num_spare_ranks": 0})
    serve.run(app, name=APP_NAME, route_prefix="/")
    yield Server(f"http://127.0.0.1:{port}")
    serve.shutdown()  # the next module (or the CLI) starts Serve with its own HTTP options


@pytest.fixture(scope="module")
def tokenizer():
    from raytp.named_models import resolve_model_path
    from raytp.engine.tokenizer import Tokenizer

    return Tokenizer.from_dir(resolve_model_path(MODEL))


@pytest.fixture(scope="module")
def handle(server):
    from ray import serve

    return serve.get_deployment_handle("RaytpServer", app_name=APP_NAME)


def stats(handle) -> dict:
    return handle.engine_stats.remote().result(timeout_s=30)


def greedy(client: openai.OpenAI, prompt=REF_PROMPT, **kw):
    kw = {"max_tokens": REF_MAX_TOKENS, "temperature": 0, **kw}
    return client.completions.create(model=MODEL, prompt=prompt, **kw)


@pytest.fixture(scope="module")
def reference(server):
    """The greedy answer taken before any error was sent."""
    res = greedy(server.client())
    assert res.choices[0].finish_reason in ("stop", "length")
    return res


# ---- models, health -----------------------------------------------------------------------


def test_models_list(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].object == "model"
    body = server.http().get(f"/v1/models/{MODEL}").json()
    assert body["id"] == MODEL and body["max_model_len"] == MAX_MODEL_LEN


def test_health(server):
    r = server.http().get("/health")
    assert r.status_code == 200


# ---- completions ----------------------------------------------------------------------------


def test_completion_shape_and_usage(server, reference, tokenizer):
    res = reference
    assert res.id.startswith("cmpl-") and res.object == "text_completion" and res.model == MODEL
    assert abs(res.created - time.time()) < 600
    assert len(res.choices) == 1 and res.choices[0].index == 0
    assert res.usage.prompt_tokens == len(tokenizer.encode(REF_PROMPT, add_special_tokens=True))
    assert res.usage.total_tokens == res.usage.prompt_tokens + res.usage.completion_tokens
    # ignore_eos: exactly max_tokens tokens are generated, and counted.
    res = greedy(server.client(), max_tokens=9, extra_body={"ignore_eos": True})
    assert res.choices[0].finish_reason == "length"
    assert res.usage.completion_tokens == 9


def test_completion_stream_equals_non_stream(server, reference):
    chunks = list(greedy(server.client(), stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == reference.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == reference.choices[0].finish_reason and not any(finishes[:-1])
    assert all(c.id == chunks[0].id and c.id.startswith("cmpl-") for c in chunks)
    # include_usage: the last chunk has no choices and the same usage as the non-streamed answer.
    assert chunks[-1].choices == [] and chunks[-1].usage == reference.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_raw_sse_framing(server, reference):
    body = {"model": MODEL, "prompt": REF_PROMPT, "max_tokens": REF_MAX_TOKENS, "temperature": 0, "stream": True}
    r = server.http().post("/v1/completions", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = r.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    payloads = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert "".join(p["choices"][0]["text"] for p in payloads) == reference.choices[0].text
    assert all("usage" not in p for p in payloads)  # no include_usage: no usage field


def test_prompt_forms(server, reference, tokenizer):
    ids = tokenizer.encode(REF_PROMPT, add_special_tokens=True)
    client = server.client()
    assert greedy(client, prompt=ids).choices[0].text == reference.choices[0].text
    assert greedy(client, prompt=[REF_PROMPT]).choices[0].text == reference.choices[0].text
    both = greedy(client, prompt=[REF_PROMPT, "Once upon a time"])
    assert [c.index for c in both.choices] == [0, 1]
    assert both.choices[0].text == reference.choices[0].text
    assert both.usage.prompt_tokens == len(ids) + len(tokenizer.encode("Once upon a time"))
    streamed = {0: "", 1: ""}
    for c in greedy(client, prompt=[REF_PROMPT, "Once upon a time"], stream=True):
        for ch in c.choices:
            streamed[ch.index] += ch.text
    assert streamed == {0: both.choices[0].text, 1: both.choices[1].text}


def test_seeded_sampling_is_reproducible(server):
    client = server.client()
    kw = {"max_tokens": 16, "temperature": 1.0, "seed": 7}
    a = greedy(client, **kw).choices[0].text
    b = greedy(client, **kw).choices[0].text
    assert a == b
    streamed = "".join(c.choices[0].text for c in greedy(client, stream=True, **kw))
    assert streamed == a


def test_ignore_eos(server):
    """Find a seed whose sample ends with EOS early; with ignore_eos the same sample runs to max_tokens."""
    client = server.client()

    def sample(seed, **extra):
        return client.completions.create(model=MODEL, prompt="Hello", max_tokens=16, temperature=1.0, seed=seed,
                                         **extra)

    # With near-uniform logits over 1024 tokens, about one seed in 64 samples EOS within 16 tokens.
    stopped = []
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        for first in range(0, 512, 64):
            results = list(pool.map(sample, range(first, first + 64)))
            stopped = [(first + i, r) for i, r in enumerate(results) if r.choices[0].finish_reason == "stop"]
            if stopped:
                break
    assert stopped, "no seed in 0..511 sampled EOS within 16 tokens"
    seed, short = stopped[0]
    assert short.usage.completion_tokens < 16
    long = sample(seed, extra_body={"ignore_eos": True})
    assert long.choices[0].finish_reason == "length"
    assert long.usage.completion_tokens == 16
    assert long.choices[0].text.startswith(short.choices[0].text)


def _stop_string(text: str) -> str:
    """Two printable ASCII characters from the middle of `text`."""
    for i in range(max(1, len(text) // 3), len(text) - 1):
        s = text[i:i + 2]
        if s.isascii() and s.isprintable() and s.strip():
            return s
    pytest.skip(f"no usable stop string in {text!r}")


def test_stop_strings(server, reference):
    client = server.client()
    ref = reference.choices[0].text
    stop = _stop_string(ref)
    expected = ref[:ref.index(stop)]
    for stop_arg in (stop, ["never-generated-zzz", stop]):
        res = greedy(client, stop=stop_arg)
        assert res.choices[0].text == expected
        assert res.choices[0].finish_reason == "stop"
        streamed = "".join(c.choices[0].text for c in greedy(client, stop=stop_arg, stream=True) if c.choices)
        assert streamed == expected


# ---- chat ------------------------------------------------------------------------------------

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello to the world."}]


def test_chat(server, tokenizer):
    client = server.client()
    res = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0)
    assert res.id.startswith("chatcmpl-") and res.object == "chat.completion" and res.model == MODEL
    msg = res.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert res.usage.prompt_tokens == len(tokenizer.encode(prompt, add_special_tokens=False))
    assert res.usage.completion_tokens <= 10
    assert res.usage.total_tokens == res.usage.prompt_tokens + res.usage.completion_tokens

    # max_completion_tokens is the newer name; ignore_eos makes the count exact.
    exact = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=7, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert exact.usage.completion_tokens == 7 and exact.choices[0].finish_reason == "length"

    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == msg.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == res.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == res.usage


def test_chat_default_max_tokens_fills_the_context(server, tokenizer):
    """No max_tokens: up to max_model_len - prompt_len (vLLM), so ignore_eos runs to exactly that."""
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    prompt_len = len(tokenizer.encode(prompt, add_special_tokens=False))
    res = server.client().chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0,
                                                  extra_body={"ignore_eos": True})
    assert res.usage.completion_tokens == MAX_MODEL_LEN - prompt_len
    assert res.choices[0].finish_reason == "length"


# ---- errors ----------------------------------------------------------------------------------

GOOD = {"model": MODEL, "prompt": REF_PROMPT, "max_tokens": REF_MAX_TOKENS, "temperature": 0}
CHAT = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4}

# (id, path, raw body, status, param, code)
BAD_REQUESTS = [
    ("malformed-json", "/v1/completions", b'{"model": "tiny", "prompt": ', 400, None, None),
    ("not-utf8", "/v1/completions", b"\xff\xfe", 400, None, None),
    ("not-an-object", "/v1/completions", b"[1, 2]", 400, None, None),
    ("max-tokens-negative", "/v1/completions", {**GOOD, "max_tokens": -1}, 400, "max_tokens", None),
    ("max-tokens-absurd", "/v1/completions", {**GOOD, "max_tokens": 10**9}, 400, "max_tokens", "context_length_exceeded"),
    ("temperature-negative", "/v1/completions", {**GOOD, "temperature": -1}, 400, "temperature", None),
    ("top-p-zero", "/v1/completions", {**GOOD, "top_p": 0}, 400, "top_p", None),
    ("prompt-too-long", "/v1/completions", {**GOOD, "prompt": "hello " * 300}, 400, "prompt", "context_length_exceeded"),
    ("ids-too-long", "/v1/completions", {**GOOD, "prompt": [5] * (MAX_MODEL_LEN + 1)}, 400, "prompt",
     "context_length_exceeded"),
    ("id-out-of-vocab", "/v1/completions", {**GOOD, "prompt": [1, 10**6]}, 400, "prompt", None),
    ("missing-prompt", "/v1/completions", {"model": MODEL}, 400, "prompt", None),
    ("empty-stop", "/v1/completions", {**GOOD, "stop": [""]}, 400, "stop", None),
    ("n-0", "/v1/completions", {**GOOD, "n": 0}, 400, "n", None),
    ("logprobs-30", "/v1/completions", {**GOOD, "logprobs": 30}, 400, "logprobs", None),
    ("top-logprobs-25", "/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 25}, 400, "top_logprobs",
     None),
    ("presence-penalty-3", "/v1/completions", {**GOOD, "presence_penalty": 3}, 400, "presence_penalty", None),
    ("logit-bias-not-a-token", "/v1/completions", {**GOOD, "logit_bias": {"123456789": 1}}, 400, "logit_bias", None),
    ("unknown-model", "/v1/completions", {**GOOD, "model": "gpt-17"}, 404, "model", "model_not_found"),
    ("role-wizard", "/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "hi"}]}, 400,
     "messages.0.role", None),
    ("tool-role-not-in-template", "/v1/chat/completions", {**CHAT, "messages": [{"role": "tool", "content": "x"}]},
     400, "messages", None),
    ("messages-empty", "/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages", None),
    ("chat-unknown-model", "/v1/chat/completions", {**CHAT, "model": "gpt-17"}, 404, "model", "model_not_found"),
    ("chat-too-long", "/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "hi " * 300}]}, 400,
     "messages", "context_length_exceeded"),
    ("stream-bad", "/v1/completions", {**GOOD, "stream": True, "max_tokens": 0}, 400, "max_tokens", None),
    ("malformed-json-schema", "/v1/chat/completions", {**CHAT, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}}, 400, "response_format", None),
    ("unknown-tool-choice", "/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}],
     "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400, "tool_choice", None),
]


@pytest.mark.parametrize("path,body,status,param,code", [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_then_good_request(server, reference, path, body, status, param, code):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with server.http() as http:
        r = http.post(path, content=raw, headers={"content-type": "application/json"})
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["type"] == "invalid_request_error" and err["message"]
        assert err["param"] == param and err["code"] == code
        # The server answers the next good request exactly as before.
        good = http.post("/v1/completions", json=GOOD)
        assert good.status_code == 200
        assert good.json()["choices"][0]["text"] == reference.choices[0].text


def test_openai_client_n_logprobs_echo_penalties(server, tokenizer):
    """Through Serve and the TP=2 group: seeded n=3 is reproducible, usage counts every choice, echo carries the
    prompt's logprobs (the first null), penalties and logit_bias reach every rank's sampler."""
    client = server.client()
    kw = dict(model=MODEL, prompt=REF_PROMPT, max_tokens=8, temperature=1.0, seed=11, n=3, logprobs=2, echo=True,
              extra_body={"ignore_eos": True, "return_token_ids": True})
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices] and len(a.choices) == 3
    assert a.usage.completion_tokens == 24
    prompt_len = len(tokenizer.encode(REF_PROMPT))
    for choice in a.choices:
        assert choice.text.startswith(REF_PROMPT)
        assert len(choice.logprobs.tokens) == prompt_len + 8 and choice.logprobs.token_logprobs[0] is None
        assert len(choice.token_ids) == 8  # vLLM's return_token_ids
    forced = client.completions.create(model=MODEL, prompt=REF_PROMPT, max_tokens=5, temperature=0,
                                       logit_bias={"42": 100}, extra_body={"ignore_eos": True, "return_token_ids": True})
    assert forced.choices[0].token_ids == [42] * 5
    penalized = client.completions.create(model=MODEL, prompt=REF_PROMPT, max_tokens=12, temperature=0,
                                          frequency_penalty=2.0, extra_body={"ignore_eos": True, "return_token_ids": True})
    ids = penalized.choices[0].token_ids
    assert len(ids) == 12 and max(ids.count(t) for t in ids) < 12


def test_openai_client_structured_outputs_and_tool_calls(server):
    """Through Serve and the TP=2 group (every rank applies the engine's grammar mask): parse() with a pydantic
    model returns the object, and a forced tool call's arguments validate against the function's parameters."""
    import jsonschema
    import pydantic

    class Forecast(pydantic.BaseModel):
        city: str = pydantic.Field(max_length=10)
        days: int = pydantic.Field(ge=1, le=7)
        sunny: bool

    client = server.client()
    tools = [openai.pydantic_function_tool(Forecast, name="forecast")]  # a strict schema, as clients send it
    parameters = tools[0]["function"]["parameters"]
    for seed in range(3):
        parsed = client.chat.completions.parse(model=MODEL, messages=MESSAGES, response_format=Forecast, seed=seed)
        assert isinstance(parsed.choices[0].message.parsed, Forecast)
        called = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=tools, seed=seed,
                                                tool_choice={"type": "function", "function": {"name": "forecast"}})
        (call,) = called.choices[0].message.tool_calls
        assert called.choices[0].finish_reason == "tool_calls" and call.function.name == "forecast"
        jsonschema.validate(json.loads(call.function.arguments), parameters)


def test_tokenize_detokenize_over_http(server, tokenizer):
    with server.http() as http:
        r = http.post("/tokenize", json={"model": MODEL, "prompt": REF_PROMPT}).json()
        assert r["tokens"] == tokenizer.encode(REF_PROMPT) and r["count"] == len(r["tokens"])
        assert http.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": REF_PROMPT}


def test_openai_client_errors(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=-1)
    assert info.value.status_code == 400 and info.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nope", messages=MESSAGES)
    assert info.value.body["code"] == "model_not_found"


def test_unknown_path_is_404_with_openai_body(server):
    r = server.http().get("/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


# ---- a client that goes away -----------------------------------------------------------------


def _wait_idle(handle, timeout=20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        s = stats(handle)
        if (s["num_requests"] == 0 and s["num_running"] == 0 and s["num_waiting"] == 0
                and s["free_blocks"] == s["total_blocks"]) or time.monotonic() > deadline:
            return s
        time.sleep(0.2)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_disconnect_mid_stream_aborts(server, handle, reference, path):
    before = _wait_idle(handle)
    assert before["num_running"] == 0
    body = {"model": MODEL, "max_tokens": 200, "temperature": 0, "stream": True, "ignore_eos": True}
    body.update({"prompt": REF_PROMPT} if "chat" not in path else {"messages": MESSAGES})
    with server.http() as http:
        with http.stream("POST", path, json=body) as r:
            assert r.status_code == 200
            chunks = r.iter_raw()  # keep it referenced: a dropped iterator closes the response
            first = next(chunks)
            assert first.startswith(b"data: ")
            busy = stats(handle)
            assert busy["num_requests"] == 1 and busy["free_blocks"] < busy["total_blocks"], (busy, first)
        # Leaving the block closes the connection mid-stream (200 tokens take far longer than this).
    idle = _wait_idle(handle)
    assert idle["num_requests"] == 0 and idle["num_running"] == 0 and idle["num_waiting"] == 0
    assert idle["free_blocks"] == idle["total_blocks"]
    # It was aborted, not run to its end: nothing finished, one more aborted.
    assert idle["finished"] == before["finished"]
    assert idle["aborted"] == before["aborted"] + 1
    assert greedy(server.client()).choices[0].text == reference.choices[0].text


# ---- engine failures (the API alone, around an engine that fails on purpose) -----------------
# (503 while a real group recovers is tested in test_elastic.py.)


class _FailingEngine:
    """Ready; its requests produce one output, then the engine fails (or fails at once for prompt [9])."""

    model_name, ready, failed, tokenizer, max_model_len = MODEL, True, None, None, MAX_MODEL_LEN

    class config:
        model, api_key, cors_allow_origins = MODEL, None, []

    def room(self):
        return None

    def request_limit(self):
        return None

    def add_request(self, prompt, params, request_id):
        return self.generate(prompt, params, request_id)

    async def generate(self, prompt, params, request_id):
        from raytp.outputs import CompletionOutput, RequestOutput

        if prompt == [9]:
            raise RuntimeError("boom")
        yield RequestOutput(request_id, None, list(prompt), [CompletionOutput(0, "a", [5])], False, "a", [5])
        raise RuntimeError("engine error: the TP group failed")


def test_engine_failures_answer_500_or_an_sse_error_event():
    from fastapi.testclient import TestClient

    from raytp.serve.api import build_api

    with TestClient(build_api(lambda: _FailingEngine()), raise_server_exceptions=False) as http:
        r = http.post("/v1/completions", json={**GOOD, "prompt": [9]})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        r = http.post("/v1/completions", json={**GOOD, "prompt": [1, 2]})
        assert r.status_code == 500 and "TP group failed" in r.json()["error"]["message"]
        r = http.post("/v1/completions", json={**GOOD, "prompt": [1, 2], "stream": True})
        events = r.text.split("\n\n")
        assert r.status_code == 200 and events[-2:] == ["data: [DONE]", ""]
        assert json.loads(events[0][6:])["choices"][0]["text"] == "a"
        err = json.loads(events[1][6:])["error"]
        assert err["type"] == "server_error" and "TP group failed" in err["message"]
