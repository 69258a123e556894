"""The CPU benchmark checkpoint, ``bench-58m``.

A Llama-architecture model big enough that the model's own arithmetic, not
Python, dominates a step on a CPU (hidden 512, 8 layers, 8 heads, 4 KV heads,
intermediate 1536, vocab 32000, float32: about 58M parameters, 232 MB), with
random weights from a fixed seed. Like ``tiny`` it is written once as a real
Hugging Face checkpoint directory (config.json, generation_config.json,
model.safetensors) with torch and safetensors only, so raytp, transformers
and any other server load the very same bytes. It has no tokenizer: the
benchmark's prompts are token ids. Random weights give near-uniform logits,
which is fine for throughput (requests use ``ignore_eos``).
"""
from __future__ import annotations

import json
import os

from raytp.random_checkpoint import default_cache_dir, ensure_dir, llama_config, write_llama
from raytp.named_models import resolve_model_path

BENCH_MODEL_NAME = "bench-58m"
# Part of config.json: bump when the weights or the shapes below change, so an old cache is rewritten.
BENCH_VERSION = 1
SEED = 58

HIDDEN = 512
INTERMEDIATE = 1536
LAYERS = 8
HEADS = 8
KV_HEADS = 4
HEAD_DIM = HIDDEN // HEADS
VOCAB = 32000
MAX_POSITIONS = 2048
BOS_ID, EOS_ID = 1, 2


def bench_config() -> dict:
    # raytp_bench_version rides along in config.json, so a stale cache is noticed and rewritten.
    return llama_config(hidden=HIDDEN, intermediate=INTERMEDIATE, layers=LAYERS, heads=HEADS, kv_heads=KV_HEADS,
                        vocab=VOCAB, bos_id=BOS_ID, eos_id=EOS_ID, max_positions=MAX_POSITIONS,
                        raytp_bench_version=BENCH_VERSION)


def num_parameters() -> int:
    per_layer = (2 * HEADS + 2 * KV_HEADS) * HEAD_DIM * HIDDEN + 3 * HIDDEN * INTERMEDIATE + 2 * HIDDEN
    return 2 * VOCAB * HIDDEN + LAYERS * per_layer + HIDDEN


def _is_current(path: str) -> bool:
    try:
        with open(os.path.join(path, "config.json")) as f:
            version = json.load(f).get("raytp_bench_version")
    except (OSError, ValueError):
        return False
    return version == BENCH_VERSION and os.path.isfile(os.path.join(path, "model.safetensors"))


def _write(out_dir: str) -> None:
    print(f"writing the {BENCH_MODEL_NAME} checkpoint ({num_parameters() / 1e6:.1f}M parameters)", flush=True)
    write_llama(out_dir, bench_config(), SEED)


def ensure_bench_checkpoint(cache_dir: str | None = None) -> str:
    """Return ``<cache_dir>/bench-58m`` (default ~/.cache/raytp), writing it first if missing or stale."""
    final = os.path.join(os.path.abspath(cache_dir or default_cache_dir()), BENCH_MODEL_NAME)
    return ensure_dir(final, _write, _is_current)


def resolve_bench_model(model: str) -> str:
    """``bench-58m`` -> its directory (written on first use); ``tiny`` and paths as raytp resolves them."""
    if model == BENCH_MODEL_NAME:
        return ensure_bench_checkpoint()
    return resolve_model_path(model)
