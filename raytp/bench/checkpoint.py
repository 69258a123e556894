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
import shutil
import tempfile

import torch
from safetensors.torch import save_file

from raytp.tiny import default_cache_dir, resolve_model_path

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
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "vocab_size": VOCAB,
        "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "raytp_bench_version": BENCH_VERSION,
    }


def build_weights() -> dict[str, torch.Tensor]:
    """Every HF Llama tensor: N(0, 0.02) from one seeded generator in a fixed order; norms are ones."""
    g = torch.Generator().manual_seed(SEED)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float32) * 0.02

    w: dict[str, torch.Tensor] = {"model.embed_tokens.weight": normal(VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = normal(HEADS * HEAD_DIM, HIDDEN)
        w[p + "self_attn.k_proj.weight"] = normal(KV_HEADS * HEAD_DIM, HIDDEN)
        w[p + "self_attn.v_proj.weight"] = normal(KV_HEADS * HEAD_DIM, HIDDEN)
        w[p + "self_attn.o_proj.weight"] = normal(HIDDEN, HEADS * HEAD_DIM)
        w[p + "mlp.gate_proj.weight"] = normal(INTERMEDIATE, HIDDEN)
        w[p + "mlp.up_proj.weight"] = normal(INTERMEDIATE, HIDDEN)
        w[p + "mlp.down_proj.weight"] = normal(HIDDEN, INTERMEDIATE)
        w[p + "input_layernorm.weight"] = torch.ones(HIDDEN)
        w[p + "post_attention_layernorm.weight"] = torch.ones(HIDDEN)
    w["model.norm.weight"] = torch.ones(HIDDEN)
    w["lm_head.weight"] = normal(VOCAB, HIDDEN)
    return w


def num_parameters() -> int:
    per_layer = (2 * HEADS + 2 * KV_HEADS) * HEAD_DIM * HIDDEN + 3 * HIDDEN * INTERMEDIATE + 2 * HIDDEN
    return 2 * VOCAB * HIDDEN + LAYERS * per_layer + HIDDEN


def _write(out_dir: str) -> None:
    def dump(name: str, obj: dict) -> None:
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")

    dump("config.json", bench_config())
    dump("generation_config.json", {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID})
    save_file(build_weights(), os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})


def _is_current(path: str) -> bool:
    try:
        with open(os.path.join(path, "config.json")) as f:
            version = json.load(f).get("raytp_bench_version")
    except (OSError, ValueError):
        return False
    return version == BENCH_VERSION and os.path.isfile(os.path.join(path, "model.safetensors"))


def ensure_bench_checkpoint(cache_dir: str | None = None) -> str:
    """Return ``<cache_dir>/bench-58m`` (default ~/.cache/raytp), writing it first if missing or stale.

    Written into a temp dir next to the target and renamed into place, so a
    concurrent reader never sees half a checkpoint.
    """
    parent = os.path.abspath(cache_dir or default_cache_dir())
    final = os.path.join(parent, BENCH_MODEL_NAME)
    if _is_current(final):
        return final
    os.makedirs(parent, exist_ok=True)
    print(f"writing the {BENCH_MODEL_NAME} checkpoint ({num_parameters() / 1e6:.1f}M parameters) to {final}", flush=True)
    tmp = tempfile.mkdtemp(prefix=f".{BENCH_MODEL_NAME}.tmp-", dir=parent)
    try:
        _write(tmp)
        os.chmod(tmp, 0o755)
        if os.path.isdir(final):  # stale version
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not _is_current(final):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve_bench_model(model: str) -> str:
    """``bench-58m`` -> its directory (written on first use); ``tiny`` and paths as raytp resolves them."""
    if model == BENCH_MODEL_NAME:
        return ensure_bench_checkpoint()
    return resolve_model_path(model)
