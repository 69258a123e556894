"""The built-in ``tiny`` demo model.

``--model tiny`` must go through exactly the same loading path as any other
model, so instead of a special code path we write a real Hugging Face Llama
checkpoint directory once (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, generation_config.json) and hand back its path.

Everything is deterministic: the tokenizer is a byte-level BPE trained
in-process on the fixed text below, and the weights come from a seeded
torch.Generator, so two machines (or two Ray workers) that write the
checkpoint independently get byte-identical files. Only torch, safetensors
and tokenizers are used: transformers is not needed at run time.
"""
from __future__ import annotations

import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from raytp.random_checkpoint import default_cache_dir, ensure_dir, llama_config, write_json, write_llama

TINY_MODEL_NAME = "tiny"
# Bump when anything below changes what gets written, so old caches are not reused.
TINY_VERSION = "tiny-v1"
SEED = 1234

UNK, BOS, EOS = "<unk>", "<s>", "</s>"  # ids 0, 1, 2, as in Llama
TARGET_VOCAB_SIZE = 1024  # a power of two: divisible by every TP degree we test

HIDDEN = 128
INTERMEDIATE = 256
LAYERS = 4
HEADS = 4
KV_HEADS = 2

# Zephyr-style template: role markers are plain text, each turn ends with the
# eos token, so a model trained on it stops by emitting </s>.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role'] + ' (expected system, user or assistant)') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# Fixed training text for the tokenizer. Changing one character changes the
# vocabulary, so treat it as frozen (bump TINY_VERSION if you must edit it).
_CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model can still say hello to the world.
Once upon a time there was a little town by the sea. Every morning the baker opened his shop
before the sun came up, and the smell of fresh bread drifted down the narrow streets. Children
walked to school, fishermen pulled their boats onto the sand, and the old clock in the square
struck seven. Nobody in the town was in a hurry, because the days were long and the evenings
were warm. In the afternoon people sat outside, drank tea or coffee, and talked about the weather,
the price of fish, and the news from the city far away.
Science is the careful study of the natural world. We make observations, ask questions, form a
hypothesis, and then test it with experiments. If the results agree with the prediction, the idea
survives for now; if they do not, we change the idea. Physics describes energy, motion, light and
matter. Chemistry explains how atoms join into molecules. Biology studies living things, from
single cells to forests and oceans full of plants and animals.
Computers follow instructions written by programmers. A program reads input, performs a
computation, and writes output. Modern language models are large neural networks: they read a
sequence of tokens and predict the next one. To serve such a model quickly, engineers split its
weight matrices across several graphics processors, and each device computes a part of every
layer. The devices then exchange their partial results with collective operations such as
all reduce and all gather. This is called tensor parallelism. When one device fails, the
system should notice, rebuild the group, and continue the requests that were running.
Cooking is a kind of chemistry that you can eat. Put water in a pot, add a pinch of salt, and
wait until it boils. Cut the onions, the carrots and the potatoes into small pieces. Fry the
onions in butter until they are golden, then add the other vegetables and cook them slowly.
Taste the soup, add pepper if you like, and serve it hot with a slice of bread and some cheese.
The numbers from one to ten are one, two, three, four, five, six, seven, eight, nine and ten.
Zero, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 100, 1000, 2024, 3.14, 42. The days of the week are Monday,
Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday. The months of the year begin with
January, February, March and April, and end with October, November and December.
What is your name? My name is Tiny, and I am a very small language model. How are you today?
I am fine, thank you. Can you help me? Yes, of course, I will try my best to answer your
question. Please tell me more about what you need. Thank you for asking! Goodbye, see you soon.
The river flows from the mountains to the valley, where farmers grow wheat, corn and apples.
In winter the hills are covered with snow, and in spring the fields turn green again. Birds
build their nests in the tall trees, and bees visit every flower in the garden. At night the
moon and the stars shine over the quiet houses, and the whole valley falls asleep.
def main(): print("hello, world") # a line of Python code, with (brackets) [lists] {dicts}
Questions, answers, stories, facts: a helpful assistant should be honest, clear and kind.
"""


def _build_tokenizer() -> Tokenizer:
    """Byte-level BPE (GPT-2 / Llama-3 style) trained on _CORPUS.

    The initial alphabet is all 256 bytes, so any text (emoji, CJK) encodes
    without <unk>; the post-processor prepends <s> like Llama's tokenizer.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TARGET_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=[UNK, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, tok.token_to_id(BOS))],
    )
    return tok


def _write_checkpoint(out_dir: str) -> None:
    tok = _build_tokenizer()
    config = llama_config(hidden=HIDDEN, intermediate=INTERMEDIATE, layers=LAYERS, heads=HEADS, kv_heads=KV_HEADS,
                          vocab=tok.get_vocab_size(with_added_tokens=True), bos_id=tok.token_to_id(BOS),
                          eos_id=tok.token_to_id(EOS))
    write_llama(out_dir, config, SEED)
    write_json(out_dir, "tokenizer_config.json", {
        # Pin the generic fast tokenizer: without this, transformers would pick
        # LlamaTokenizer from model_type and rebuild a sentencepiece-style pipeline.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "chat_template": CHAT_TEMPLATE,
    })
    tok.save(os.path.join(out_dir, "tokenizer.json"))


def ensure_tiny_checkpoint(cache_dir: str | None = None) -> str:
    """Return ``<cache_dir>/tiny-v1`` (default ~/.cache/raytp), writing the checkpoint there first if missing."""
    final = os.path.join(os.path.abspath(cache_dir or default_cache_dir()), TINY_VERSION)
    return ensure_dir(final, _write_checkpoint, os.path.isdir)
