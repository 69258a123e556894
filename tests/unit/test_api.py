"""The OpenAI API in process (no Ray): the FastAPI app of raytp.serve.api over a real AsyncEngine (tiny, one
rank in this process), through httpx's ASGI transport.

Guards (API key, queue cap, CORS), /tokenize and /detokenize, /openapi.json,
the 400s for bad values, n, echo, logprobs and return_token_ids. The same app
runs under Ray Serve in tests/cluster/test_serve_api.py.
"""
from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest

from raytp.config import EngineConfig
from raytp.engine.engine import AsyncEngine
from raytp.cluster.executor import LocalExecutor
from raytp.serve.api import build_api

pytestmark = pytest.mark.timeout(120)

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
ORIGIN = "https://app.example.com"
PROMPT = "The quick brown fox"
CHAT = [{"role": "user", "content": "Say hello"}]


class Server:
    """An AsyncEngine and its app on an event loop in a background thread; `call` runs a coroutine there."""

    def __init__(self, config: EngineConfig):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.engine = AsyncEngine(config, lambda c, p, m: LocalExecutor(c, p, m, num_threads=1))
        self.call(self.engine.start())
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=build_api(lambda: self.engine)),
                                        base_url="http://raytp", timeout=60)

    def call(self, coro, timeout: float = 90):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def post(self, path: str, body, headers=AUTH) -> httpx.Response:
        return self.call(self.client.post(path, json=body, headers=headers))

    def close(self) -> None:
        self.call(self.client.aclose())
        self.call(self.engine.shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def server():
    config = EngineConfig(model="tiny", device="cpu", max_model_len=256, max_num_seqs=2, max_queued_requests=2,
                          api_key=KEY, cors_allow_origins=[ORIGIN])
    made = Server(config)
    yield made
    made.close()


def completion(server, **body) -> dict:
    r = server.post("/v1/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 6, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def sse_chunks(text: str) -> list[dict]:
    events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


# ---- guards --------------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}],
                         ids=["none", "wrong", "not-bearer"])
@pytest.mark.parametrize("path,body", [("/v1/completions", {"model": "tiny", "prompt": "hi"}),
                                       ("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [5]})])
def test_api_key_is_required(server, path, body, headers):
    r = server.post(path, body, headers)
    assert r.status_code == 401
    assert r.json() == {"error": {"message": r.json()["error"]["message"], "type": "invalid_request_error",
                                  "param": None, "code": "invalid_api_key"}}
    assert server.call(server.client.get("/v1/models")).status_code == 401


def test_health_and_docs_stay_open(server):
    for path in ("/health", "/openapi.json", "/docs"):
        assert server.call(server.client.get(path)).status_code == 200, path
    assert server.call(server.client.get("/v1/models", headers=AUTH)).json()["data"][0]["id"] == "tiny"


def test_queue_cap_answers_429_and_loses_nothing_admitted(server):
    """max_num_seqs 2 + max_queued_requests 2: of 16 simultaneous requests, those past 4 unfinished get 429 with
    Retry-After; every admitted one completes in full."""
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 24, "ignore_eos": True}

    async def burst():
        return await asyncio.gather(*(server.client.post("/v1/completions", json=body, headers=AUTH) for _ in range(16)))

    answers = server.call(burst())
    refused = [r for r in answers if r.status_code == 429]
    done = [r for r in answers if r.status_code == 200]
    assert len(refused) + len(done) == 16 and refused and len(done) >= 4
    for r in refused:
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["type"] == "rate_limit_error" and r.json()["error"]["code"] == "too_many_requests"
    for r in done:
        assert r.json()["usage"]["completion_tokens"] == 24 and r.json()["choices"][0]["finish_reason"] == "length"
    assert len(server.engine.core.requests) == 0


def test_cors_allow_list(server):
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    r = server.call(server.client.options("/v1/completions", headers=preflight))
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    # A 401 carries the header too, so the browser can show it; another origin gets none.
    r = server.post("/v1/completions", {"prompt": "hi"}, {"Origin": ORIGIN})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ORIGIN
    r = server.post("/tokenize", {"prompt": "hi"}, {**AUTH, "Origin": "https://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


# ---- /tokenize, /detokenize, /openapi.json ---------------------------------------------------------


def test_tokenize_and_detokenize(server):
    tok = server.engine.tokenizer
    r = server.post("/tokenize", {"model": "tiny", "prompt": "Hello world", "return_token_strs": True}).json()
    assert r["tokens"] == tok.encode("Hello world") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 256 and "".join(r["token_strs"][1:]) == "Hello world"
    assert server.post("/tokenize", {"prompt": "Hello world", "add_special_tokens": False}).json()["tokens"] == \
        tok.encode("Hello world", add_special_tokens=False)
    chat = server.post("/tokenize", {"messages": CHAT}).json()
    assert chat["tokens"] == tok.encode(tok.apply_chat_template(CHAT), add_special_tokens=False)
    assert chat["token_strs"] is None
    assert server.post("/detokenize", {"tokens": r["tokens"]}).json() == {"prompt": "Hello world"}


@pytest.mark.parametrize("path,body,param", [
    ("/tokenize", {"prompt": "a", "messages": CHAT}, None),
    ("/tokenize", {}, None),
    ("/tokenize", {"prompt": "a", "model": "gpt-17"}, "model"),
    ("/detokenize", {"tokens": [1, 10**6]}, "tokens"),
    ("/detokenize", {"tokens": "abc"}, "tokens"),
])
def test_tokenize_errors(server, path, body, param):
    r = server.post(path, body)
    assert r.status_code in (400, 404) and r.json()["error"]["param"] == param


def test_openapi_documents_request_bodies_with_examples(server):
    spec = server.call(server.client.get("/openapi.json")).json()
    schemas = spec["components"]["schemas"]
    for path, name in [("/v1/completions", "CompletionRequest"), ("/v1/chat/completions", "ChatCompletionRequest"),
                       ("/tokenize", "TokenizeRequest"), ("/detokenize", "DetokenizeRequest")]:
        ref = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/" + name)
        assert schemas[name]["examples"], name
    fields = schemas["CompletionRequest"]["properties"]
    for field in ("n", "logprobs", "echo", "presence_penalty", "frequency_penalty", "repetition_penalty",
                  "logit_bias", "min_tokens", "stop_token_ids", "return_token_ids"):
        assert fields[field].get("description"), field


# ---- bad values ----------------------------------------------------------------------------------

GOOD = {"model": "tiny", "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
BAD = [
    ("n-0", "/v1/completions", {"n": 0}, "n"),
    ("logprobs-30", "/v1/completions", {"logprobs": 30}, "logprobs"),
    ("top-logprobs-25", "/v1/chat/completions", {"logprobs": True, "top_logprobs": 25}, "top_logprobs"),
    ("top-logprobs-without-logprobs", "/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("presence-3", "/v1/completions", {"presence_penalty": 3}, "presence_penalty"),
    ("frequency--2.5", "/v1/chat/completions", {"frequency_penalty": -2.5}, "frequency_penalty"),
    ("repetition-0", "/v1/completions", {"repetition_penalty": 0}, "repetition_penalty"),
    ("bias-key-not-a-number", "/v1/completions", {"logit_bias": {"fox": 5}}, "logit_bias"),
    ("bias-key-past-vocab", "/v1/completions", {"logit_bias": {"1000000": 5}}, "logit_bias"),
    ("bias-value-101", "/v1/completions", {"logit_bias": {"5": 101}}, "logit_bias.5"),
    ("min-tokens-past-max", "/v1/completions", {"min_tokens": 5}, "min_tokens"),
    ("stop-token-past-vocab", "/v1/completions", {"stop_token_ids": [10**6]}, "stop_token_ids"),
    ("not-json", "/v1/completions", b'{"prompt": ', None),
]


@pytest.mark.parametrize("path,extra,param", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_values_are_400_naming_the_field(server, path, extra, param):
    if isinstance(extra, bytes):
        r = server.call(server.client.post(path, content=extra, headers={**AUTH, "content-type": "application/json"}))
    else:
        base = GOOD if path == "/v1/completions" else {"model": "tiny", "messages": CHAT, "max_tokens": 4}
        r = server.post(path, {**base, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["type"] == "invalid_request_error"
    assert completion(server)["choices"][0]["finish_reason"] == "length"  # and the server keeps serving


# ---- n, echo, logprobs, token ids ----------------------------------------------------------------


def test_seeded_n_is_reproducible_and_usage_counts_every_choice(server):
    body = dict(n=3, seed=5, temperature=1.0, max_tokens=8, ignore_eos=True)
    first, again = completion(server, **body), completion(server, **body)
    assert [c["index"] for c in first["choices"]] == [0, 1, 2]
    assert [c["text"] for c in first["choices"]] == [c["text"] for c in again["choices"]]
    assert len({c["text"] for c in first["choices"]}) > 1  # the choices differ
    assert first["usage"]["completion_tokens"] == 3 * 8
    # Two prompts, two choices each: choice i * n + j is prompt i's j-th; the prompt tokens count once per prompt.
    two = completion(server, **{**body, "n": 2, "prompt": [PROMPT, "Hello"]})
    assert [c["text"] for c in two["choices"][:2]] == [c["text"] for c in first["choices"][:2]]
    assert two["usage"]["completion_tokens"] == 4 * 8
    assert two["usage"]["prompt_tokens"] == sum(len(server.engine.tokenizer.encode(p)) for p in (PROMPT, "Hello"))


def test_more_choices_than_the_replica_holds_is_400(server):
    r = server.post("/v1/completions", {**GOOD, "n": 5})  # max_num_seqs 2 + max_queued_requests 2
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


def test_completion_echo_logprobs_and_token_ids(server):
    res = completion(server, logprobs=3, echo=True, return_token_ids=True)
    choice = res["choices"][0]
    prompt_ids = server.engine.tokenizer.encode(PROMPT)
    assert choice["prompt_token_ids"] == prompt_ids and len(choice["token_ids"]) == 6
    assert choice["text"].startswith(PROMPT)
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(prompt_ids) + 6 == len(lp["token_logprobs"]) == len(lp["text_offset"])
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for token, logprob, top in zip(lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
        assert logprob <= 0 and token in top and 1 <= len(top) <= 4  # tokens may share a text
    # Greedy: each output token is the likeliest one.
    for token, logprob, top in zip(lp["tokens"][-6:], lp["token_logprobs"][-6:], lp["top_logprobs"][-6:]):
        assert logprob == max(top.values())


def test_streamed_logprobs_equal_the_whole_answer(server):
    body = dict(logprobs=2, echo=True, n=2, seed=3, temperature=0.7, return_token_ids=True)
    whole = completion(server, **body)
    r = server.post("/v1/completions", {**GOOD, "max_tokens": 6, **body, "stream": True})
    for choice in whole["choices"]:
        parts = [c["choices"][0] for c in sse_chunks(r.text) if c["choices"][0]["index"] == choice["index"]]
        assert "".join(p["text"] for p in parts) == choice["text"]
        assert sum((p["token_ids"] for p in parts), []) == choice["token_ids"]
        for key in ("tokens", "token_logprobs", "text_offset"):
            assert sum((p["logprobs"][key] for p in parts), []) == choice["logprobs"][key]


def test_chat_logprobs(server):
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 5, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    res = server.post("/v1/chat/completions", body).json()
    content = res["choices"][0]["logprobs"]["content"]
    assert len(content) == res["usage"]["completion_tokens"] == 5
    for entry in content:
        assert len(entry["top_logprobs"]) == 2 and entry["logprob"] == entry["top_logprobs"][0]["logprob"]
        assert bytes(entry["bytes"]).decode("utf-8", "replace") == entry["token"]
    r = server.post("/v1/chat/completions", {**body, "stream": True})
    streamed = [e for c in sse_chunks(r.text) for e in ((c["choices"][0].get("logprobs") or {}).get("content") or [])]
    assert streamed == content
