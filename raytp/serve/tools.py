"""Tool calls: the grammar that forces them, and reading them out of a model's answer (whole or streamed).

- `tool_choice` "required": the answer is a JSON array of calls, each
  `{"name": <one of the tools>, "parameters": <its arguments>}` (Llama 3.1's
  JSON call, and vLLM's format for required), forced by a grammar built
  from every function's parameter schema.
- A named function: the answer is the arguments object alone, forced by the
  function's parameter schema (as in vLLM); the call's name is the one named.
- "auto": the model decides; its calls are parsed from its text in its
  family's format, chosen by its chat template: Hermes / Qwen
  `<tool_call>{"name": ..., "arguments": ...}</tool_call>` blocks (text
  before the first block is the content), or Llama 3.1 JSON calls
  (`{"name": ..., "parameters": ...}`, several joined by `;`, the whole answer).
  Text that does not parse as calls is content.

Streaming follows OpenAI: a call's first delta carries its index, id, type
and name, later ones fragments of its arguments. A named call streams its
arguments as they are generated; the other modes hold back what may be a
call until it is complete, then send each call in one delta.
"""
from __future__ import annotations

import json
import re
import uuid
from typing import Any

from raytp.serve.protocol import (
    ChatTool,
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCall,
    NamedToolChoice,
    ToolCall,
)
from raytp.engine.structured import StructuredOutputs

# A function without parameters takes the empty object (nothing else: a model must not invent arguments).
_NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _parameters(tool: ChatTool) -> dict[str, Any]:
    return tool.function.parameters or _NO_PARAMETERS


def forced_call_grammar(tools: list[ChatTool], choice: str | NamedToolChoice, parallel: bool = True) -> StructuredOutputs:
    """The grammar of a required or named call (see the module's docstring for the two shapes); `parallel`
    false (parallel_tool_calls): required makes exactly one call."""
    if isinstance(choice, NamedToolChoice):
        tool = next(t for t in tools if t.function.name == choice.function.name)
        return StructuredOutputs(json_schema=_parameters(tool))
    calls = [{"type": "object", "properties": {"name": {"const": t.function.name}, "parameters": _parameters(t)},
              "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
    array = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    return StructuredOutputs(json_schema=array if parallel else {**array, "maxItems": 1})


def _call(name: str, arguments: Any) -> ToolCall:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return ToolCall(id=call_id(), function=FunctionCall(name=name, arguments=text))


def _json_calls(items: list[Any], arguments_keys: tuple[str, ...]) -> list[ToolCall] | None:
    """JSON call objects -> ToolCalls; None unless every item is {"name": str, <an arguments key>: object}."""
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        key = next((k for k in arguments_keys if k in item), None)
        if key is None:
            return None
        calls.append(_call(item["name"], item[key]))
    return calls


class HermesParser:
    """Hermes / Qwen: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks after optional text."""

    marker = "<tool_call>"
    anywhere = True  # calls may follow content
    _block = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        start = text.find(self.marker)
        if start < 0:
            return text, []
        try:
            items = [json.loads(body) for body in self._block.findall(text[start:])]
        except ValueError:
            return text, []
        calls = _json_calls(items, ("arguments", "parameters"))
        if not calls:
            return text, []
        return text[:start].strip() or None, calls


class Llama3JsonParser:
    """Llama 3.1 / 3.2 JSON calls: the whole answer is `{"name": ..., "parameters": {...}}` (several joined by
    `;`), possibly after `<|python_tag|>`."""

    marker = "{"
    anywhere = False  # a call is the whole answer
    _tag = "<|python_tag|>"

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        body = text.strip()
        body = body[len(self._tag):].lstrip() if body.startswith(self._tag) else body
        if not body.startswith("{"):
            return text, []
        try:
            items = [json.loads(part) for part in body.split(";") if part.strip()]
        except ValueError:
            return text, []
        calls = _json_calls(items, ("parameters", "arguments"))
        return (None, calls) if calls else (text, [])


def parser_for(chat_template: str | None) -> HermesParser | Llama3JsonParser:
    """The model family's call format, read off its chat template (Hermes / Qwen templates write <tool_call>)."""
    return HermesParser() if chat_template and "<tool_call>" in chat_template else Llama3JsonParser()


class ToolCallReader:
    """One choice's tool calls under a tool_choice: from its whole text, or from its streamed text deltas."""

    def __init__(self, choice: str | NamedToolChoice, parser: HermesParser | Llama3JsonParser):
        self.choice, self.parser = choice, parser
        self._held = ""  # streamed text not sent yet: it may be (the start of) a call
        self._calling = False  # the stream has reached a call: everything from here is held to the end
        self._named_id: str | None = None
        self.called = False  # the stream has sent a call

    def final(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a whole answer."""
        if isinstance(self.choice, NamedToolChoice):
            return None, [_call(self.choice.function.name, text)]
        if self.choice == "required":
            try:
                items = json.loads(text)
            except ValueError:  # cut short (finish_reason "length"): no complete calls
                return text, []
            return None, _json_calls(items, ("parameters",)) or []
        return self.parser.parse(text)

    def delta(self, text: str, finished: bool) -> tuple[str | None, list[DeltaToolCall]]:
        """(content, call deltas) to stream for the next text delta of the answer."""
        if isinstance(self.choice, NamedToolChoice):
            self.called = True
            return None, [self._named_delta(text)] if text or self._named_id is None else []
        self._held += text
        released = self._release_content() if self.choice == "auto" and not self._calling else None
        if not finished:
            return released, []
        content, calls = self.final(self._held)
        self._held = ""
        content = (released or "") + (content or "") or None
        self.called = bool(calls)
        deltas = [DeltaToolCall(index=i, id=c.id, type="function",
                                function=DeltaFunctionCall(name=c.function.name, arguments=c.function.arguments))
                  for i, c in enumerate(calls)]
        return content, deltas

    def _named_delta(self, text: str) -> DeltaToolCall:
        if self._named_id is None:
            self._named_id = call_id()
            return DeltaToolCall(index=0, id=self._named_id, type="function",
                                 function=DeltaFunctionCall(name=self.choice.function.name, arguments=text))
        return DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=text))

    def _release_content(self) -> str | None:
        """Auto mode before any call: send the held text that cannot be part of a call as content."""
        marker, held = self.parser.marker, self._held
        if self.parser.anywhere:
            at = held.find(marker)
            if at >= 0:
                self._calling = True
                out, self._held = held[:at], held[at:]
                return out or None
            # Hold back a tail that may be the start of the marker.
            keep = next((n for n in range(min(len(marker) - 1, len(held)), 0, -1) if marker.startswith(held[-n:])), 0)
            out, self._held = held[: len(held) - keep], held[len(held) - keep:]
            return out or None
        stripped = held.lstrip()
        if not stripped:
            return None  # only blanks so far: a call may still start
        if stripped.startswith(marker) or "<|python_tag|>".startswith(stripped[:14]):
            self._calling = True
            return None
        self._held = ""
        return held
