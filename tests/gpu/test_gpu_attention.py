"""CUDA: the flash-attention varlen backend against the reference on mixed steps (skipped without CUDA)."""
import pytest
import torch

from raytp.model.attention import build_metadata, random_step, select_backend

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

MIXED = [(0, 9), (5, 1), (13, 1), (8, 6), (0, 1), (30, 1), (3, 17)]


@pytest.mark.parametrize("heads,kv_heads,window", [(8, 8, None), (8, 2, None), (8, 1, None), (8, 2, 5)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_backend_matches_reference(heads, kv_heads, window, dtype):
    fast, reference = select_backend("cuda", "cuda", dtype), select_backend("cuda", "reference")
    chunks, q, k, v, cache = random_step(MIXED, heads, kv_heads, 64, 16, dtype, "cuda", seed=heads + kv_heads)
    outs = []
    for backend in (fast, reference):
        meta = build_metadata(chunks, 16, torch.device("cuda"), window)
        outs.append(backend.forward(q, k, v, cache.clone(), meta, 0.125).float())
    assert (outs[0] - outs[1]).abs().max().item() < 3e-2


def test_float32_on_cuda_falls_back_to_the_reference():
    assert select_backend("cuda", "auto", torch.float32).name == "reference"
