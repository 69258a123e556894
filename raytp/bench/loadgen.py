"""The load generator: a seeded workload, an arrival pattern, and a driver that times every request.

The workload is a list of token-id prompts with random lengths and requested
output lengths (sent with ``ignore_eos``, temperature 0), so any
OpenAI-compatible server runs exactly the same amount of work. The arrival
pattern is a burst (``request_rate=inf``: every request at t=0) or a Poisson
process of ``request_rate`` requests per second; at most ``concurrency``
requests are in flight, the rest wait at the client for a slot (as in vLLM's
benchmark_serving).

A backend is an async callable ``backend(spec, mark) -> output token count``
that calls ``mark()`` when a chunk that carries a token arrives. The same
driver runs the HTTP backend below and the in-process engine (baselines.py),
so both see the same workload and the same arrivals.

Timing, per request, from the moment it is sent: TTFT = first token chunk,
ITL = gaps between token chunks, E2E = end of the stream.
"""
from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Protocol

Mark = Callable[..., None]  # mark() or mark(perf_counter_time): a chunk with a token arrived (then)


class BenchError(RuntimeError):
    """A request failed in a way the benchmark reports (HTTP error, missing usage block, ...)."""


@dataclass(frozen=True)
class RequestSpec:
    index: int
    prompt_ids: list[int]
    output_len: int
    joins: bool = False  # the long prompt that joins running streams (--join-prompt-len)


@dataclass
class RequestResult:
    index: int
    prompt_len: int
    output_len: int  # requested
    joins: bool = False
    output_tokens: int = 0  # counted (usage block / engine output)
    send_time: float = 0.0  # seconds since the run started
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    num_chunks: int = 0  # chunks that carried tokens (a server may send several tokens in one)
    e2e: float | None = None
    error: str | None = None


@dataclass
class RunResult:
    """One backend at one load point."""

    backend: str
    concurrency: int
    request_rate: float
    duration: float  # first arrival to last completion
    requests: list[RequestResult]
    extra: dict = field(default_factory=dict)  # backend details (batch size, threads, ...)


class Backend(Protocol):
    name: str

    def __call__(self, spec: RequestSpec, mark: Mark) -> Awaitable[int]: ...


def parse_range(text: str, what: str) -> tuple[int, int]:
    """'16:128' -> (16, 128); '64' -> (64, 64)."""
    try:
        lo, _, hi = str(text).partition(":")
        lo_i, hi_i = int(lo), int(hi or lo)
    except ValueError:
        raise ValueError(f"{what} must be N or MIN:MAX with integers, got {text!r}") from None
    if not 1 <= lo_i <= hi_i:
        raise ValueError(f"{what} must satisfy 1 <= MIN <= MAX, got {text!r}")
    return lo_i, hi_i


def parse_rate(text: str | float, what: str = "request rate") -> float:
    try:
        rate = float(text)
    except ValueError:
        raise ValueError(f"{what} must be a number > 0 or inf, got {text!r}") from None
    if not rate > 0 or math.isnan(rate):
        raise ValueError(f"{what} must be a number > 0 or inf, got {text!r}")
    return rate


def parse_int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what} must be a comma-separated list of integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{what} must be integers >= 1, got {text!r}")
    return values


def make_workload(num_requests: int, prompt_len: tuple[int, int], output_len: tuple[int, int], vocab_size: int,
                  seed: int = 0, shared_prefix_len: int = 0, join_prompt_len: int = 0) -> list[RequestSpec]:
    """Random token-id prompts in [10, vocab-10) with uniform prompt and output lengths; same seed, same workload.

    shared_prefix_len: every prompt starts with the same that many tokens (then its own prompt_len tokens).
    join_prompt_len: one more request, last, with a prompt of that many tokens and the shortest output length
    (see arrival_times' join_at).
    """
    if vocab_size <= 20:
        raise ValueError(f"vocab_size={vocab_size} is too small for random prompts in [10, vocab-10)")
    rng = random.Random(seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(10, vocab_size - 10) for _ in range(n)]

    prefix = tokens(shared_prefix_len)
    specs = []
    for i in range(num_requests):
        n = rng.randint(*prompt_len)
        specs.append(RequestSpec(i, prefix + tokens(n), rng.randint(*output_len)))
    if join_prompt_len:
        specs.append(RequestSpec(num_requests, tokens(join_prompt_len), output_len[0], joins=True))
    return specs


def arrival_times(num_requests: int, request_rate: float, seed: int = 0, join_at: float | None = None) -> list[float]:
    """Seconds after the start at which each request arrives: all 0 for a burst, else Poisson (first at 0); with
    join_at, one more request (make_workload's joining prompt) arrives at join_at."""
    if math.isinf(request_rate):
        out = [0.0] * num_requests
    else:
        rng = random.Random(seed + 1)
        t, out = 0.0, []
        for i in range(num_requests):
            out.append(t)
            t += rng.expovariate(request_rate)
    return out + ([join_at] if join_at is not None else [])


