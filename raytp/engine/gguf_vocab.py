"""A GGUF file's tokenizer (`tokenizer.ggml.*` metadata) as a `tokenizers` Tokenizer.

GGUF stores the vocabulary, not a tokenizer.json: for the byte-level BPE
vocabularies (`tokenizer.ggml.model == "gpt2"`: Llama 3, Qwen2, SmolLM2...)
the tokens, already spelled in GPT-2's byte alphabet, the merges, each token's
type (control tokens are special, user-defined ones are added whole), and the
name of the pre-tokenizer (`tokenizer.ggml.pre`) that says how text is split
into words before the merges apply. Built here with the same pieces a
tokenizer.json would name, so that ids equal transformers' tokenizer for the
same file. Sentencepiece vocabularies (`llama`: Llama 2, Mistral v0.1) are not
built yet: a clear error says so.
"""
from __future__ import annotations

from typing import Callable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED = 3, 4

# Word splits of the vocabularies that do not use GPT-2's (the ByteLevel pre-tokenizer's own regex).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
WORD_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
               "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT, "falcon3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT,
               "deepseek-r1-qwen": _QWEN2_SPLIT}


class VocabError(ValueError):
    """The file's vocabulary is of a kind raytp cannot build a tokenizer from."""


def byte_level_bpe(value: Callable) -> Tokenizer:
    """The tokenizer of a GGUF file; `value(key, default)` reads its metadata."""
    kind = value("tokenizer.ggml.model")
    if kind != "gpt2":
        raise VocabError(f"tokenizer.ggml.model is {kind!r}: only byte-level BPE vocabularies ('gpt2') are "
                         f"supported yet")
    tokens: list[str] = value("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in value("tokenizer.ggml.merges", [])]
    types: list[int] = value("tokenizer.ggml.token_type") or [1] * len(tokens)

    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    split = WORD_SPLITS.get(value("tokenizer.ggml.pre"))
    if split is None:  # GPT-2's own split (SmolLM2's "smollm" and the default)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    # Control tokens (<|im_end|>...) are matched whole and skipped when decoding; user-defined ones (<think>)
    # are matched whole but kept.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, types) if kind == TOKEN_TYPE_CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, kind in zip(tokens, types) if kind == TOKEN_TYPE_USER_DEFINED])
    bos = value("tokenizer.ggml.bos_token_id")
    if value("tokenizer.ggml.add_bos_token", False) and bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{tokens[bos]} $A",
                                                           pair=f"{tokens[bos]} $A {tokens[bos]} $B",
                                                           special_tokens=[(tokens[bos], bos)])
    return tok


def special_tokens(value: Callable) -> dict[str, str]:
    """bos/eos/unk/pad tokens by name, as tokenizer_config.json would give them."""
    tokens = value("tokenizer.ggml.tokens")
    named = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
             "pad_token": "padding_token_id"}
    return {name: tokens[i] for name, key in named.items() if (i := value(f"tokenizer.ggml.{key}")) is not None}


def stop_token_ids(value: Callable) -> list[int]:
    """The ids that end a generation: end of sequence and end of turn (llama.cpp's end-of-generation tokens)."""
    ids = [value(f"tokenizer.ggml.{key}") for key in ("eos_token_id", "eot_token_id", "eom_token_id")]
    return list(dict.fromkeys(i for i in ids if i is not None))
