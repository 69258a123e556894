"""The OpenAI-compatible HTTP API (FastAPI), given a way to reach the engine.

`build_api(get_engine)` returns the FastAPI app. It does not know about Ray
Serve: `get_engine()` returns the replica's AsyncEngine (or None while it is
being built), so the same app can run under Serve (raytp.serve.app) or any
ASGI server around an engine.

Errors always use OpenAI's body `{"error": {"message", "type", "param",
"code"}}`: 400 for bad input (request bodies are parsed here, not by FastAPI,
so that bodies that are not UTF-8 or not JSON get the same answer), 404 for
an unknown model or path, 503 while the engine is not ready, 500 for a bug.
"""
from __future__ import annotations

import asyncio
import json
import logging
from contextlib import aclosing
from typing import TYPE_CHECKING, AsyncIterator, Callable, TypeVar

import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from raytp.outputs import RequestOutput
from raytp.sampling import SamplingParams
from raytp.serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    ChatStreamChoice,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    DeltaMessage,
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
    UsageInfo,
    now,
    random_id,
)

if TYPE_CHECKING:
    from raytp.engine import AsyncEngine

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
_SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos")


class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param,
                                             code=self.code)).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def not_ready(message: str) -> APIError:
    return APIError(503, message, "server_error", None, "engine_not_ready")


# ---- parsing -------------------------------------------------------------------------


