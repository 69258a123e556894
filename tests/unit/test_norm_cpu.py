"""raytp's CPU RMSNorm op (norm_cpu.cpp) against transformers' LlamaRMSNorm, float32 and bfloat16."""
from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from raytp.model import cpu_ops
from raytp.model.layers import RMSNorm

op = cpu_ops.norm_op()
pytestmark = pytest.mark.skipif(op is None, reason="raytp's RMSNorm op needs a C++ toolchain")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows,hidden", [(1, 576), (7, 64), (300, 1536), (2, 5)])
def test_rms_norm_matches_transformers(dtype, rows, hidden):
    gen = torch.Generator().manual_seed(rows * 7 + hidden)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype)
    x = (3 * torch.randn(rows, hidden, generator=gen)).to(dtype)
    reference = LlamaRMSNorm(hidden, eps=1e-5).to(dtype)
    reference.weight.data.copy_(weight)
    ours = RMSNorm(hidden, 1e-5, dtype)
    ours.weight.data.copy_(weight)
    with torch.no_grad():
        expected, got = reference(x), ours(x)
    assert got.dtype == dtype and got.shape == x.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    else:  # the same two roundings: at most one bfloat16 step apart (the sum of squares is added in another order)
        torch.testing.assert_close(got, expected, rtol=2**-7, atol=0)
        assert (got != expected).float().mean() < 0.01


def test_a_non_contiguous_input_is_normalised_row_by_row():
    x = torch.randn(8, 32)[:, ::2]  # (8, 16), strided
    weight = torch.rand(16)
    torch.testing.assert_close(op.rms_norm(x, weight, 1e-6), torch.nn.functional.rms_norm(x, (16,), weight, 1e-6))


def test_a_weight_of_another_dtype_or_size_is_refused():
    with pytest.raises(RuntimeError, match="weight must be"):
        op.rms_norm(torch.randn(2, 8), torch.ones(8, dtype=torch.bfloat16), 1e-6)
    with pytest.raises(RuntimeError, match="weight must be"):
        op.rms_norm(torch.randn(2, 8), torch.ones(4), 1e-6)
