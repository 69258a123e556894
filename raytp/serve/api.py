"""The OpenAI-compatible HTTP API (FastAPI), given a way to reach the engine.

`build_api(get_engine)` returns the FastAPI app. It does not know about Ray
Serve: `get_engine()` returns the replica's AsyncEngine (or None while it is
being built), so the same app can run under Serve (raytp.serve.app) or any
ASGI server around an engine.

Request bodies are the pydantic models of protocol.py (so /openapi.json and
/docs describe them). Errors always use OpenAI's body `{"error": {"message",
"type", "param", "code"}}`: 400 for bad input (param names the field), 401
without the configured API key (guards.py), 404 for an unknown model or path,
429 past the queue cap, 503 while the engine is not ready, 500 for a bug.

A request with `n` choices over `p` prompts runs n * p engine requests;
choice `i * n + j` is prompt i's j-th, seeded with seed + j (as in vLLM).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from typing import TYPE_CHECKING, Callable

import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from raytp.outputs import RequestOutput
from raytp.sampling import SamplingParams
from raytp.serve.guards import ApiKeyGuard, ConfiguredCORS
from raytp.serve.choices import ChoiceRenderer, TokenStrings
from raytp.serve.streaming import collect, sse, sse_events, start_requests
from raytp.serve.tools import forced_call_grammar
from raytp.engine.structured import GrammarError, StructuredOutputs
from raytp.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    ChatMessage,
    ChatStreamChoice,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    DeltaMessage,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    UsageInfo,
    bad_request,
    not_ready,
    now,
    random_id,
    validation_error,
)

if TYPE_CHECKING:
    from raytp.engine.engine import AsyncEngine

log = logging.getLogger(__name__)

_PARAMS_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)} | {"stop_token_ids", "logit_bias"}


def _field_error(err: ValueError, default: str | None) -> APIError:
    """A ValueError whose message starts with a request field's name -> a 400 naming that field."""
    first = str(err).split(" ", 1)[0]
    return bad_request(str(err), first if first in _PARAMS_FIELDS else default)


def _logit_bias(req) -> dict[int, float]:
    bias = {}
    for key, value in (req.logit_bias or {}).items():
        try:
            bias[int(key)] = value
        except ValueError:
            raise bad_request(f"logit_bias keys must be token ids, got {key!r}", "logit_bias") from None
    return bias


def structured_outputs(req) -> tuple[StructuredOutputs | None, str | None]:
    """The grammar the request's answer must follow (a forced tool call's, or response_format's) and the field
    it comes from (named by a 400 when it does not compile)."""
    if isinstance(req, ChatCompletionRequest) and req.forces_tool_call:
        return forced_call_grammar(req.tools, req.effective_tool_choice, req.parallel_tool_calls is not False), "tools"
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return None, None
    if fmt.type == "json_object":
        return StructuredOutputs(json_object=True), "response_format"
    return StructuredOutputs(json_schema=fmt.json_schema.schema_), "response_format"


def sampling_params(req, max_tokens: int, structured: StructuredOutputs | None = None) -> SamplingParams:
    """The request's sampling fields (OpenAI's names, vLLM's extensions) -> SamplingParams."""
    logprobs = req.logprobs if isinstance(req, CompletionRequest) else (req.top_logprobs or 0) if req.logprobs else None
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=-1 if req.top_k in (None, 0) else req.top_k,
            seed=req.seed,
            stop=req.stop or [],
            stop_token_ids=req.stop_token_ids or [],
            ignore_eos=req.ignore_eos,
            min_tokens=req.min_tokens,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            logit_bias=_logit_bias(req),
            logprobs=logprobs,
            prompt_logprobs=logprobs if getattr(req, "echo", False) and logprobs is not None else None,
            structured_outputs=structured,
        )
    except ValueError as err:  # SamplingParams' messages start with the field's name
        raise _field_error(err, None) from None


def _without_none(fields: dict) -> dict:
    """A chat delta carries only what changed: no null fields, in its tool calls either."""
    return {k: _without_none(v) if isinstance(v, dict) else [_without_none(x) for x in v] if isinstance(v, list) else v
            for k, v in fields.items() if v is not None}


