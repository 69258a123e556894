"""Reading tool calls out of model text in the families' formats (tool_choice auto), whole and streamed, and the
tools reaching the chat template."""
from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer as HFTokenizer, models

from raytp.serve.protocol import ChatMessage, ChatTool
from raytp.serve.tools import HermesParser, Llama3JsonParser, ToolCallReader, parser_for
from raytp.engine.tokenizer import Tokenizer

TOOLS = [ChatTool.model_validate({"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}})]
HERMES = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
          '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>')
LLAMA = '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_weather", "parameters": {"city": "Oslo"}}'


def calls_of(calls) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in calls]


EXPECTED = [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Oslo"})]


def test_hermes_calls_after_content():
    content, calls = HermesParser().parse(HERMES)
    assert content == "Let me check." and calls_of(calls) == EXPECTED
    assert all(c.id.startswith("call_") for c in calls) and calls[0].id != calls[1].id


def test_llama3_json_calls():
    content, calls = Llama3JsonParser().parse(LLAMA)
    assert content is None and calls_of(calls) == EXPECTED
    assert calls_of(Llama3JsonParser().parse("<|python_tag|>" + LLAMA.split(";")[0])[1]) == EXPECTED[:1]


@pytest.mark.parametrize("parser,text", [
    (HermesParser(), "No call here, just <tool_ text."),
    (HermesParser(), "<tool_call>{not json}</tool_call>"),
    (Llama3JsonParser(), "The weather is fine."),
    (Llama3JsonParser(), '{"city": "Paris"}'),  # JSON, but not a call
])
def test_text_that_is_not_a_call_is_content(parser, text):
    assert parser.parse(text) == (text, [])


def test_the_template_picks_the_parser():
    assert isinstance(parser_for("...{{ '<tool_call>' }}..."), HermesParser)
    assert isinstance(parser_for("{{ '<|python_tag|>' }}"), Llama3JsonParser)
    assert isinstance(parser_for(None), Llama3JsonParser)


@pytest.mark.parametrize("parser,text", [(HermesParser(), HERMES), (Llama3JsonParser(), LLAMA)])
def test_auto_streams_content_then_each_call_whole(parser, text):
    """Streamed a few characters at a time: the content before a call goes out as it comes (never a piece of
    the call marker), the calls once the answer is complete, each with its id and name."""
    reader = ToolCallReader("auto", parser)
    pieces = [text[i:i + 3] for i in range(0, len(text), 3)]
    content, deltas = "", []
    for i, piece in enumerate(pieces):
        c, d = reader.delta(piece, i == len(pieces) - 1)
        content += c or ""
        deltas += d
    assert content == ("Let me check.\n" if isinstance(parser, HermesParser) else "")
    assert [(d.function.name, json.loads(d.function.arguments)) for d in deltas] == EXPECTED
    assert [d.index for d in deltas] == [0, 1] and all(d.id.startswith("call_") for d in deltas) and reader.called


def test_auto_streams_plain_text_as_content():
    reader = ToolCallReader("auto", HermesParser())
    out = [reader.delta(piece, last) for piece, last in (("Hello <", False), ("b>world", True))]
    assert "".join(c or "" for c, _ in out) == "Hello <b>world" and not any(d for _, d in out) and not reader.called


def test_the_chat_template_gets_the_tools():
    template = ("{% for t in tools %}[{{ t.function.name }}]{% endfor %}"
                "{% for m in messages %}{{ m.role }}:{{ m.content }}"
                "{% for c in m.tool_calls or [] %}->{{ c.function.name }}({{ c.function.arguments.city }}){% endfor %}"
                "{% endfor %}")
    tok = Tokenizer(HFTokenizer(models.BPE()), {}, [], template)
    # OpenAI sends a call's arguments as a JSON string; templates read an object (HF's convention).
    message = ChatMessage.model_validate({"role": "assistant", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]})
    assert tok.apply_chat_template([message.for_template()], tools=[t.model_dump() for t in TOOLS]) == \
        "[get_weather]assistant:->get_weather(Paris)"
