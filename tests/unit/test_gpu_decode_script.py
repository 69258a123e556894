"""benchmarks/gpu_decode.py (the GPU decode benchmark) runs end to end on CPU with its small shape, so it works
when a GPU is lent; its batch-1 byte count for the Llama-3-8B shape is the model's size."""
import importlib.util
import json
import os
import subprocess
import sys

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


def test_small_shape_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--shape", "small", "--device", "cpu", "--dtype", "float32", "--batches", "1", "2",
         "--prompt-len", "16", "--new-tokens", "8", "--checkpoint-dir", str(tmp_path), "--out-json", str(out)],
        capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["device"].startswith("CPU") and result["shape"] == "small"
    assert result["copy_bandwidth_bytes_per_s"] > 0 and result["roofline_tokens_per_s"] > 0
    for key in ("raytp_decode_tokens_per_s", "transformers_decode_tokens_per_s"):
        assert set(result[key]) == {"1", "2"} and all(v > 0 for v in result[key].values())
    assert "batch 1: raytp at" in proc.stdout
