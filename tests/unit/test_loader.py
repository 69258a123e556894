"""The checkpoint loader: per-rank shards, sharded checkpoints, and an error message for each way a directory can be wrong.

Shards are built in this process with tests.helpers.ShardOnly: loading never communicates.
"""
import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from raytp.cluster.comm import SingleRank
from raytp.model.loader import CheckpointError, load_model, weight_bytes
from tests.helpers import ShardOnly, write_llama


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return write_llama(tmp_path_factory.mktemp("loader"), seed=0)


def load(path, rank=0, world=1):
    return load_model(str(path), SingleRank() if world == 1 else ShardOnly(rank, world), progress=False)


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_tp2_rank_holds_half_the_weights(llama):
    full = load(llama)
    shards = [load(llama, r, 2) for r in range(2)]
    for shard in shards:
        ratio = weight_bytes(shard) / weight_bytes(full)
        assert 0.45 <= ratio <= 0.55, ratio
    # The shards are the full model's slices: rows of column-parallel weights, columns of row-parallel ones.
    f, s0, s1 = state(full), state(shards[0]), state(shards[1])
    for name in ("layers.0.mlp.down_proj.weight", "layers.1.self_attn.o_proj.weight"):
        assert torch.equal(torch.cat([s0[name], s1[name]], dim=1), f[name])
    assert torch.equal(torch.cat([s0["embed_tokens.weight"], s1["embed_tokens.weight"]]), f["embed_tokens.weight"])
    gate, up = f["layers.0.mlp.gate_up_proj.weight"].chunk(2)
    assert torch.equal(s1["layers.0.mlp.gate_up_proj.weight"], torch.cat([gate[64:], up[64:]]))
    assert torch.equal(s0["norm.weight"], f["norm.weight"])


def test_sharded_checkpoint_matches_single_file(tmp_path):
    single = write_llama(tmp_path, seed=3, name="single")
    sharded = write_llama(tmp_path, seed=3, name="sharded", max_shard_size="20KB")
    files = os.listdir(sharded)
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    assert len([f for f in files if f.endswith(".safetensors")]) > 1
    for rank, world in ((0, 1), (1, 2)):
        a, b = state(load(single, rank, world)), state(load(sharded, rank, world))
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), name


def _edit_tensors(path, edit):
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    path = str(tmp_path / "gpt2")
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)).save_pretrained(path)
    with pytest.raises(CheckpointError) as err:
        load(path)
    message = str(err.value)
    assert "unsupported architecture" in message and "GPT2LMHeadModel" in message
    assert "LlamaForCausalLM" in message  # says what is supported


def test_missing_tensor(tmp_path):
    path = write_llama(tmp_path)
    _edit_tensors(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' is missing"):
        load(path)


def test_tensor_shape_differs_from_config(tmp_path):
    path = write_llama(tmp_path)
    name = "model.layers.0.self_attn.k_proj.weight"  # (kv_heads * head_dim, hidden) = (32, 64)

    def shrink(t):
        t[name] = t[name][:16].contiguous()

    _edit_tensors(path, shrink)
    with pytest.raises(CheckpointError) as err:
        load(path)
    message = str(err.value)
    assert name in message and "[16, 64]" in message and "[32, 64]" in message and "config.json" in message


def test_heads_not_divisible_by_tp(llama):
    with pytest.raises(CheckpointError) as err:
        load(llama, 0, 3)
    message = str(err.value)
    assert "num_attention_heads=4" in message and "tensor_parallel_size=3" in message


def test_intermediate_not_divisible_by_tp(tmp_path):
    path = write_llama(tmp_path, intermediate_size=130)
    load(path, 0, 2)  # 130 = 2 * 65: fine
    with pytest.raises(CheckpointError) as err:
        load(path, 0, 4)
    message = str(err.value)
    assert "intermediate_size=130" in message and "tensor_parallel_size=4" in message
    assert "heads" not in message  # 4 heads and 2 KV heads do fit TP=4


def test_directory_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load(tmp_path)


def test_path_that_does_not_exist(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(CheckpointError, match=re.escape(f"{str(missing)!r} is not a directory")):
        load(missing)


def test_pickle_checkpoint_is_not_loaded(tmp_path, llama):
    path = tmp_path / "bin_only"
    path.mkdir()
    with open(os.path.join(llama, "config.json")) as f:
        (path / "config.json").write_text(json.dumps(json.load(f)))
    torch.save(load_file(os.path.join(llama, "model.safetensors")), path / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as err:
        load(path)
    message = str(err.value)
    assert "pytorch_model.bin" in message and "pickle" in message and "not loaded" in message