def _loc(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or None


def validation_error(errors: list[dict]) -> APIError:
    """pydantic errors -> one 400 whose param names the (first) bad field."""
    parts, param = [], None
    for e in errors:
        field = _loc(tuple(e.get("loc", ())))
        param = param or field
        got = e.get("input")
        shown = f" (got {got!r})" if field and isinstance(got, (str, int, float, bool)) and len(repr(got)) <= 80 else ""
        parts.append(f"{field or 'body'}: {e.get('msg')}{shown}")
    return bad_request("invalid request: " + "; ".join(parts), param)


async def parse_body(request: Request, model: type[M]) -> M:
    raw = await request.body()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise bad_request(f"the request body is not valid UTF-8 ({err.reason} at byte {err.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise bad_request(f"the request body is not valid JSON: {err.msg} (line {err.lineno} column {err.colno})") from None
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise validation_error(err.errors(include_url=False)) from None


def sampling_params(req, max_tokens: int) -> SamplingParams:
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=-1 if req.top_k in (None, 0) else req.top_k,
            seed=req.seed,
            stop=req.stop or [],
            ignore_eos=req.ignore_eos,
        )
    except ValueError as err:  # SamplingParams' messages start with the field's name
        first = str(err).split(" ", 1)[0]
        raise bad_request(str(err), first if first in _SAMPLING_FIELDS else None) from None


# ---- running requests ----------------------------------------------------------------


async def start_requests(engine: AsyncEngine, prompts: list[list[int]], params: SamplingParams,
                         base_id: str) -> list[tuple[AsyncIterator[RequestOutput], RequestOutput]]:
    """Admit every prompt and wait for its first output; all-or-nothing.

    The engine validates a request when its generator first runs, so bad
    input raises here, before any response has been sent. Closing a
    generator (or cancelling the task that iterates it) aborts its request.
    """
    gens = [engine.generate(ids, params, f"{base_id}-{i}") for i, ids in enumerate(prompts)]
    try:
        firsts = await asyncio.gather(*(g.__anext__() for g in gens), return_exceptions=True)
    except BaseException:
        await _close_all(gens)
        raise
    errors = [r for r in firsts if isinstance(r, BaseException)]
    if errors:
        await _close_all(gens)
        raise errors[0]
    return list(zip(gens, firsts))


async def _close_all(gens) -> None:
    await asyncio.gather(*(g.aclose() for g in gens), return_exceptions=True)


async def merge(started) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave the outputs of started requests as they come: (prompt index, output).

    Closing this generator (or cancelling its consumer) cancels the pumps,
    which closes the engine's generators: their requests are aborted.
    """
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i, gen, first):
        try:
            queue.put_nowait((i, first))
            if not first.finished:
                async for out in gen:
                    queue.put_nowait((i, out))
        except Exception as err:
            queue.put_nowait((i, err))
        finally:
            await gen.aclose()
            queue.put_nowait((i, done))

    tasks = [asyncio.ensure_future(pump(i, g, first)) for i, (g, first) in enumerate(started)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def sse_events(request: Request, rid: str, started, render: Callable[[int, RequestOutput], str],
                     usage: Callable[[int], str | None], head: str | None = None) -> AsyncIterator[str]:
    """The SSE body of a streamed answer: chunks as outputs arrive, the usage chunk, then [DONE].

    A client that goes away aborts its requests: Starlette cancels this
    generator (or the check between chunks sees it), and closing the merged
    stream closes the engine's generators, which frees the KV blocks.
    """
    generated = [0] * len(started)
    try:
        if head is not None:
            yield head
        async with aclosing(merge(started)) as stream:
            async for i, out in stream:
                generated[i] = len(out.outputs[0].token_ids)
                if out.delta_text or out.finished:
                    yield render(i, out)
                if await request.is_disconnected():
                    log.info("client went away: aborting %s", rid)
                    return
        tail = usage(sum(generated))
        if tail is not None:
            yield tail
    except Exception as err:
        yield _stream_error(err)
    yield sse("[DONE]")


async def collect(started) -> list[RequestOutput]:
    """Run started requests to the end; returns each one's final output."""
    finals = [first for _, first in started]
    async with aclosing(merge(started)) as stream:
        async for i, out in stream:
            finals[i] = out
    return finals


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def _stream_error(err: BaseException) -> str:
    log.exception("request failed while streaming", exc_info=err)
    return sse(APIError(500, f"generation failed: {err}", "server_error").body())


# ---- the endpoints -------------------------------------------------------------------


class OpenAIServing:
    """The endpoint logic; `get_engine()` gives the engine (None while it is being built)."""

    def __init__(self, get_engine: Callable[[], AsyncEngine | None]):
        self._get_engine = get_engine

    def engine(self, model: str | None = None, require_ready: bool = True) -> AsyncEngine:
        engine = self._get_engine()
        if engine is None:
            raise not_ready("the model is still loading")
        if model is not None and model != engine.model_name:
            raise APIError(404, f"The model `{model}` does not exist. This server serves `{engine.model_name}`.",
                           "invalid_request_error", "model", "model_not_found")
        if require_ready and not engine.ready:
            raise not_ready("the tensor-parallel group is starting or recovering; retry shortly")
        return engine

    async def models(self, name: str | None = None) -> dict:
        """GET /v1/models (the list) or GET /v1/models/{name} (one card; 404 for another name)."""
        engine = self.engine(name, require_ready=False)
        card = ModelCard(id=engine.model_name, created=now(), root=engine.config.model,
                         max_model_len=engine.max_model_len)
        return card.model_dump() if name is not None else ModelList(data=[card]).model_dump()

    async def health(self) -> Response:
        from raytp.engine import EngineNotReady

        engine = self.engine(require_ready=False)
        try:
            await engine.check_health()
        except EngineNotReady as err:
            raise not_ready(str(err)) from None
        return Response(status_code=200)

    # -- helpers shared by both endpoints

    @staticmethod
    def _check_supported(req) -> None:
        for param, message in req.unsupported():
            raise bad_request(message, param)

    @staticmethod
    def _max_tokens(engine: AsyncEngine, prompt_lens: list[int], requested: int | None, prompt_param: str) -> int:
        limit = engine.max_model_len
        longest = max(prompt_lens)
        if longest >= limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens; the prompt has {longest} tokens, which "
                f"leaves no room to generate.", prompt_param, "context_length_exceeded")
        if requested is None:  # vLLM: whatever room is left
            return limit - longest
        if longest + requested > limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{longest + requested} tokens ({longest} in the prompt, {requested} for the completion). "
                f"Reduce the prompt or max_tokens.", "max_tokens", "context_length_exceeded")
        return requested

    @staticmethod
    async def _start(engine, prompts, params, base_id, param: str):
        from raytp.engine import EngineNotReady

        try:
            return await start_requests(engine, prompts, params, base_id)
        except EngineNotReady as err:
            raise not_ready(str(err)) from None
        except ValueError as err:  # the engine's checks of the prompt (token ids, length)
            raise bad_request(str(err), param) from None

    # -- POST /v1/completions

    def _completion_prompts(self, engine: AsyncEngine, prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            items = [prompt]
        elif prompt and isinstance(prompt[0], int):
            items = [prompt]
        else:
            items = list(prompt)
        if not items:
            raise bad_request("prompt must not be empty", "prompt")
        out = []
        for item in items:
            if isinstance(item, str):
                if engine.tokenizer is None:
                    raise bad_request("this model has no tokenizer: send the prompt as token ids", "prompt")
                ids = engine.tokenizer.encode(item, add_special_tokens=True)
            else:
                ids = list(item)
            if not ids:
                raise bad_request("prompt must not be empty", "prompt")
            out.append(ids)
        return out

    async def completions(self, request: Request) -> Response:
        req = await parse_body(request, CompletionRequest)
        engine = self.engine(req.model)
        self._check_supported(req)
        prompts = self._completion_prompts(engine, req.prompt)
        max_tokens = self._max_tokens(engine, [len(p) for p in prompts], req.max_tokens, "prompt")
        params = sampling_params(req, max_tokens)
        rid, created, model = random_id("cmpl"), now(), engine.model_name
        started = await self._start(engine, prompts, params, rid, "prompt")
        prompt_tokens = sum(len(p) for p in prompts)

        if not req.stream:
            finals = await collect(started)
            choices = [CompletionChoice(index=i, text=o.outputs[0].text, finish_reason=o.outputs[0].finish_reason,
                                        stop_reason=o.outputs[0].stop_reason) for i, o in enumerate(finals)]
            completion_tokens = sum(len(o.outputs[0].token_ids) for o in finals)
            usage = UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                              total_tokens=prompt_tokens + completion_tokens)
            return JSONResponse(CompletionResponse(id=rid, created=created, model=model, choices=choices,
                                                   usage=usage).model_dump())

        include_usage = req.include_usage

        def chunk(choices, usage=None) -> str:
            body = CompletionStreamResponse(id=rid, created=created, model=model, choices=choices, usage=usage)
            return sse(body.model_dump(exclude={"usage"} if not include_usage else None))

        def render(i: int, out: RequestOutput) -> str:
            c = out.outputs[0]
            return chunk([CompletionChoice(index=i, text=out.delta_text, finish_reason=c.finish_reason,
                                           stop_reason=c.stop_reason)])

        def usage(generated: int) -> str | None:
            if not include_usage:
                return None
            return chunk([], UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=generated,
                                       total_tokens=prompt_tokens + generated))

        return StreamingResponse(sse_events(request, rid, started, render, usage), media_type="text/event-stream")

    # -- POST /v1/chat/completions

    async def chat_completions(self, request: Request) -> Response:
        req = await parse_body(request, ChatCompletionRequest)
        engine = self.engine(req.model)
        self._check_supported(req)
        if engine.tokenizer is None:
            raise bad_request("this model has no tokenizer, so no chat template: use /v1/completions with token ids",
                              "messages")
        messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in req.messages]
        try:
            text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except (ValueError, jinja2.TemplateError) as err:  # unknown role, no template, the template's own checks
            raise bad_request(f"the chat template rejected the messages: {err}", "messages") from None
        ids = engine.tokenizer.encode(text, add_special_tokens=False)  # the template emits BOS itself
        max_tokens = self._max_tokens(engine, [len(ids)], req.requested_max_tokens, "messages")
        params = sampling_params(req, max_tokens)
        rid, created, model = random_id("chatcmpl"), now(), engine.model_name
        started = await self._start(engine, [ids], params, rid, "messages")
        prompt_tokens = len(ids)

        if not req.stream:
            (final,) = await collect(started)
            c = final.outputs[0]
            usage = UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=len(c.token_ids),
                              total_tokens=prompt_tokens + len(c.token_ids))
            choice = ChatChoice(index=0, message=AssistantMessage(content=c.text), finish_reason=c.finish_reason,
                                stop_reason=c.stop_reason)
            return JSONResponse(ChatCompletionResponse(id=rid, created=created, model=model, choices=[choice],
                                                       usage=usage).model_dump())

        include_usage = req.include_usage

        def chunk(choices, usage=None) -> str:
            body = ChatCompletionStreamResponse(id=rid, created=created, model=model, choices=choices, usage=usage)
            data = body.model_dump(exclude={"usage"} if not include_usage else None)
            for ch in data["choices"]:  # deltas carry only what changed (OpenAI's shape)
                ch["delta"] = {k: v for k, v in ch["delta"].items() if v is not None}
            return sse(data)

        def render(i: int, out: RequestOutput) -> str:
            c = out.outputs[0]
            delta = DeltaMessage(content=out.delta_text or None)
            return chunk([ChatStreamChoice(index=i, delta=delta, finish_reason=c.finish_reason, stop_reason=c.stop_reason)])

        def usage(generated: int) -> str | None:
            if not include_usage:
                return None
            return chunk([], UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=generated,
                                       total_tokens=prompt_tokens + generated))

        # OpenAI's first chunk carries the role.
        head = chunk([ChatStreamChoice(index=0, delta=DeltaMessage(role="assistant", content=""))])
        return StreamingResponse(sse_events(request, rid, started, render, usage, head), media_type="text/event-stream")