def per_choice(params: SamplingParams, n: int) -> list[SamplingParams]:
    """n choices of one prompt: choice j samples with seed + j (vLLM), so a seeded n > 1 is reproducible."""
    if params.seed is None:
        return [params] * n
    return [dataclasses.replace(params, seed=params.seed + j) for j in range(n)]


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
        if require_ready and engine.failed:
            raise not_ready(engine.failed)
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
        from raytp.engine.engine import EngineNotReady

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
    async def _start(engine, requests, base_id, param: str, grammar_param: str | None):
        from raytp.engine.engine import EngineNotReady

        try:
            return await start_requests(engine, requests, base_id)
        except EngineNotReady as err:
            raise not_ready(str(err)) from None
        except GrammarError as err:  # a malformed JSON schema
            raise bad_request(f"{grammar_param}: {err}", grammar_param) from None
        except ValueError as err:  # the engine's checks of the prompt (token ids, length) and of token id fields
            raise _field_error(err, param) from None

    # -- POST /v1/completions

    def _completion_prompts(self, engine: AsyncEngine, req: CompletionRequest) -> list[list[int]]:
        items = req.prompt_items()
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

    async def completions(self, req: CompletionRequest, request: Request) -> Response:
        engine = self.engine(req.model)
        self._check_supported(req)
        prompts = self._completion_prompts(engine, req)
        return await self._generate(request, req, engine, prompts, req.max_tokens, "prompt", chat=False)

    # -- POST /v1/chat/completions

    @staticmethod
    def _chat_text(engine: AsyncEngine, messages: list[ChatMessage], add_generation_prompt: bool = True,
                   tools: list[dict] | None = None) -> str:
        if engine.tokenizer is None:
            raise bad_request("this model has no tokenizer, so no chat template: use /v1/completions with token ids",
                              "messages")
        try:
            return engine.tokenizer.apply_chat_template([m.for_template() for m in messages], add_generation_prompt,
                                                        tools)
        except (ValueError, jinja2.TemplateError) as err:  # unknown role, no template, the template's own checks
            raise bad_request(f"the chat template rejected the messages: {err}", "messages") from None

    async def chat_completions(self, req: ChatCompletionRequest, request: Request) -> Response:
        engine = self.engine(req.model)
        self._check_supported(req)
        # With tool_choice none too (as vLLM by default): the model knows the tools, it just may not call them.
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        text = self._chat_text(engine, req.messages, tools=tools)
        ids = engine.tokenizer.encode(text, add_special_tokens=False)  # BOS: the template's
        return await self._generate(request, req, engine, [ids], req.requested_max_tokens, "messages", chat=True)

    # -- POST /tokenize, POST /detokenize (vLLM's)

    async def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        engine = self.engine(req.model, require_ready=False)
        if req.messages is not None:  # vLLM: special tokens off by default, the template writes them
            text = self._chat_text(engine, req.messages, req.add_generation_prompt)
            ids = engine.tokenizer.encode(text, add_special_tokens=bool(req.add_special_tokens))
        else:
            if engine.tokenizer is None:
                raise bad_request("this model has no tokenizer", "prompt")
            ids = engine.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens is not False)
        strings = TokenStrings(engine.tokenizer)
        return TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len, tokens=ids,
                                token_strs=[strings(t) for t in ids] if req.return_token_strs else None)

    async def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        engine = self.engine(req.model, require_ready=False)
        if engine.tokenizer is None:
            raise bad_request("this model has no tokenizer", "tokens")
        vocab = engine.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"tokens must be token ids in [0, {vocab}); got {bad[:5]}", "tokens")
        return DetokenizeResponse(prompt=engine.tokenizer.decode(req.tokens))

    # -- both: run the prompts, answer in one body or as server-sent events

    async def _generate(self, request: Request, req, engine: AsyncEngine, prompts: list[list[int]],
                        requested_max_tokens: int | None, prompt_param: str, chat: bool) -> Response:
        max_tokens = self._max_tokens(engine, [len(p) for p in prompts], requested_max_tokens, prompt_param)
        structured, grammar_param = structured_outputs(req)
        params = sampling_params(req, max_tokens, structured)
        choice_params = per_choice(params, req.n)
        runs = [(ids, p) for ids in prompts for p in choice_params]  # choice i * n + j
        rid, created, model = random_id("chatcmpl" if chat else "cmpl"), now(), engine.model_name
        started = await self._start(engine, runs, rid, prompt_param, grammar_param)
        prompt_tokens = sum(len(p) for p in prompts)
        render = ChoiceRenderer(engine.tokenizer, req, chat)

        def usage(generated: int) -> UsageInfo:
            return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=generated,
                             total_tokens=prompt_tokens + generated)

        if not req.stream:
            finals = await collect(started)
            choices = [render.final(i, out) for i, out in enumerate(finals)]
            generated = sum(len(out.outputs[0].token_ids) for out in finals)
            if chat:
                body = ChatCompletionResponse(id=rid, created=created, model=model, choices=choices,
                                              usage=usage(generated),
                                              prompt_token_ids=prompts[0] if req.return_token_ids else None)
            else:
                body = CompletionResponse(id=rid, created=created, model=model, choices=choices, usage=usage(generated))
            return JSONResponse(body.model_dump())

        include_usage = req.include_usage
        chunk_cls = ChatCompletionStreamResponse if chat else CompletionStreamResponse

        def chunk(choices: list, usage_info: UsageInfo | None = None, **extra) -> str:
            data = chunk_cls(id=rid, created=created, model=model, choices=choices, usage=usage_info, **extra).model_dump(
                exclude=None if include_usage else {"usage"})  # OpenAI: a usage field only with include_usage
            for ch in data["choices"]:
                if "delta" in ch:  # chat deltas carry only what changed
                    ch["delta"] = _without_none(ch["delta"])
            return sse(data)

        def tail(generated: int) -> str | None:
            return chunk([], usage(generated)) if include_usage else None

        # OpenAI's first chat chunk carries the role (one per choice).
        head = None
        if chat:
            head = chunk([ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                          for i in range(len(runs))], prompt_token_ids=prompts[0] if req.return_token_ids else None)
        return StreamingResponse(sse_events(request, rid, started, lambda i, out: chunk([render.delta(i, out)]),
                                            tail, head), media_type="text/event-stream")


