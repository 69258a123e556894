"""Write random-weight Llama checkpoints: the built-in `tiny` model, the `bench-58m` benchmark model and the
random Llamas by size that benchmarks/chaos_kill.py --shapes and compare_vllm_cpu.sh --shape serve
(RANDOM_LLAMA_SHAPES).

All are real Hugging Face checkpoint directories (config.json,
generation_config.json, model.safetensors, optionally a tokenizer), written
with torch and safetensors only, so raytp loads them through the same loader
as any other model and transformers loads the very same bytes. Weights are
drawn from one seeded generator in a fixed order: two processes that write
the same checkpoint get byte-identical files.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Callable

import torch
from safetensors.torch import save_file


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "raytp")


def llama_config(*, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int,
                 bos_id: int, eos_id: int, max_positions: int = 2048, **extra) -> dict:
    """config.json of a plain Llama (no rope scaling, no biases, untied embeddings, fp32)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "hidden_act": "silu",
        "vocab_size": vocab,
        "max_position_embeddings": max_positions,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        **extra,
    }


def llama_layer_weights(config: dict, i: int, normal: Callable[..., torch.Tensor],
                        dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Decoder layer i's standard HF Llama tensors: `normal(*shape)` draws each matrix (in a fixed order), norms are ones."""
    h, inter = config["hidden_size"], config["intermediate_size"]
    q_rows = config["num_attention_heads"] * config["head_dim"]
    kv_rows = config["num_key_value_heads"] * config["head_dim"]
    p = f"model.layers.{i}."
    w = {
        p + "self_attn.q_proj.weight": normal(q_rows, h),
        p + "self_attn.k_proj.weight": normal(kv_rows, h),
        p + "self_attn.v_proj.weight": normal(kv_rows, h),
        p + "self_attn.o_proj.weight": normal(h, q_rows),
    }
    if "num_local_experts" in config:  # Mixtral: a router and the experts' w1 (gate), w3 (up), w2 (down)
        w[p + "block_sparse_moe.gate.weight"] = normal(config["num_local_experts"], h)
        for e in range(config["num_local_experts"]):
            expert = f"{p}block_sparse_moe.experts.{e}."
            w.update({expert + "w1.weight": normal(inter, h), expert + "w3.weight": normal(inter, h),
                      expert + "w2.weight": normal(h, inter)})
    else:
        w.update({p + "mlp.gate_proj.weight": normal(inter, h), p + "mlp.up_proj.weight": normal(inter, h),
                  p + "mlp.down_proj.weight": normal(h, inter)})
    w[p + "input_layernorm.weight"] = torch.ones(h, dtype=dtype)
    w[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=dtype)
    return w


def random_llama_weights(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """Every standard HF Llama tensor for `config`: N(0, 0.02) from one seeded generator in a fixed order; norms ones."""
    g = torch.Generator().manual_seed(seed)
    h, vocab = config["hidden_size"], config["vocab_size"]

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float32) * 0.02

    w: dict[str, torch.Tensor] = {"model.embed_tokens.weight": normal(vocab, h)}
    for i in range(config["num_hidden_layers"]):
        w.update(llama_layer_weights(config, i, normal))
    w["model.norm.weight"] = torch.ones(h)
    w["lm_head.weight"] = normal(vocab, h)
    return w


def write_json(out_dir: str, name: str, obj: dict) -> None:
    with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def write_llama(out_dir: str, config: dict, seed: int) -> None:
    """config.json, generation_config.json and model.safetensors with random weights."""
    write_json(out_dir, "config.json", config)
    write_json(out_dir, "generation_config.json", {"bos_token_id": config["bos_token_id"],
                                                   "eos_token_id": config["eos_token_id"]})
    save_file(random_llama_weights(config, seed), os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})


