"""Tokenizer: tokenizer.json (or a GGUF file's vocabulary) + chat template, and UTF-8-safe incremental detokenization.

We read a checkpoint's files directly with the `tokenizers` library and jinja2
instead of depending on transformers at run time. The rules below mirror what
transformers' ``AutoTokenizer`` does for a fast tokenizer, so prompts encode
to the same ids and chats render to the same text as in transformers.
"""
from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

_NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_str(value: Any) -> str | None:
    # tokenizer_config.json stores special tokens either as plain strings or
    # as serialized AddedToken dicts ({"__type": "AddedToken", "content": ...}).
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class _GenerationTag(jinja2.ext.Extension):
    """Accept ``{% generation %}...{% endgeneration %}`` (used by some HF templates) and render its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Like transformers: jinja's own tojson HTML-escapes, which would change prompts.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _compile_template(source: str) -> jinja2.Template:
    # Chat templates come with downloaded checkpoints: untrusted code, so sandboxed.
    # trim_blocks/lstrip_blocks and the helpers match transformers, so the same
    # template renders the same text here and there.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class Tokenizer:
    """A checkpoint's tokenizer: encode/decode, chat template, special token ids."""

    def __init__(self, tokenizer: _HFTokenizer, tokenizer_config: dict, model_eos_ids: list[int],
                 chat_template: str | None = None, bos_fallback_id: int | None = None):
        self._tok = tokenizer
        self.special_tokens = {k: s for k in _NAMED_SPECIAL_TOKENS if (s := _token_str(tokenizer_config.get(k)))}
        # transformers adds named special tokens missing from tokenizer.json; do the same.
        missing = [s for s in self.special_tokens.values() if tokenizer.token_to_id(s) is None]
        if missing:
            tokenizer.add_special_tokens(missing)

        bos, eos = self.special_tokens.get("bos_token"), self.special_tokens.get("eos_token")
        # Whether encode() adds BOS/EOS is decided by tokenizer.json's post-processor
        # alone. tokenizer_config's add_bos_token/add_eos_token are deliberately
        # ignored: transformers (v5) drops them whenever tokenizer.json exists, and
        # in real checkpoints (Llama 2, Mistral) they agree with the post-processor.
        self.chat_template = chat_template
        self._compiled_template: jinja2.Template | None = None  # compiled on first use
        self.bos_token_id: int | None = tokenizer.token_to_id(bos) if bos else bos_fallback_id
        self.eos_token_ids: list[int] = list(model_eos_ids)
        if not self.eos_token_ids and eos and tokenizer.token_to_id(eos) is not None:
            self.eos_token_ids = [tokenizer.token_to_id(eos)]

    @classmethod
    def from_gguf(cls, file: str) -> Tokenizer:
        """The tokenizer, special tokens, stop ids and chat template a GGUF file's metadata describe."""
        from raytp.engine import gguf_vocab
        from raytp.model.checkpoint_error import CheckpointError
        from raytp.model.gguf_checkpoint import gguf_checkpoint

        value = gguf_checkpoint(file).value
        try:
            tokenizer = gguf_vocab.byte_level_bpe(value)
        except gguf_vocab.VocabError as err:
            raise CheckpointError(f"{file}: {err}") from None
        return cls(tokenizer, gguf_vocab.special_tokens(value), gguf_vocab.stop_token_ids(value),
                   value("tokenizer.chat_template"), value("tokenizer.ggml.bos_token_id"))

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer | None:
        """Load from a checkpoint dir (or GGUF file); None when it has no tokenizer.json (token-id prompts only)."""
        from raytp.model.gguf_checkpoint import find_gguf

        path = os.fspath(path)
        gguf_file = find_gguf(path)
        if gguf_file is not None:
            return cls.from_gguf(gguf_file)
        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_file):
            return None
        tokenizer = _HFTokenizer.from_file(tok_file)
        tok_config = _read_json(os.path.join(path, "tokenizer_config.json"))
        gen_config = _read_json(os.path.join(path, "generation_config.json"))
        model_config = _read_json(os.path.join(path, "config.json"))

        # The stop ids the model was trained with: generation_config first (it
        # may list several, e.g. Llama 3's <|eot_id|>), then config.json.
        eos = gen_config.get("eos_token_id")
        if eos is None:
            eos = model_config.get("eos_token_id")
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])

        # Newer checkpoints keep the template in its own file; older ones in
        # tokenizer_config, possibly as a list of named templates.
        template = tok_config.get("chat_template")
        jinja_file = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                template = f.read()
        if isinstance(template, list):
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default")
        bos_fallback = gen_config.get("bos_token_id", model_config.get("bos_token_id"))
        return cls(tokenizer, tok_config, eos_ids, template, bos_fallback if isinstance(bos_fallback, int) else None)

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (base vocab plus added tokens)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def backend_json(self) -> str:
        """The tokenizer as tokenizer.json text (with the added special tokens), for libraries that load it."""
        return self._tok.to_str()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        """Render a chat to the prompt text. Encode the result with add_special_tokens=False:
        templates usually emit bos_token themselves. `tools`: OpenAI's tool definitions, for templates that
        describe them to the model (HF's convention: the template variable `tools`, None without tools)."""
        if not self.chat_template:
            raise ValueError(
                "this checkpoint has no chat template (no 'chat_template' in tokenizer_config.json and no "
                "chat_template.jinja); use a completion prompt instead of chat messages"
            )
        if self._compiled_template is None:
            self._compiled_template = _compile_template(self.chat_template)
        return self._compiled_template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                              tools=tools, **self.special_tokens)


class IncrementalDetokenizer:
    """Turns a stream of generated token ids into text deltas that never split a character.

    Decoding one token at a time is wrong twice over: a byte-level BPE token
    may hold half of a UTF-8 character (emoji, CJK), and sentencepiece
    tokenizers drop a token's leading space when it is decoded alone. So, as in
    vLLM / TGI, we keep two offsets into all tokens (prompt + generated):

        tokens[prefix_offset:read_offset]  already emitted; decoded as context
        tokens[read_offset:]               not yet emitted

    Each step decodes tokens[prefix_offset:] and emits what extends past the
    context's text, unless it ends in U+FFFD (an incomplete character): then
    we hold it back until the next token completes it.
    """

    # Prompt tokens decoded as context for the first generated token.
    _PROMPT_CONTEXT = 5

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids = list(prompt_token_ids[-self._PROMPT_CONTEXT:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        if self._prefix_text.endswith("\ufffd"):
            # The prompt ends inside a character: its context would misalign the
            # diff, so decode the generated tokens on their own instead.
            self._ids, self._read_offset, self._prefix_text = [], 0, ""

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def add(self, new_token_ids: list[int]) -> str:
        """Append tokens; return the newly stable text ("" while a character is incomplete)."""
        self._ids.extend(new_token_ids)
        text = self._decode(self._ids[self._prefix_offset:])
        # Also "" when the new tokens add no text yet (e.g. skipped special tokens);
        # the offsets stay put, so the context keeps growing until text appears.
        if len(text) <= len(self._prefix_text) or text.endswith("\ufffd"):
            return ""
        return self._advance(text)

    def flush(self) -> str:
        """Return whatever is still held back (at the end of generation)."""
        text = self._decode(self._ids[self._prefix_offset:])
        if len(text) <= len(self._prefix_text):
            return ""
        return self._advance(text)

    def _advance(self, text: str) -> str:
        delta = text[len(self._prefix_text):]
        # What we just emitted becomes the context for the next step, which keeps
        # each decode a small window instead of the whole sequence.
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        return delta
