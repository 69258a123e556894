"""raytp.engine.tokenizer against transformers, on the tiny checkpoint and small variants of it."""
import json
import os
import shutil

import pytest

from raytp.tiny import ensure_tiny_checkpoint
from raytp.engine.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, trailing spaces  ",
    "emoji 🙂👍🏽 and CJK 你好，世界 and accents café naïve",
    "</s> special <s> tokens inside text",
    "",
    "line one\nline two\n\n\ttabbed",
]

CHATS = [
    [{"role": "user", "content": "Hi!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 你好 🙂?"},
    ],
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return ensure_tiny_checkpoint(str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def tok(tiny_dir):
    t = Tokenizer.from_dir(tiny_dir)
    assert t is not None
    return t


@pytest.fixture(scope="module")
def hf_tok(tiny_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(tiny_dir)


def _copy_with_config(src, dst, **changes):
    shutil.copytree(src, dst)
    path = os.path.join(dst, "tokenizer_config.json")
    cfg = json.load(open(path))
    cfg.update(changes)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    json.dump(cfg, open(path, "w"))
    return str(dst)


def test_special_ids(tok):
    assert tok.bos_token_id == 1
    assert tok.eos_token_ids == [2]
    assert tok.vocab_size == 1024


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_decode_match_transformers(tok, hf_tok, text, add_special_tokens):
    ids = tok.encode(text, add_special_tokens=add_special_tokens)
    assert ids == hf_tok(text, add_special_tokens=add_special_tokens).input_ids
    assert (ids[:1] == [1]) == add_special_tokens
    for skip in (True, False):
        assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(ids, skip_special_tokens=skip)
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text.replace("</s>", "").replace("<s>", "")


@pytest.mark.parametrize("messages", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok, hf_tok, messages, add_generation_prompt):
    ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == theirs
    assert ours.startswith("<s><|")
    assert ours.endswith("<|assistant|>\n") == add_generation_prompt


def test_chat_template_rejects_unknown_role(tok):
    with pytest.raises(Exception, match="Unknown role: tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_chat_template_llama2_style_with_whitespace(tiny_dir, tmp_path):
    # A multi-line template exercises trim_blocks/lstrip_blocks the way transformers sets them.
    transformers = pytest.importorskip("transformers")
    template = (
        "{% for message in messages %}\n"
        "    {% if message['role'] == 'user' %}\n"
        "{{ bos_token + '[INST] ' + message['content'] | trim + ' [/INST]' }}\n"
        "    {% elif message['role'] == 'assistant' %}\n"
        "{{ ' ' + message['content'] + ' ' + eos_token }}\n"
        "    {% endif %}\n"
        "{% endfor %}\n"
    )
    d = _copy_with_config(tiny_dir, tmp_path / "ck", chat_template=template)
    msgs = CHATS[1][1:]
    ours = Tokenizer.from_dir(d).apply_chat_template(msgs)
    assert ours == transformers.AutoTokenizer.from_pretrained(d).apply_chat_template(msgs, tokenize=False)
    assert ours.startswith("<s>[INST] What is 2+2? [/INST]")


def test_no_chat_template_raises(tiny_dir, tmp_path):
    d = _copy_with_config(tiny_dir, tmp_path / "ck", chat_template=None)
    t = Tokenizer.from_dir(d)
    with pytest.raises(ValueError, match="no chat template"):
        t.apply_chat_template([{"role": "user", "content": "hi"}])


def test_from_dir_without_tokenizer_json(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert Tokenizer.from_dir(tmp_path) is None


def test_config_variants_match_transformers(tiny_dir, tmp_path):
    # tokenizer.json's post-processor decides BOS (transformers ignores add_bos_token when
    # tokenizer.json exists); AddedToken dicts are read; a named special token missing from
    # the vocab is added; eos ids may be a list in generation_config.json.
    transformers = pytest.importorskip("transformers")
    d = _copy_with_config(
        tiny_dir, tmp_path / "ck", add_bos_token=False, pad_token="<pad>",
        eos_token={"__type": "AddedToken", "content": "</s>", "special": True},
    )
    with open(os.path.join(d, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [2, 7]}, f)
    t, hf = Tokenizer.from_dir(d), transformers.AutoTokenizer.from_pretrained(d)
    for text in ("Hello", "a <pad> b </s>"):
        assert t.encode(text) == hf(text).input_ids
    assert t.encode("Hello")[0] == 1
    assert t.encode("<pad>", add_special_tokens=False) == [1024] and t.vocab_size == 1025
    assert t.eos_token_ids == [2, 7]

    os.remove(os.path.join(d, "generation_config.json"))
    assert Tokenizer.from_dir(d).eos_token_ids == [2]  # from config.json
    os.remove(os.path.join(d, "config.json"))
    assert Tokenizer.from_dir(d).eos_token_ids == [2]  # from tokenizer_config's eos_token


STREAM_TEXTS = [
    "Hello 🙂 world 👍🏽👨‍👩‍👧 done",
    "你好，世界！日本語のテキスト。한국어",
    "mixed: café 🎉 数据 and plain text at the end",
]


@pytest.mark.parametrize("text", STREAM_TEXTS)
@pytest.mark.parametrize("prompt", ["Say something:", "", "ends mid-emoji 🙂"])
def test_incremental_detokenizer_one_token_at_a_time(tok, text, prompt):
    generated = tok.encode(text, add_special_tokens=False)
    prompt_ids = tok.encode(prompt)
    if prompt.endswith("🙂"):
        prompt_ids = prompt_ids[:-1]  # cut the prompt inside the emoji's bytes
    detok = IncrementalDetokenizer(tok, prompt_ids)
    deltas = [detok.add([t]) for t in generated]
    deltas.append(detok.flush())
    assert "".join(deltas) == tok.decode(generated) == text
    assert not any("\ufffd" in d for d in deltas)
    # Multi-byte characters really were split across tokens, so something was held back.
    assert any(d == "" for d in deltas[:-1])


def test_incremental_detokenizer_special_tokens_and_chunks(tok):
    text = "chunks of 🙂 tokens 你好"
    generated = tok.encode(text, add_special_tokens=False) + [tok.eos_token_ids[0]]
    for skip in (True, False):
        detok = IncrementalDetokenizer(tok, tok.encode("prompt"), skip_special_tokens=skip)
        out = "".join(detok.add(generated[i:i + 3]) for i in range(0, len(generated), 3)) + detok.flush()
        assert out == tok.decode(generated, skip_special_tokens=skip)
        assert out.endswith("你好" if skip else "你好</s>")


def test_flush_returns_held_back_bytes(tok):
    ids = tok.encode("🙂", add_special_tokens=False)
    assert len(ids) > 1
    detok = IncrementalDetokenizer(tok, [])
    assert detok.add(ids[:-1]) == ""
    assert detok.flush() == tok.decode(ids[:-1])  # incomplete at the end: emitted as decode() would
    assert detok.flush() == ""