# ---- the app -------------------------------------------------------------------------


def _respond(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves in OpenAI's body; none of them changes what the next request gets."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        if err.status >= 500:
            log.warning("%s %s -> %d: %s", request.method, request.url.path, err.status, err.message)
        return _respond(err)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, err: RequestValidationError):
        return _respond(validation_error(list(err.errors())))

    @app.exception_handler(json.JSONDecodeError)
    async def _json(request: Request, err: json.JSONDecodeError):
        return _respond(bad_request(f"the request body is not valid JSON: {err.msg}"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        kind = "invalid_request_error" if err.status_code < 500 else "server_error"
        return _respond(APIError(err.status_code, str(err.detail), kind, None, code))

    @app.exception_handler(Exception)
    async def _bug(request: Request, err: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return _respond(APIError(500, f"internal error: {type(err).__name__}: {err}", "server_error"))


def build_api(get_engine: Callable[[], AsyncEngine | None]) -> FastAPI:
    app = FastAPI(title="raytp", description="OpenAI-compatible API of a raytp tensor-parallel replica.")
    install_error_handlers(app)
    serving = OpenAIServing(get_engine)
    app.state.serving = serving

    def get_config():
        engine = get_engine()
        return engine.config if engine is not None else None

    # The last added runs first: CORS, then the key, then the routes.
    app.add_middleware(ApiKeyGuard, get_config=get_config)
    app.add_middleware(ConfiguredCORS, get_config=get_config)

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

    @app.post("/v1/completions", response_model=CompletionResponse)
    async def completions(body: CompletionRequest, request: Request):
        """OpenAI's completions; `stream: true` answers server-sent events of CompletionStreamResponse."""
        return await serving.completions(body, request)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        """OpenAI's chat completions; `stream: true` answers server-sent events of ChatCompletionStreamResponse."""
        return await serving.chat_completions(body, request)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        """vLLM's /tokenize: a prompt, or chat messages rendered by the chat template, to token ids."""
        return await serving.tokenize(body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        """vLLM's /detokenize: token ids to text."""
        return await serving.detokenize(body)

    return app
