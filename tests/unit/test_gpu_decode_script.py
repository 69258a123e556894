"""benchmarks/gpu_decode.py (the GPU decode benchmark): its batch-1 byte count for the Llama-3-8B shape is the
model's size. (It runs end to end on CPU with its small shape inside benchmarks/gpu_check.sh's dry run:
tests/unit/test_gpu_check_script.py.)"""
import importlib.util
import os

import pytest
import torch

pytestmark = pytest.mark.timeout(120)

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "gpu_decode.py")


def _module():
    spec = importlib.util.spec_from_file_location("gpu_decode", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_llama3_8b_batch1_bytes_are_the_weights_without_the_embedding_table():
    mod = _module()
    from raytp.random_checkpoint import llama_config

    shape = dict(mod.SHAPES["llama3-8b"])
    shape.pop("rope_theta")
    config = llama_config(**shape)
    params = 8_030_261_248  # Llama-3-8B
    embedding = 128256 * 4096
    weights_only = mod.bytes_per_token(config, torch.bfloat16, context=0)
    assert weights_only == 2 * (params - embedding + 4096)  # + the one embedding row a token reads
    # The KV cache adds 2 (K, V) x 32 layers x 8 KV heads x 128 dims x 2 bytes per position.
    assert mod.bytes_per_token(config, torch.bfloat16, context=100) - weights_only == 100 * 2 * 32 * 8 * 128 * 2
