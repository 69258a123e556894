"""raytp's per-token CPU ops (rowwise_cpu.cpp) against transformers' Llama modules, float32 and bfloat16: RMSNorm,
the residual add + RMSNorm, rotary embedding with the KV cache write, SiLU(gate) * up; and the row argmax of greedy
sampling against torch.argmax."""
from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from raytp.model import cpu_ops
from raytp.model.attention import build_metadata, random_step
from raytp.model.attention.cpu import CpuPagedAttention
from raytp.model.layers import RMSNorm, RotaryEmbedding, silu_mul

op = cpu_ops.rowwise_op()
pytestmark = pytest.mark.skipif(op is None, reason="raytp's per-token ops need a C++ toolchain")
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


def _norm_pair(hidden: int, dtype: torch.dtype, gen: torch.Generator) -> tuple[LlamaRMSNorm, RMSNorm]:
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype)
    reference = LlamaRMSNorm(hidden, eps=1e-5).to(dtype)
    reference.weight.data.copy_(weight)
    ours = RMSNorm(hidden, 1e-5, dtype)
    ours.weight.data.copy_(weight)
    return reference, ours


@DTYPES
@pytest.mark.parametrize("rows,hidden", [(1, 576), (7, 64), (300, 1536), (2, 5)])
def test_rms_norm_matches_transformers(dtype, rows, hidden):
    gen = torch.Generator().manual_seed(rows * 7 + hidden)
    reference, ours = _norm_pair(hidden, dtype, gen)
    x = (3 * torch.randn(rows, hidden, generator=gen)).to(dtype)
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


@DTYPES
@pytest.mark.parametrize("rows", [1, 37])
def test_add_and_norm_is_the_residual_sum_and_its_norm(dtype, rows):
    """As in transformers' decoder layer: x + h in the dtype, then the norm of that sum."""
    gen = torch.Generator().manual_seed(rows)
    reference, ours = _norm_pair(576, dtype, gen)
    x, h = (torch.randn(2, rows, 576, generator=gen) * 2).to(dtype)
    with torch.no_grad():
        expected_sum = x + h
        expected = reference(expected_sum)
        got_sum, got = ours.add_and_norm(x.clone(), h)
    assert torch.equal(got_sum, expected_sum)
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    else:
        torch.testing.assert_close(got, expected, rtol=2**-7, atol=0)
        assert (got != expected).float().mean() < 0.01


@DTYPES
@pytest.mark.parametrize("chunks", [[(0, 5), (17, 1), (40, 3)], [(3, 1)]])
def test_rotate_and_cache_matches_transformers_rotary_and_writes_the_cache(dtype, chunks):
    """q and k rotated as transformers' apply_rotary_pos_emb does (the same roundings in bfloat16: bit-identical);
    k and v land at each token's cache slot, and nothing else in the cache changes."""
    H, Hkv, D = 6, 2, 64
    step, q, k, v, cache = random_step(chunks, H, Hkv, D, 16, dtype, seed=len(chunks))
    meta = build_metadata(step, 16, torch.device("cpu"))
    cos, sin = RotaryEmbedding(D, {"rope_theta": 10000.0})(meta.positions, dtype)  # (T, D)
    qkv = torch.cat([q.flatten(1), k.flatten(1), v.flatten(1)], dim=1)  # (T, (H + 2 Hkv) D)
    got_cache = cache.clone()
    got_q = CpuPagedAttention().rotate_and_cache(qkv, cos, sin, H, got_cache, meta)

    # transformers' layout: (batch 1, heads, T, D), cos/sin (1, T, D)
    q_ref, k_ref = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
    expected_cache = cache.clone()
    expected_cache[0][meta.slot_mapping] = k_ref[0].transpose(0, 1)
    expected_cache[1][meta.slot_mapping] = v
    for got, expected in ((got_q, q_ref[0].transpose(0, 1)), (got_cache, expected_cache)):
        if dtype == torch.bfloat16:
            assert torch.equal(got, expected)
        else:  # the compiler may fuse a product and the sum: one rounding fewer
            torch.testing.assert_close(got, expected)


@DTYPES
def test_silu_mul_matches_transformers_mlp_activation(dtype):
    gen = torch.Generator().manual_seed(3)
    gate_up = (torch.randn(9, 2 * 1536, generator=gen) * 3).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    expected = torch.nn.functional.silu(gate) * up  # transformers' LlamaMLP: act_fn(gate_proj(x)) * up_proj(x)
    got = silu_mul(gate_up)
    assert got.dtype == dtype and got.shape == (9, 1536)
    # exp differs from torch's vectorised one in the last float32 bits: in bfloat16 at most one step, rarely
    torch.testing.assert_close(got, expected, rtol=2**-7 if dtype == torch.bfloat16 else 1e-5, atol=1e-6)
    if dtype == torch.bfloat16:
        assert (got != expected).float().mean() < 0.01


def test_per_token_ops_refuse_mismatched_operands():
    with pytest.raises(RuntimeError, match="gate_up must be"):
        op.silu_mul(torch.randn(2, 7))
    with pytest.raises(RuntimeError, match="x and h must be"):
        op.add_rms_norm_(torch.randn(2, 8), torch.randn(2, 4), torch.ones(8), 1e-6)
    with pytest.raises(RuntimeError, match="qkv must be"):
        op.rotary_write_kv(torch.randn(3, 100), torch.randn(3, 16), torch.randn(3, 16), 4, torch.zeros(8, 1, 16),
                           torch.zeros(8, 1, 16), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("rows,vocab", [(1, 1), (3, 7), (16, 32000), (33, 49152)])
def test_argmax_rows_equals_torch_argmax(rows, vocab):
    gen = torch.Generator().manual_seed(rows + vocab)
    logits = 4 * torch.randn(rows, vocab, generator=gen)
    assert torch.equal(op.argmax_rows(logits), logits.argmax(dim=-1))
    sliced = logits[:, : max(1, vocab - 5)]  # a padded vocabulary's slice: rows apart by more than their length
    assert torch.equal(op.argmax_rows(sliced), sliced.argmax(dim=-1))


def test_argmax_rows_takes_the_first_of_equal_maxima_and_treats_nan_and_inf_as_torch_does():
    inf, nan = float("inf"), float("nan")
    logits = torch.tensor([
        [1.0, 3.0, 2.0, 3.0, 3.0],  # ties: the first
        [-inf, -inf, -inf, -inf, -inf],  # every token banned
        [-inf, 0.5, -inf, 0.5, -inf],
        [1.0, nan, 2.0, nan, inf],  # a NaN is the largest: the first NaN
        [1.0, 2.0, inf, 3.0, inf],
        [-1.0, -0.0, 0.0, -2.0, -3.0],  # -0 equals +0
    ])
    assert op.argmax_rows(logits).tolist() == logits.argmax(dim=-1).tolist() == [1, 0, 1, 1, 2, 1]


def test_greedy_sampling_picks_each_rows_argmax():
    from raytp.sampling import SamplingParams, sample

    logits = torch.randn(16, 32000, generator=torch.Generator().manual_seed(3))
    greedy = [SamplingParams(temperature=0.0)] * 16
    assert sample(logits, greedy, [0] * 16, torch.Generator()) == logits.argmax(dim=-1).tolist()