# ---- the app -------------------------------------------------------------------------


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves in OpenAI's body; none of them changes what the next request gets."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        if err.status >= 500:
            log.warning("%s %s -> %d: %s", request.method, request.url.path, err.status, err.message)
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, err: RequestValidationError):
        return validation_error(list(err.errors())).response()

    @app.exception_handler(json.JSONDecodeError)
    async def _json(request: Request, err: json.JSONDecodeError):
        return bad_request(f"the request body is not valid JSON: {err.msg}").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        kind = "invalid_request_error" if err.status_code < 500 else "server_error"
        return APIError(err.status_code, str(err.detail), kind, None, code).response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, err: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return APIError(500, f"internal error: {type(err).__name__}: {err}", "server_error").response()


def build_api(get_engine: Callable[[], AsyncEngine | None]) -> FastAPI:
    app = FastAPI(title="raytp", description="OpenAI-compatible API of a raytp tensor-parallel replica.")
    install_error_handlers(app)
    serving = OpenAIServing(get_engine)
    app.state.serving = serving

    @app.get("/health")
    async def health() -> Response:
        """200 only when the TP group can run a step; 503 otherwise."""
        return await serving.health()

    @app.get("/v1/models")
    async def list_models():
        return await serving.models()

    @app.get("/v1/models/{model:path}")
    async def retrieve_model(model: str):
        return await serving.models(model)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await serving.completions(request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await serving.chat_completions(request)

    return app
