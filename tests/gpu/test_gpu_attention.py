"""CUDA: flash attention through torch against the reference on mixed steps, at the paged kernel's page size and at
a block size it refuses (keys gathered per layer); skipped without CUDA. tests/unit/test_cuda_attention_selection.py
covers the selection logic without a GPU."""
import pytest
import torch

from raytp.model.attention import build_metadata, random_step, select_backend
from raytp.model.attention.cuda import paged_kernel_fits

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# Prompts, decode rows (one over 4k keys), chunks after a cached prefix.
MIXED = [(0, 9), (5, 1), (13, 1), (8, 6), (0, 1), (4100, 1), (3, 17), (2000, 64)]
DECODE = [(5, 1), (4100, 1), (700, 1), (30, 1)]


@pytest.mark.parametrize("block_size", [256, 16])
@pytest.mark.parametrize("heads,kv_heads,window", [(8, 8, None), (8, 2, None), (8, 1, None), (8, 2, 500)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_backend_matches_reference(heads, kv_heads, window, dtype, block_size):
    fast, reference = select_backend("cuda", "cuda", dtype, block_size), select_backend("cuda", "reference")
    assert fast.label == ("cuda-paged" if paged_kernel_fits(block_size) else "cuda-gathered")
    for spec in (MIXED, DECODE):
        chunks, q, k, v, cache = random_step(spec, heads, kv_heads, 128, block_size, dtype, "cuda", seed=heads + kv_heads)
        outs = []
        for backend in (fast, reference):
            meta = build_metadata(chunks, block_size, torch.device("cuda"), window)
            outs.append(backend.forward(q, k, v, cache.clone(), meta, 128**-0.5).float())
        assert (outs[0] - outs[1]).abs().max().item() < 3e-2


def test_float32_on_cuda_falls_back_to_the_reference():
    assert select_backend("cuda", "auto", torch.float32, 256).label == "reference"
