"""raytp's CPU linear op (linear_cpu.cpp), float32, bfloat16, int8 and int4, against torch's matmul in float64."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from raytp.model import cpu_ops
from raytp.model.layers import SGEMM_FROM_ROWS, ColumnParallelLinear, amx_computes_bf16

op = cpu_ops.linear_op()
op_bf16 = cpu_ops.linear_op("bfloat16")
pytestmark = pytest.mark.skipif(op is None, reason="raytp's linear op needs AVX-512 and a C++ toolchain")
op_int8 = cpu_ops.linear_op("int8")
op_int4 = cpu_ops.linear_op("int4")
needs_bf16 = pytest.mark.skipif(op_bf16 is None, reason="the bfloat16 kernel needs AVX512-BF16")
needs_int8 = pytest.mark.skipif(op_int8 is None, reason="the int8 kernel needs AVX512-VNNI and AVX512-BF16")
needs_int4 = pytest.mark.skipif(op_int4 is None, reason="the int4 kernel needs AVX512-VNNI and AVX512-BF16")


@pytest.mark.parametrize("rows", [1, 2, 7, 8, 9, 16, 33, 100, 300])
@pytest.mark.parametrize("out_features,in_features", [(16, 64), (17, 3), (40, 1), (512, 1536), (1000, 96), (97, 40)])
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


@pytest.mark.parametrize("rows", [1, SGEMM_FROM_ROWS - 1, SGEMM_FROM_ROWS, 2 * SGEMM_FROM_ROWS + 3])
def test_a_packed_float32_layer_computes_every_row_count(rows):
    # decode rows through raytp's op; prompt chunks from SGEMM_FROM_ROWS rows through MKL where that is faster
    layer = ColumnParallelLinear(96, 200, bias=False, dtype=torch.float32)
    torch.nn.init.normal_(layer.weight)
    layer.pack()
    x = torch.randn(rows, 96)
    torch.testing.assert_close(layer(x), (x.double() @ layer.weight.double().T).float(), rtol=1e-5, atol=1e-4)


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
@pytest.mark.parametrize("amx", [False, pytest.param(True, marks=pytest.mark.skipif(
    op_bf16 is None or not op_bf16.amx(), reason="AMX tiles: a CPU with them"))])
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 16, 17, 33, 70])
@pytest.mark.parametrize("out_features,in_features", [(16, 64), (17, 2), (40, 4), (48, 32), (512, 1536), (1000, 98),
                                                      (1000, 96)])
def test_bf16_linear_is_the_exact_product_rounded_once(amx, rows, out_features, in_features):
    """bfloat16 in, float32 sums, one rounding to bfloat16 at the end: within half a bfloat16 step (plus float32
    summation error) of the exact product of the same bfloat16 numbers (normal numbers: vdpbf16ps and AMX flush
    denormals), on the AVX512-BF16 kernel and on AMX tiles (which take in_features multiples of 32 and leave the
    others to the former). N not a multiple of 16 or of 32 exercises the column masks and an unpaired last block;
    rows past 16 and 32 a second row tile and a second pass."""
    gen = torch.Generator().manual_seed(rows * 1000 + out_features)
    x = torch.randn(rows, in_features, generator=gen).bfloat16()
    w = torch.randn(out_features, in_features, generator=gen).bfloat16()
    out = op_bf16.linear(x, op_bf16.pack(w), out_features, amx=amx)
    exact = x.double() @ w.double().T
    assert out.dtype == torch.bfloat16 and out.shape == (rows, out_features)
    torch.testing.assert_close(out.double(), exact, rtol=2**-8, atol=1e-5 * in_features**0.5)


@needs_bf16
@pytest.mark.parametrize("in_features", [96, 98])
def test_a_bf16_layer_packs_for_the_fast_kernel_and_matches_torch(in_features):
    """raytp's op; on a CPU with AMX tiles oneDNN's packed GEMM only where raytp's op cannot use them (an input
    width not a multiple of 32)."""
    layer = ColumnParallelLinear(in_features, 50, bias=True, dtype=torch.bfloat16)
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(5, in_features).bfloat16()
    expected = F.linear(x, layer.weight, layer.bias)
    layer.pack()
    takes_onednn = amx_computes_bf16() and not (op_bf16.amx() and in_features % 32 == 0)
    assert layer.kernel == ("onednn" if takes_onednn else "raytp") and layer.packed.dtype == torch.bfloat16
    torch.testing.assert_close(layer(x), expected, rtol=2**-7, atol=1e-2)


@pytest.mark.skipif(op_bf16 is None or not op_bf16.amx(), reason="AMX tiles: a CPU with them")
@pytest.mark.parametrize("rows", [1, 17, 33, 70])
@pytest.mark.parametrize("intermediate,in_features", [(16, 64), (48, 576), (512, 96)])
def test_gate_and_up_in_one_pass_are_silu_of_gate_times_up(rows, intermediate, in_features):
    """An MLP's gate and up projections through raytp's op on AMX tiles, silu(gate) * up in the same pass: what
    torch computes in bfloat16 from the same weights (F.linear, F.silu, the product, each rounded), within a
    bfloat16 step of each rounding."""
    from raytp.model.layers import silu_mul

    layer = ColumnParallelLinear(in_features, 2 * intermediate, bias=False, dtype=torch.bfloat16)
    torch.nn.init.normal_(layer.weight, std=in_features**-0.5)
    layer.pack()
    assert layer.kernel == "raytp" and layer._fused_silu_mul is not None
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows)).bfloat16()
    gate, up = F.linear(x, layer.weight).chunk(2, dim=-1)
    out = layer.silu_mul(x)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, intermediate)
    torch.testing.assert_close(out, F.silu(gate) * up, rtol=2**-6, atol=2**-8)
    torch.testing.assert_close(out, silu_mul(layer(x)), rtol=2**-6, atol=2**-8)  # the unfused op's result


# ---- int8: weights per output column, x per row and 32 k --------------------------------------------------------


def _integer_operands(rows: int, out_features: int, in_features: int, gen: torch.Generator):
    """x and w whose int8 quantization is exact: integers in [-127, 127], every weight row and every 32 values of
    an x row reaching 127 (so each scale is exactly 1)."""
    x = torch.randint(-127, 128, (rows, in_features), generator=gen).float()
    w = torch.randint(-127, 128, (out_features, in_features), generator=gen).float()
    x.view(rows, -1, 32)[..., 0] = 127
    w[:, 0] = -127
    return x, w


@needs_int8
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 9, 33])
@pytest.mark.parametrize("out_features,in_features", [(16, 32), (17, 64), (40, 96), (512, 1536), (1000, 576)])
def test_int8_linear_is_exact_where_the_quantization_is(rows, out_features, in_features):
    """Integer operands within the int8 range are their own quantization: the int32 sums are the exact product,
    so the float32 result is exact (all values below 2^24). N not a multiple of 16 exercises the column masks, row
    counts past 4 the row tiles."""
    gen = torch.Generator().manual_seed(rows * 1000 + out_features)
    x, w = _integer_operands(rows, out_features, in_features, gen)
    q, scales = op_int8.pack_int8(w)
    assert q.dtype == torch.uint8 and scales.dtype == torch.float32
    assert torch.equal(scales[:out_features], torch.ones(out_features))
    out = op_int8.linear_int8(x, q, scales, out_features)
    assert out.shape == (rows, out_features)
    assert torch.equal(out.double(), x.double() @ w.double().T)


@pytest.mark.parametrize("quantization", ["int8", "int4"])
@pytest.mark.parametrize("settings,named", [(dict(device="cuda"), "device"), (dict(pack_weights=False), "pack_weights")])
def test_quantization_is_refused_where_the_op_cannot_run(settings, named, quantization):
    from raytp.config import ConfigError, EngineConfig

    with pytest.raises(ConfigError, match=f"quantization='{quantization}'.*{named}"):
        EngineConfig.parse(dict(model="tiny", quantization=quantization, **settings))
    with pytest.raises(ValueError, match="CPU only"):
        cpu_ops.check_quantization(quantization, "cuda")


# ---- int4: weights per output column and 32 k (w ~ d q + mn, q in 0 .. 15), x per row and 32 k ------------------


def _int4_grid_operands(rows: int, out_features: int, in_features: int, gen: torch.Generator):
    """x as for int8 (its own quantization), and w whose int4 quantization is exact: every group of 32 weights of a
    column is mn + q with q in 0 .. 15 reaching both ends (so d = 1 and the minimum is mn, integers in float16)."""
    x = torch.randint(-127, 128, (rows, in_features), generator=gen).float()
    x.view(rows, -1, 32)[..., 0] = 127
    q = torch.randint(0, 16, (out_features, in_features // 32, 32), generator=gen).float()
    q[..., 0], q[..., 1] = 0, 15
    mn = torch.randint(-20, 5, (out_features, in_features // 32, 1), generator=gen).float()
    return x, (q + mn).view(out_features, in_features)


@needs_int4
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 9, 33])
@pytest.mark.parametrize("out_features,in_features", [(16, 32), (17, 64), (40, 96), (512, 1536), (1000, 576)])
def test_int4_linear_is_exact_where_the_quantization_is(rows, out_features, in_features, dtype):
    """On the int4 grid the int32 sums are exact and each group's d sum(p q) + mn sum(p) too (integers below 2^24):
    the result is the exact product, rounded once to x's dtype. N not a multiple of 16 exercises the column masks,
    row counts past 4 the row tiles."""
    gen = torch.Generator().manual_seed(rows * 1000 + out_features)
    x, w = _int4_grid_operands(rows, out_features, in_features, gen)
    q, scales = op_int4.pack_int4(w)
    assert q.dtype == torch.uint8 and scales.dtype == torch.float16
    assert q.shape == (-(-out_features // 16), in_features // 8, 64)  # 4 bits a weight
    out = op_int4.linear_int4(x.to(dtype), q, scales, out_features)
    assert out.shape == (rows, out_features) and out.dtype == dtype
    assert torch.equal(out, (x.double() @ w.double().T).to(dtype))


# ---- both quantized kernels -----------------------------------------------------------------------------------

QUANTIZED = [pytest.param("int8", marks=needs_int8), pytest.param("int4", marks=needs_int4)]


def _weight_error_bound(kernel: str, w: torch.Tensor) -> torch.Tensor:
    """w (N, K) float64 -> how far each of its quantized weights may be off (N, K): half a step, where int8's step
    is its column's max |w| / 127 and int4's its group's (max - min) / 15, plus float16's rounding of int4's step
    (relative 2^-11, times q <= 15) and minimum."""
    N, K = w.shape
    if kernel == "int8":
        return (w.abs().amax(1, keepdim=True) / 254).expand(N, K)
    groups = w.view(N, K // 32, 32)
    span = groups.amax(-1) - groups.amin(-1)  # (N, K / 32)
    return (span / 30 * (1 + 2**-9) + groups.abs().amax(-1) * 2**-11).repeat_interleave(32, dim=1)


@pytest.mark.parametrize("kernel", QUANTIZED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 6])
def test_quantized_linear_error_is_within_the_quantization_bound(kernel, dtype, rows):
    """Real-valued operands: each weight is off by at most its bound (above) and each x value by half its group's
    step (max |x[m, g]| / 254); the product may be off by the sum of those terms, plus one rounding to the output
    dtype."""
    op_q = cpu_ops.linear_op(kernel)
    gen = torch.Generator().manual_seed(rows)
    N, K = 300, 576
    x = torch.randn(rows, K, generator=gen).to(dtype)
    w = torch.randn(N, K, generator=gen).to(dtype)
    out = getattr(op_q, f"linear_{kernel}")(x, *getattr(op_q, f"pack_{kernel}")(w), N)
    assert out.dtype == dtype
    xd, wd = x.double(), w.double()
    dw = _weight_error_bound(kernel, wd)  # (N, K)
    dx = (xd.view(rows, -1, 32).abs().amax(-1, keepdim=True) / 254).expand(rows, K // 32, 32).reshape(rows, K)
    bound = xd.abs() @ dw.T + dx @ wd.abs().T + dx @ dw.T  # (rows, N)
    exact = xd @ wd.T
    rounding = exact.abs() * (2**-8 if dtype == torch.bfloat16 else 1e-6) + 1e-4
    assert ((out.double() - exact).abs() <= bound + rounding).all()
    assert (out.double() - exact).abs().mean() < 0.25 * bound.mean()  # and well inside it on average


@pytest.mark.parametrize("kernel", QUANTIZED)
def test_quantized_ops_refuse_mismatched_operands(kernel):
    op_q = cpu_ops.linear_op(kernel)
    pack, linear = getattr(op_q, f"pack_{kernel}"), getattr(op_q, f"linear_{kernel}")
    q, scales = pack(torch.randn(32, 64))
    with pytest.raises(RuntimeError, match="do not match"):
        linear(torch.randn(2, 96), q, scales, 32)
    with pytest.raises(RuntimeError, match="do not match"):
        linear(torch.randn(2, 64), q, scales, 48)
    other = "int4" if kernel == "int8" else "int8"  # the other kernel's packing is not this one's
    with pytest.raises(RuntimeError, match="do not match"):
        linear(torch.randn(2, 64), *getattr(op_q, f"pack_{other}")(torch.randn(32, 64)), 32)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        pack(torch.randn(32, 48))


@pytest.mark.parametrize("kernel", QUANTIZED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_quantized_layer_quantizes_where_it_can(dtype, kernel):
    torch.manual_seed(0)
    layer = ColumnParallelLinear(64, 40, bias=True, dtype=dtype)
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(3, 64).to(dtype)
    expected = F.linear(x.double(), layer.weight.double(), layer.bias.double())
    layer.pack(kernel)
    assert layer.kernel == kernel
    # the error bounds' own tests are above; here: the layer computes with its quantized weight and adds its bias
    assert (layer(x).double() - expected).abs().mean() < 0.1 * expected.abs().mean()
    narrow = ColumnParallelLinear(48, 16, bias=False, dtype=dtype)  # 48 is no multiple of 32: keeps its dtype
    narrow.pack(kernel)
    assert narrow.kernel in ("raytp", "onednn")
