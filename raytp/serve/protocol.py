"""The OpenAI API as served: request, response and streaming-chunk models.

Field names, defaults and response shapes follow OpenAI's API reference
(https://platform.openai.com/docs/api-reference) and vLLM's OpenAI server,
including vLLM's extensions (`top_k`, `ignore_eos`, `min_tokens`,
`repetition_penalty`, `stop_token_ids`, `return_token_ids`, /tokenize). Request
models ignore unknown fields (as vLLM does), so newer clients keep working;
fields we accept but cannot honour are rejected by `unsupported()` with a
400 that names them, instead of being silently dropped.

The request models are FastAPI's body types (so /openapi.json and /docs show
them, with examples). Errors are `APIError`s carrying OpenAI's error body;
`validation_error` turns FastAPI's validation errors into a 400 whose
`param` names the field.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

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
        self.headers: dict[str, str] = {}

    def body(self) -> dict:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param,
                                             code=self.code)).model_dump()


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def too_many_requests(message: str, retry_after_s: int = 1) -> APIError:
    err = APIError(429, message, "rate_limit_error", None, "too_many_requests")
    err.headers = {"Retry-After": str(retry_after_s)}
    return err


def not_ready(message: str) -> APIError:
    return APIError(503, message, "server_error", None, "engine_not_ready")


def _loc(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or None


def validation_error(errors: list[dict]) -> APIError:
    """pydantic errors -> one 400 whose param names the (first) bad field."""
    parts, param = [], None
    for e in errors:
        if e.get("type") == "json_invalid":  # loc is a character offset, not a field
            return bad_request(f"the request body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}")
        field = _loc(tuple(e.get("loc", ())))
        param = param or field
        got = e.get("input")
        shown = f" (got {got!r})" if field and isinstance(got, (str, int, float, bool)) and len(repr(got)) <= 80 else ""
        parts.append(f"{field or 'body'}: {e.get('msg')}{shown}")
    return bad_request("invalid request: " + "; ".join(parts), param)


# ---- requests ----------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = Field(default=False, description="Send a last chunk with empty choices and the usage.")


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = Field(description="The schema's name.")
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema", description="A JSON schema.")
    strict: bool | None = Field(default=None, description="Always enforced here: the output follows the schema.")


class ResponseFormat(BaseModel):
    """OpenAI's response_format: text (no constraint), any JSON object, or JSON valid against a schema."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema object")
        return self


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = Field(default=None, description="A JSON schema of the arguments object.")
    strict: bool | None = None


class ChatTool(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"] = "function"
    function: FunctionDefinition


class FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    """tool_choice naming one function: the answer is a call of it."""

    type: Literal["function"] = "function"
    function: FunctionName


Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
Bias = Annotated[float, Field(ge=-100.0, le=100.0)]


class _SamplingFields(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(default=None, description="The served model's name (see GET /v1/models).")
    n: int = Field(default=1, ge=1, le=128, description="Choices per prompt. With a seed, choice i samples with "
                   "seed + i (as vLLM), so a seeded n > 1 is reproducible.")
    stream: bool = Field(default=False, description="Stream the answer as server-sent events.")
    stream_options: StreamOptions | None = Field(default=None, description="Streaming options (include_usage).")
    temperature: float | None = Field(default=None, ge=0.0, description="Sampling temperature; 0 is greedy. Default 1.")
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, description="Nucleus sampling mass. Default 1.")
    top_k: int | None = Field(default=None, ge=-1, description="vLLM extension: keep the k likeliest tokens; -1 (or 0) keeps all.")
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64, description="Seed for reproducible sampling.")
    stop: str | list[str] | None = Field(default=None, description="Up to any number of strings that end the answer.")
    stop_token_ids: list[int] | None = Field(default=None, description="vLLM extension: token ids that end the "
                                             "answer (the id is kept in token_ids, its text is not).")
    ignore_eos: bool = Field(default=False, description="vLLM extension: keep generating past the end-of-sequence token.")
    min_tokens: int = Field(default=0, ge=0, description="vLLM extension: end-of-sequence and stop_token_ids cannot "
                            "be sampled before this many tokens.")
    presence_penalty: Penalty | None = Field(default=None, description="Subtracted from the logit of every token "
                                             "already in the output. In [-2, 2].")
    frequency_penalty: Penalty | None = Field(default=None, description="Times each token's count in the output, "
                                              "subtracted from its logit. In [-2, 2].")
    repetition_penalty: float | None = Field(default=None, gt=0.0, description="vLLM extension: tokens of the prompt "
                                             "or output have positive logits divided by it, negative ones multiplied "
                                             "(1: off).")
    logit_bias: dict[str, Bias] | None = Field(default=None, description="Token id (as a string) -> bias in "
                                               "[-100, 100] added to its logit before sampling.")
    return_token_ids: bool = Field(default=False, description="vLLM extension: each choice carries its token_ids, "
                                   "the response its prompt_token_ids.")
    response_format: ResponseFormat | None = Field(default=None, description="`{\"type\": \"json_object\"}` or "
                                                   "`{\"type\": \"json_schema\", \"json_schema\": {\"name\", "
                                                   "\"schema\"}}`: the output is JSON (valid against the schema), "
                                                   "enforced token by token. On completions too, as in vLLM.")
    user: str | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