def offered_rate(arrivals: list[float]) -> float:
    """Requests/s the arrival times offer: inf for a burst."""
    if not arrivals or all(a == 0 for a in arrivals):
        return math.inf
    return len(arrivals) / max(arrivals[-1], 1e-9)


async def run_load(backend: Backend, specs: list[RequestSpec], arrivals: list[float], concurrency: int,
                   progress: bool = True, desc: str | None = None) -> RunResult:
    """Send every request at its arrival time (at most `concurrency` in flight) and time it."""
    from tqdm.auto import tqdm

    sem = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(specs), desc=desc or f"{backend.name} c={concurrency}", unit="req", disable=not progress,
               leave=False)
    t0 = time.perf_counter()
    results = [RequestResult(s.index, len(s.prompt_ids), s.output_len, s.joins) for s in specs]
    last_end = t0

    async def one(spec: RequestSpec, at: float, res: RequestResult) -> None:
        nonlocal last_end
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        async with sem:
            marks: list[float] = []
            start = time.perf_counter()
            res.send_time = start - t0
            try:
                res.output_tokens = int(await backend(spec, lambda t=None: marks.append(t or time.perf_counter())))
            except Exception as err:  # reported per request; the run goes on
                res.error = f"{type(err).__name__}: {err}"
            end = time.perf_counter()
        last_end = max(last_end, end)
        res.e2e = end - start
        res.num_chunks = len(marks)
        if marks:
            res.ttft = marks[0] - start
            res.itl = [b - a for a, b in zip(marks, marks[1:])]
        elif res.error is None:
            res.ttft = res.e2e
        bar.update(1)

    try:
        await asyncio.gather(*(one(s, a, r) for s, a, r in zip(specs, arrivals, results)))
    finally:
        bar.close()
    return RunResult(backend.name, concurrency, offered_rate(arrivals), last_end - t0, results)


# ---- the OpenAI-API backend ------------------------------------------------------------


def _chunk_has_token(choice: dict) -> bool | None:
    """True if a completion chunk carries a token, None if it may only close the stream.

    A chunk with text or token ids carries one; so does a textless chunk
    before the end (a checkpoint without a tokenizer streams empty text). A
    textless chunk with a finish_reason is either the last token's or a
    closing chunk: the usage block decides (see OpenAIBackend).
    """
    if choice.get("text") or choice.get("token_ids"):
        return True
    return True if choice.get("finish_reason") is None else None


class OpenAIBackend:
    """Streams ``POST {url}/v1/completions`` with token-id prompts and counts tokens from the usage block."""

    name = "http"

    def __init__(self, url: str, model: str, max_connections: int = 256, timeout_s: float = 600.0, name: str = "http"):
        import httpx

        self.url = url.rstrip("/") + "/v1/completions"
        self.model, self.name = model, name
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s, connect=30.0),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            trust_env=False,  # never route localhost through a proxy from the environment
        )

    async def __call__(self, spec: RequestSpec, mark: Mark) -> int:
        body = {
            "model": self.model,
            "prompt": spec.prompt_ids,
            "max_tokens": spec.output_len,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        usage, marks, closing = None, 0, None
        async with self.client.stream("POST", self.url, json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                raise BenchError(f"HTTP {resp.status_code}: {text[:300]}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise BenchError(f"error in stream: {chunk['error']}")
                choices = chunk.get("choices") or []
                if choices:
                    has = _chunk_has_token(choices[0])
                    if has:
                        mark()
                        marks += 1
                    elif has is None:
                        closing = time.perf_counter()
                if chunk.get("usage"):
                    usage = chunk["usage"]
        if usage is None or "completion_tokens" not in usage:
            raise BenchError("the stream ended without a usage block (is stream_options.include_usage honoured?)")
        tokens = int(usage["completion_tokens"])
        if closing is not None and marks < tokens:  # the textless last chunk carried the last token
            mark(closing)
        return tokens

    async def get_json(self, path: str) -> dict:
        resp = await self.client.get(self.url.rsplit("/v1/", 1)[0] + path)
        resp.raise_for_status()
        return resp.json()

    async def aclose(self) -> None:
        await self.client.aclose()


async def warm_up(backend: Backend, vocab_size: int, n: int = 2) -> None:
    """A few short requests so first-call costs (threads, allocations, connections) stay out of the numbers."""
    specs = make_workload(n, (16, 32), (4, 4), vocab_size, seed=12345)
    results = await run_load(backend, specs, [0.0] * n, n, progress=False)
    failed = [r.error for r in results.requests if r.error]
    if failed:
        raise BenchError(f"{backend.name}: warm-up request failed: {failed[0]}")