def ensure_dir(final: str, write: Callable[[str], None], is_current: Callable[[str], bool]) -> str:
    """Return `final`, writing it first with write(tmp_dir) unless is_current(final).

    Several processes (Ray workers on one node) may call this at once: each
    writes into its own temp dir next to the target and renames it into place.
    rename is atomic, so a reader sees either nothing or a complete
    checkpoint; the losers of the race discard their copy.
    """
    if is_current(final):
        return final
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.tmp-", dir=parent)
    try:
        write(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the cache is shared like any model dir
        if os.path.isdir(final):  # a stale version
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not is_current(final):  # not a lost race: a real error
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# Random Llamas by size, for benchmarks that sweep the model size or want a shape nobody tuned for
# (benchmarks/chaos_kill.py --shapes, compare_vllm_cpu.sh --shape).
# Vocab 32000, untied embeddings, float32; every count divides by TP 2 and 4.
RANDOM_LLAMA_SHAPES: dict[str, dict[str, int]] = {
    "20m": dict(hidden=256, intermediate=1024, layers=4, heads=8, kv_heads=4),  # 20.3M parameters, 81 MB
    "87m": dict(hidden=768, intermediate=2048, layers=6, heads=12, kv_heads=4),  # 86.9M parameters, 348 MB
    "0.5b": dict(hidden=1536, intermediate=4096, layers=16, heads=12, kv_heads=4),  # 501M parameters, 2.0 GB
    # Mixtral-like mixture of experts: 8 experts of intermediate 1024, 2 per token. 172M parameters (690 MB), of
    # which a token uses 78M (the embeddings, attention and 2 experts a layer).
    "moe-8x": dict(hidden=768, intermediate=1024, layers=6, heads=12, kv_heads=4, experts=8, top_k=2),
}
RANDOM_LLAMA_SEED = 0


def random_llama_config(shape: str) -> dict:
    """config.json of the RANDOM_LLAMA_SHAPES entry `shape` (the seed rides along, so a cache of other weights is stale)."""
    shape_args = dict(RANDOM_LLAMA_SHAPES[shape])
    experts, top_k = shape_args.pop("experts", None), shape_args.pop("top_k", None)
    config = llama_config(**shape_args, vocab=32000, bos_id=1, eos_id=2, raytp_random_llama_seed=RANDOM_LLAMA_SEED)
    if experts:
        config.update(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=experts,
                      num_experts_per_tok=top_k, router_jitter_noise=0.0, sliding_window=None)
    return config


def llama_num_parameters(config: dict) -> int:
    """Parameters of the checkpoint random_llama_weights writes for `config`."""
    h, inter, d = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    attn = (2 * config["num_attention_heads"] + 2 * config["num_key_value_heads"]) * d * h
    experts = config.get("num_local_experts", 1)
    per_layer = attn + experts * 3 * h * inter + (experts * h if "num_local_experts" in config else 0) + 2 * h
    return 2 * config["vocab_size"] * h + config["num_hidden_layers"] * per_layer + h


def write_random_llama(out_dir: str, shape: str) -> None:
    """The RANDOM_LLAMA_SHAPES entry `shape` as a checkpoint in out_dir (no tokenizer: prompts are token ids)."""
    write_llama(out_dir, random_llama_config(shape), RANDOM_LLAMA_SEED)


def ensure_random_llama(shape: str, cache_dir: str | None = None) -> str:
    """Return ``<cache_dir>/random-llama-<shape>`` (default ~/.cache/raytp), writing it first if missing or stale."""
    want = json.loads(json.dumps(random_llama_config(shape)))  # as config.json reads back

    def is_current(path: str) -> bool:
        try:
            with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
                return json.load(f) == want and os.path.isfile(os.path.join(path, "model.safetensors"))
        except (OSError, ValueError):
            return False

    final = os.path.join(os.path.abspath(cache_dir or default_cache_dir()), f"random-llama-{shape}")
    return ensure_dir(final, lambda out_dir: write_random_llama(out_dir, shape), is_current)
