"""Engine outputs -> OpenAI choices: text (echo), token ids, and logprobs in OpenAI's two shapes
(completions' legacy lists, chat's content list).

A token is shown as its own text (decoded alone, special tokens included),
as vLLM does; a model without a tokenizer shows `token_id:<id>`.
"""
from __future__ import annotations

from raytp.outputs import RequestOutput, TokenLogprob
from raytp.serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatLogprobs,
    ChatLogprobToken,
    ChatStreamChoice,
    CompletionChoice,
    CompletionLogprobs,
    DeltaMessage,
    TopLogprob,
)
from raytp.serve.tools import ToolCallReader, parser_for
from raytp.engine.tokenizer import Tokenizer


class TokenStrings:
    """Token id -> its text, cached (the same ids come back at every step)."""

    def __init__(self, tokenizer: Tokenizer | None):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = (self.tokenizer.decode([token_id], skip_special_tokens=False) if self.tokenizer is not None
                    else f"token_id:{token_id}")
            self._cache[token_id] = text
        return text


def completion_logprobs(strings: TokenStrings, token_ids: list[int], logprobs: list[TokenLogprob | None],
                        text_offset: int) -> CompletionLogprobs:
    """One entry per token; `None` logprobs (the first prompt token) stay null. top_logprobs holds the top N
    and the token itself (so up to N + 1 entries, as in vLLM); text_offset counts from `text_offset`."""
    out = CompletionLogprobs()
    for token_id, lp in zip(token_ids, logprobs):
        text = strings(token_id)
        out.tokens.append(text)
        out.text_offset.append(text_offset)
        text_offset += len(text)
        if lp is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(lp.logprob)
        # Keyed by text, as OpenAI's shape is: tokens that share a text keep the likeliest, and the token's own
        # entry is always its own logprob.
        top = {strings(t): v for t, v in reversed(lp.top)}
        top[text] = lp.logprob
        out.top_logprobs.append(top)
    return out


def _top(strings: TokenStrings, token_id: int, logprob: float) -> TopLogprob:
    text = strings(token_id)
    return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode("utf-8")))


def chat_logprobs(strings: TokenStrings, token_ids: list[int], logprobs: list[TokenLogprob]) -> ChatLogprobs:
    """One content entry per token, each with its top N (top_logprobs) likeliest first."""
    content = []
    for token_id, lp in zip(token_ids, logprobs):
        entry = _top(strings, token_id, lp.logprob)
        content.append(ChatLogprobToken(**entry.model_dump(), top_logprobs=[_top(strings, t, v) for t, v in lp.top]))
    return ChatLogprobs(content=content)


def _finish_reason(reason: str | None, called: bool) -> str | None:
    """An answer that ended by itself in tool calls finished with "tool_calls" (OpenAI); "length" stays."""
    return "tool_calls" if called and reason == "stop" else reason


class ChoiceRenderer:
    """Engine outputs -> OpenAI choices (whole, or the delta of a stream chunk) with echo, logprobs and token ids."""

    def __init__(self, tokenizer, req, chat: bool):
        self.req, self.chat = req, chat
        self.strings = TokenStrings(tokenizer)
        self.tokenizer = tokenizer
        self.echo = bool(getattr(req, "echo", False))
        # echo shows a text prompt exactly as sent (token-id prompts are decoded).
        self.prompt_texts = [p if isinstance(p, str) else None for p in req.prompt_items()] if not chat else []
        self.sent_chars: dict[int, int] = {}  # choice -> characters of its text sent (text_offset of the next token)
        self.tool_readers: dict[int, ToolCallReader] = {}  # chat with tools (tool_choice not none): by choice

    def _tool_reader(self, i: int) -> ToolCallReader | None:
        if not self.chat or not self.req.tools or self.req.effective_tool_choice == "none":
            return None
        if i not in self.tool_readers:
            template = self.tokenizer.chat_template if self.tokenizer is not None else None
            self.tool_readers[i] = ToolCallReader(self.req.effective_tool_choice, parser_for(template))
        return self.tool_readers[i]

    def _prompt_text(self, i: int, out: RequestOutput) -> str:
        text = self.prompt_texts[i // self.req.n]
        if text is not None:
            return text
        return self.tokenizer.decode(out.prompt_token_ids) if self.tokenizer is not None else ""

    def final(self, i: int, out: RequestOutput):
        c = out.outputs[0]
        token_ids = c.token_ids if self.req.return_token_ids else None
        if self.chat:
            logprobs = chat_logprobs(self.strings, c.token_ids, c.logprobs) if c.logprobs is not None else None
            reader = self._tool_reader(i)
            content, calls = reader.final(c.text) if reader is not None else (c.text, [])
            return ChatChoice(index=i, message=AssistantMessage(content=content, tool_calls=calls), logprobs=logprobs,
                              finish_reason=_finish_reason(c.finish_reason, bool(calls)), stop_reason=c.stop_reason,
                              token_ids=token_ids)
        return self._completion_choice(i, out, c.text, c.token_ids, c.logprobs, True, token_ids)

    def delta(self, i: int, out: RequestOutput):
        c = out.outputs[0]
        new = out.delta_token_ids
        new_logprobs = c.logprobs[len(c.logprobs) - len(new):] if c.logprobs is not None else None
        token_ids = new if self.req.return_token_ids else None
        if self.chat:
            logprobs = chat_logprobs(self.strings, new, new_logprobs) if new_logprobs is not None else None
            reader = self._tool_reader(i)
            content, calls = reader.delta(out.delta_text, out.finished) if reader is not None else (out.delta_text, [])
            return ChatStreamChoice(index=i, delta=DeltaMessage(content=content or None, tool_calls=calls or None),
                                    logprobs=logprobs, stop_reason=c.stop_reason, token_ids=token_ids,
                                    finish_reason=_finish_reason(c.finish_reason, reader is not None and reader.called))
        first = i not in self.sent_chars
        return self._completion_choice(i, out, out.delta_text, new, new_logprobs, first, token_ids)

    def _completion_choice(self, i: int, out: RequestOutput, text: str, token_ids: list[int], logprobs, first: bool,
                           token_ids_field: list[int] | None) -> CompletionChoice:
        """A completion choice (or the delta of one); the first one of a choice carries the echoed prompt."""
        c = out.outputs[0]
        offset = self.sent_chars.get(i, 0)
        shown_ids, shown_logprobs = list(token_ids), logprobs
        if self.echo and first:
            text = self._prompt_text(i, out) + text
            shown_ids = out.prompt_token_ids + shown_ids
            if logprobs is not None:
                shown_logprobs = list(out.prompt_logprobs or [None] * len(out.prompt_token_ids)) + list(logprobs)
        lp = completion_logprobs(self.strings, shown_ids, shown_logprobs, offset) if shown_logprobs is not None else None
        self.sent_chars[i] = offset + (sum(len(t) for t in lp.tokens) if lp is not None else len(text))
        return CompletionChoice(index=i, text=text, logprobs=lp, finish_reason=c.finish_reason,
                                stop_reason=c.stop_reason, token_ids=token_ids_field,
                                prompt_token_ids=out.prompt_token_ids if self.req.return_token_ids and first else None)
