"""The OpenAI API as served: request, response and streaming-chunk models.

Field names, defaults and response shapes follow OpenAI's API reference
(https://platform.openai.com/docs/api-reference) and vLLM's OpenAI server,
including vLLM's sampling extensions `top_k` and `ignore_eos`. Request
models ignore unknown fields (as vLLM does), so newer clients keep working;
fields we accept but cannot honour are rejected by `unsupported()` with a
400 that names them, instead of being silently dropped.

Errors are `APIError`s carrying OpenAI's error body; `parse_body` turns raw
request bytes into a request model, so that a body that is not UTF-8, not
JSON or not valid is a 400 whose `param` names the field.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

M = TypeVar("M", bound=BaseModel)

# ---- errors ------------------------------------------------------------------------


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""

    error: ErrorInfo


class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param,
                                             code=self.code)).model_dump()


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def not_ready(message: str) -> APIError:
    return APIError(503, message, "server_error", None, "engine_not_ready")


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


def parse_body(raw: bytes, model: type[M]) -> M:
    """A request body -> `model`; anything wrong (not UTF-8, not JSON, not valid) is a 400 APIError."""
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


# ---- requests ----------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = Field(default=False, description="Send a last chunk with empty choices and the usage.")


class _SamplingFields(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(default=None, description="The served model's name (see GET /v1/models).")
    n: int = Field(default=1, description="Choices per prompt; only 1 is supported.")
    stream: bool = Field(default=False, description="Stream the answer as server-sent events.")
    stream_options: StreamOptions | None = Field(default=None, description="Streaming options (include_usage).")
    temperature: float | None = Field(default=None, ge=0.0, description="Sampling temperature; 0 is greedy. Default 1.")
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, description="Nucleus sampling mass. Default 1.")
    top_k: int | None = Field(default=None, ge=-1, description="vLLM extension: keep the k likeliest tokens; -1 (or 0) keeps all.")
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64, description="Seed for reproducible sampling.")
    stop: str | list[str] | None = Field(default=None, description="Up to any number of strings that end the answer.")
    ignore_eos: bool = Field(default=False, description="vLLM extension: keep generating past the end-of-sequence token.")
    # Accepted for compatibility; only their neutral values are allowed (see unsupported()).
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def _unsupported_common(self) -> list[tuple[str, str]]:
        out = []
        if self.n != 1:
            out.append(("n", f"n={self.n} is not supported; only n=1"))
        if self.presence_penalty:
            out.append(("presence_penalty", "presence_penalty is not supported"))
        if self.frequency_penalty:
            out.append(("frequency_penalty", "frequency_penalty is not supported"))
        if self.logit_bias:
            out.append(("logit_bias", "logit_bias is not supported"))
        return out

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


Prompt = str | list[int] | list[str] | list[list[int]]


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    prompt: Prompt = Field(description="A string, a list of token ids, or a list of either (one choice per prompt).")
    max_tokens: int | None = Field(default=16, ge=1, description="Most tokens to generate (OpenAI's default is 16).")
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        out = self._unsupported_common()
        if self.echo:
            out.append(("echo", "echo is not supported"))
        if self.logprobs is not None:
            out.append(("logprobs", "logprobs is not supported"))
        if self.best_of not in (None, 1):
            out.append(("best_of", f"best_of={self.best_of} is not supported; only 1"))
        if self.suffix:
            out.append(("suffix", "suffix is not supported"))
        return out


class TextContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    # OpenAI's roles; the chat template may accept fewer (tiny: system, user, assistant) and says so.
    role: Literal["system", "developer", "user", "assistant", "tool", "function"] = Field(
        description="Who wrote the message; the model's chat template decides which roles it accepts."
    )
    content: str | list[TextContentPart] | None = Field(default=None, description="Text, or a list of text parts.")
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far; at least one message.")
    max_tokens: int | None = Field(default=None, ge=1, description="Deprecated by OpenAI in favour of max_completion_tokens.")
    max_completion_tokens: int | None = Field(default=None, ge=1, description="Most tokens to generate; default: up to max_model_len.")
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        out = self._unsupported_common()
        if self.logprobs or self.top_logprobs:
            out.append(("logprobs", "logprobs is not supported"))
        if self.tools:
            out.append(("tools", "tools are not supported"))
        if self.response_format and self.response_format.get("type", "text") != "text":
            out.append(("response_format", "only response_format {'type': 'text'} is supported"))
        return out

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ---- responses ---------------------------------------------------------------------


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class _Choice(BaseModel):
    index: int
    logprobs: None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # vLLM: the stop string or token id that ended it


class _Response(BaseModel):
    """What every completion object and chunk carries besides its `object` name and choices."""

    id: str
    created: int
    model: str
    system_fingerprint: str | None = None


class CompletionChoice(_Choice):
    text: str


class CompletionResponse(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: UsageInfo


class CompletionStreamResponse(_Response):
    """One SSE chunk of a streamed completion (OpenAI uses the same object name as non-streaming)."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: str | None = None


class ChatChoice(_Choice):
    message: AssistantMessage


class ChatCompletionResponse(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatStreamChoice(_Choice):
    delta: DeltaMessage


class ChatCompletionStreamResponse(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "raytp"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
