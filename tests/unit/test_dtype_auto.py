"""dtype auto follows the checkpoint: what each kind of checkpoint is served in, on CPU and CUDA."""
from __future__ import annotations

import json
import os

import pytest

from raytp import config as config_module
from raytp.config import EngineConfig
from raytp.model.loader import checkpoint_dtype
from tests.helpers import write_gguf, write_llama


def _resolved(device: str, checkpoint: str | None, dtype: str = "auto") -> str:
    return EngineConfig(model="m", device=device, dtype=dtype).resolved_dtype(checkpoint)


@pytest.mark.parametrize("checkpoint,bf16_cpu,expected", [
    ("bfloat16", True, "bfloat16"),
    ("float16", True, "bfloat16"),  # no float16 arithmetic on the CPU: bfloat16 keeps the range
    ("float32", True, "float32"),
    (None, True, "float32"),
    ("bfloat16", False, "float32"),  # emulated bfloat16 would be slower than float32
])
def test_auto_on_cpu(monkeypatch, checkpoint, bf16_cpu, expected):
    monkeypatch.setattr(config_module, "cpu_computes_bf16", lambda: bf16_cpu)
    assert _resolved("cpu", checkpoint) == expected


@pytest.mark.parametrize("checkpoint,expected", [("float16", "float16"), ("bfloat16", "bfloat16"),
                                                 ("float32", "bfloat16"), (None, "bfloat16")])
def test_auto_on_cuda(checkpoint, expected):
    assert _resolved("cuda", checkpoint) == expected


def test_an_explicit_dtype_is_kept():
    assert _resolved("cpu", "bfloat16", dtype="float32") == "float32"
    assert _resolved("cuda", "float16", dtype="bfloat16") == "bfloat16"


def test_checkpoint_dtype_is_read_from_config_json(tmp_path):
    path = write_llama(tmp_path)
    assert checkpoint_dtype(path) == "float32"  # as transformers saved the float32 model
    config_file = os.path.join(path, "config.json")
    with open(config_file) as f:
        config = json.load(f)
    config.pop("torch_dtype", None)
    config["dtype"] = "bfloat16"  # transformers 5 writes `dtype`
    with open(config_file, "w") as f:
        json.dump(config, f)
    assert checkpoint_dtype(path) == "bfloat16"


@pytest.mark.parametrize("types,expected", [
    ({}, "bfloat16"),  # quantized matrices (tests.helpers.GGUF_TYPES mixes Q8_0, Q4_0, ... with F16 and F32)
    ({name: "F16" for name in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down",
                               "token_embd")}, "float16"),
    ({name: "F32" for name in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down",
                               "token_embd")}, "float32"),
])
def test_checkpoint_dtype_of_a_gguf_file_is_its_matrices(tmp_path, types, expected):
    assert checkpoint_dtype(write_gguf(write_llama(tmp_path), types)) == expected
