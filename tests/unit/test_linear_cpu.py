"""raytp's CPU linear op (linear_cpu.cpp), float32 and bfloat16, against torch's matmul in float64."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from raytp.model import cpu_ops
from raytp.model.layers import ColumnParallelLinear

op = cpu_ops.linear_op()
op_bf16 = cpu_ops.linear_op("bfloat16")
pytestmark = pytest.mark.skipif(op is None, reason="raytp's linear op needs AVX-512 and a C++ toolchain")
needs_bf16 = pytest.mark.skipif(op_bf16 is None, reason="the bfloat16 kernel needs AVX512-BF16")


@pytest.mark.parametrize("rows", [1, 2, 7, 8, 9, 16, 33, 100])
@pytest.mark.parametrize("out_features,in_features", [(16, 64), (17, 3), (40, 1), (512, 1536), (1000, 96)])
def test_linear_matches_matmul(rows, out_features, in_features):
    gen = torch.Generator().manual_seed(rows * 1000 + out_features)
    x = torch.randn(rows, in_features, generator=gen)
    w = torch.randn(out_features, in_features, generator=gen)
    out = op.linear(x, op.pack(w), out_features)
    expected = (x.double() @ w.double().T).float()
    assert out.shape == (rows, out_features)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5 * in_features**0.5)


def test_linear_with_two_threads_is_the_same():
    x, w = torch.randn(5, 256), torch.randn(3000, 256)
    packed = op.pack(w)
    one = op.linear(x, packed, 3000)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        two = op.linear(x, packed, 3000)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)  # each output column is one chain of FMAs, whichever thread computes it


def test_a_packed_column_parallel_layer_uses_it_with_its_bias():
    layer = ColumnParallelLinear(48, 40, bias=True, dtype=torch.float32)
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(6, 48)
    expected = F.linear(x, layer.weight, layer.bias)
    layer.pack()
    assert layer.kernel == "raytp"
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@needs_bf16
def test_a_bf16_weight_packed_for_another_shape_is_refused():
    packed = op_bf16.pack(torch.randn(32, 64).bfloat16())
    with pytest.raises(RuntimeError, match="packed does not match"):
        op_bf16.linear(torch.randn(2, 62).bfloat16(), packed, 32)
    with pytest.raises(RuntimeError, match="packed does not match"):
        op_bf16.linear(torch.randn(2, 64), packed, 32)  # a float32 x
    with pytest.raises(RuntimeError, match="even number of input features"):
        op_bf16.pack(torch.randn(32, 63).bfloat16())


@needs_bf16
def test_a_bf16_layer_with_an_odd_input_width_keeps_onednn():
    layer = ColumnParallelLinear(63, 32, bias=False, dtype=torch.bfloat16)
    torch.nn.init.normal_(layer.weight)
    layer.pack()
    assert layer.kernel == "onednn"


def test_a_weight_packed_for_another_shape_is_refused():
    packed = op.pack(torch.randn(32, 64))
    with pytest.raises(RuntimeError, match="packed does not match"):
        op.linear(torch.randn(2, 48), packed, 32)
    with pytest.raises(RuntimeError, match="packed does not match"):
        op.linear(torch.randn(2, 64), packed, 48)


@needs_bf16
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 33])
@pytest.mark.parametrize("out_features,in_features", [(16, 64), (17, 2), (40, 4), (512, 1536), (1000, 98)])
def test_bf16_linear_is_the_exact_product_rounded_once(rows, out_features, in_features):
    """bfloat16 in, float32 sums, one rounding to bfloat16 at the end: within half a bfloat16 step (plus float32
    summation error) of the exact product of the same bfloat16 numbers (normal numbers: vdpbf16ps flushes
    denormals). N not a multiple of 16 exercises the column masks."""
    gen = torch.Generator().manual_seed(rows * 1000 + out_features)
    x = torch.randn(rows, in_features, generator=gen).bfloat16()
    w = torch.randn(out_features, in_features, generator=gen).bfloat16()
    out = op_bf16.linear(x, op_bf16.pack(w), out_features)
    exact = x.double() @ w.double().T
    assert out.dtype == torch.bfloat16 and out.shape == (rows, out_features)
    torch.testing.assert_close(out.double(), exact, rtol=2**-8, atol=1e-5 * in_features**0.5)


@needs_bf16
def test_a_bf16_layer_packs_for_it_and_matches_onednn():
    layer = ColumnParallelLinear(96, 50, bias=True, dtype=torch.bfloat16)
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(5, 96).bfloat16()
    expected = F.linear(x, layer.weight, layer.bias)
    layer.pack()
    assert layer.kernel == "raytp" and layer.packed.dtype == torch.bfloat16
    torch.testing.assert_close(layer(x), expected, rtol=2**-7, atol=1e-2)