Prompt = str | list[int] | list[str] | list[list[int]]


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [
        {"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 16, "temperature": 0},
        {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 8, "n": 2, "seed": 7, "logprobs": 3,
         "echo": True, "presence_penalty": 0.5},
    ]})

    prompt: Prompt = Field(description="A string, a list of token ids, or a list of either (one choice per prompt).")
    max_tokens: int | None = Field(default=16, ge=1, description="Most tokens to generate (OpenAI's default is 16).")
    echo: bool = Field(default=False, description="Put the prompt before the completion in text (and, with "
                       "logprobs, the prompt tokens' logprobs first; the first prompt token's is null).")
    logprobs: int | None = Field(default=None, ge=0, le=20, description="Log probabilities of the chosen tokens "
                                 "plus the top N (0-20), from the model's distribution before temperature, "
                                 "penalties and bias.")
    best_of: int | None = None
    suffix: str | None = None

    def prompt_items(self) -> list[str | list[int]]:
        """The prompts, one per choice group: a string or a list of token ids each."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)

    def unsupported(self) -> list[tuple[str, str]]:
        out = []
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
    tool_calls: list[dict[str, Any]] | None = Field(default=None, description="An assistant's earlier tool calls.")
    tool_call_id: str | None = Field(default=None, description="A tool message: the call it answers.")

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def for_template(self) -> dict:
        out = {"role": self.role, "content": self.text()}
        for key in ("name", "tool_call_id"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.tool_calls:  # templates read the arguments as an object (HF's convention), OpenAI sends a string
            out["tool_calls"] = [_call_for_template(c) for c in self.tool_calls]
        return out


def _call_for_template(call: dict[str, Any]) -> dict[str, Any]:
    function = dict(call.get("function") or {})
    if isinstance(function.get("arguments"), str):
        try:
            function["arguments"] = json.loads(function["arguments"])
        except ValueError:
            pass  # not JSON: the template gets the string
    return {**call, "function": function}


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [
        {"model": "tiny", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 16},
        {"model": "tiny", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 8,
         "logprobs": True, "top_logprobs": 3, "stream": True, "stream_options": {"include_usage": True}},
    ]})

    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far; at least one message.")
    max_tokens: int | None = Field(default=None, ge=1, description="Deprecated by OpenAI in favour of max_completion_tokens.")
    max_completion_tokens: int | None = Field(default=None, ge=1, description="Most tokens to generate; default: up to max_model_len.")
    logprobs: bool = Field(default=False, description="Return the log probability of each output token, from the "
                           "model's distribution before temperature, penalties and bias.")
    top_logprobs: int | None = Field(default=None, ge=0, le=20, description="With logprobs: also the N likeliest "
                                     "tokens at each position (0-20).")
    tools: list[ChatTool] | None = Field(default=None, description="Functions the model may call; passed to the "
                                         "chat template as `tools`.")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        default=None, description="none: no calls; auto (the default with tools): the model decides, its calls are "
        "parsed from its output; required: one or more calls, forced by a grammar; a named function: one call of it.")
    parallel_tool_calls: bool | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        out = []
        if self.top_logprobs and not self.logprobs:
            out.append(("top_logprobs", "top_logprobs needs logprobs: true"))
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            out.append(("tool_choice", "tool_choice needs tools"))
        names = {t.function.name for t in self.tools or []}
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            out.append(("tool_choice", f"tool_choice names the function {self.tool_choice.function.name!r}, which "
                        f"is not among the tools ({', '.join(sorted(names))})"))
        if self.forces_tool_call and self.response_format is not None and self.response_format.type != "text":
            out.append(("response_format", "response_format cannot be combined with a forced tool call"))
        return out

    @property
    def effective_tool_choice(self) -> str | NamedToolChoice:
        """OpenAI's default: auto with tools, none without."""
        if not self.tools:
            return "none"
        return self.tool_choice if self.tool_choice is not None else "auto"

    @property
    def forces_tool_call(self) -> bool:
        return self.effective_tool_choice not in ("none", "auto")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(BaseModel):
    """POST /tokenize (vLLM's shape): a `prompt`, or chat `messages` rendered by the chat template."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [
        {"model": "tiny", "prompt": "Hello world"},
        {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "return_token_strs": True},
    ]})

    model: str | None = Field(default=None, description="The served model's name.")
    prompt: str | None = Field(default=None, description="Text to tokenize (or send messages instead).")
    messages: list[ChatMessage] | None = Field(default=None, min_length=1,
                                               description="A chat to render with the chat template, then tokenize.")
    add_special_tokens: bool | None = Field(default=None, description="Add the tokenizer's special tokens (BOS). "
                                            "Default: true for a prompt, false for messages (the template adds them).")
    add_generation_prompt: bool = Field(default=True, description="Messages: end with the assistant's turn header.")
    return_token_strs: bool = Field(default=False, description="Also return each token's string.")

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send exactly one of prompt and messages")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    """POST /detokenize (vLLM's shape)."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [{"model": "tiny", "tokens": [1, 42, 7]}]})

    model: str | None = Field(default=None, description="The served model's name.")
    tokens: list[int] = Field(description="Token ids of this model.")


class DetokenizeResponse(BaseModel):
    prompt: str


# ---- responses ---------------------------------------------------------------------


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(BaseModel):
    """Completions' logprobs (OpenAI's legacy shape): one entry per token, in order."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)  # None: the first prompt token (echo)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)  # where each token's text starts in the choice's text


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobToken(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatLogprobToken] | None = None


class _Choice(BaseModel):
    index: int
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # vLLM: the stop string or token id that ended it
    token_ids: list[int] | None = None  # vLLM's return_token_ids: this choice's (new) token ids


class _Response(BaseModel):
    """What every completion object and chunk carries besides its `object` name and choices."""

    id: str
    created: int
    model: str
    system_fingerprint: str | None = None


class CompletionChoice(_Choice):
    text: str
    logprobs: CompletionLogprobs | None = None
    prompt_token_ids: list[int] | None = None  # vLLM's return_token_ids (the first chunk, when streamed)


class CompletionResponse(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: UsageInfo


class CompletionStreamResponse(_Response):
    """One SSE chunk of a streamed completion (OpenAI uses the same object name as non-streaming)."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatChoice(_Choice):
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_token_ids: list[int] | None = None  # vLLM's return_token_ids


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    """A streamed tool call's piece: the first carries id, type and name; the next ones argument fragments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatStreamChoice(_Choice):
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None


class ChatCompletionStreamResponse(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None
    prompt_token_ids: list[int] | None = None  # vLLM's return_token_ids (the first chunk)


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
