"""The built-in tiny checkpoint: a real, deterministic HF Llama checkpoint."""
import hashlib
import json
import os

import pytest
from safetensors import safe_open

from raytp.named_models import resolve_model_path
from raytp.tiny import TINY_MODEL_NAME, TINY_VERSION, ensure_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return ensure_tiny_checkpoint(str(tmp_path_factory.mktemp("cache")))


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_layout_and_config(tiny_dir):
    assert os.path.basename(tiny_dir) == TINY_VERSION
    assert sorted(os.listdir(tiny_dir)) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    ]
    cfg = json.load(open(os.path.join(tiny_dir, "config.json")))
    tok = json.load(open(os.path.join(tiny_dir, "tokenizer.json")))
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (128, 256, 4)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (4, 2)
    assert cfg["tie_word_embeddings"] is False and cfg["torch_dtype"] == "float32"
    vocab_size = len(tok["model"]["vocab"])
    assert cfg["vocab_size"] == vocab_size == 1024
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)

    with safe_open(os.path.join(tiny_dir, "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert tuple(f.get_slice("model.embed_tokens.weight").get_shape()) == (vocab_size, 128)
        assert tuple(f.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape()) == (64, 128)
        assert f.get_tensor("model.norm.weight").eq(1).all()
        std = f.get_tensor("lm_head.weight").std().item()
        assert abs(std - 0.02) < 0.002
    per_layer = [f"self_attn.{p}_proj.weight" for p in "qkvo"]
    per_layer += [f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    per_layer += ["input_layernorm.weight", "post_attention_layernorm.weight"]
    expected = {f"model.layers.{i}.{n}" for i in range(4) for n in per_layer}
    expected |= {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    assert names == expected


def test_deterministic_and_idempotent(tiny_dir, tmp_path):
    other = ensure_tiny_checkpoint(str(tmp_path))
    assert other != tiny_dir
    for name in ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json"):
        assert _sha(os.path.join(other, name)) == _sha(os.path.join(tiny_dir, name)), name
    # A second call reuses the directory (no rewrite) and leaves no temp dirs behind.
    mtime = os.path.getmtime(os.path.join(other, "model.safetensors"))
    assert ensure_tiny_checkpoint(str(tmp_path)) == other
    assert os.path.getmtime(os.path.join(other, "model.safetensors")) == mtime
    assert os.listdir(tmp_path) == [TINY_VERSION]


def test_default_cache_dir_and_resolve(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = resolve_model_path(TINY_MODEL_NAME)
    assert path == os.path.join(str(tmp_path), "raytp", TINY_VERSION)
    assert os.path.isfile(os.path.join(path, "model.safetensors"))
    assert resolve_model_path("/models/llama") == "/models/llama"


def test_loads_in_transformers(tiny_dir):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model, info = transformers.LlamaForCausalLM.from_pretrained(tiny_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.vocab_size == 1024 and model.dtype == torch.float32
    with safe_open(os.path.join(tiny_dir, "model.safetensors"), "pt") as f:
        assert torch.equal(model.lm_head.weight.detach(), f.get_tensor("lm_head.weight"))

    tok = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    ids = tok("Hello world").input_ids
    assert ids[0] == 1  # <s> prepended
    assert tok.decode(ids, skip_special_tokens=True) == "Hello world"
    logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), 1024) and torch.isfinite(logits).all()


def test_lost_race_returns_winner(tmp_path, monkeypatch):
    # Another process renames its complete copy into place while we are writing ours:
    # our rename fails, we keep the winner's directory and remove our temp dir.
    import raytp.tiny as tiny

    real_rename = os.rename
    final = os.path.join(str(tmp_path), TINY_VERSION)

    def rename_after_winner(src, dst):
        os.makedirs(dst)
        open(os.path.join(dst, "config.json"), "w").write("{}")  # the "winner's" files
        real_rename(src, dst)

    monkeypatch.setattr(tiny.os, "rename", rename_after_winner)
    assert ensure_tiny_checkpoint(str(tmp_path)) == final
    assert os.listdir(final) == ["config.json"]
    assert os.listdir(tmp_path) == [TINY_VERSION]
