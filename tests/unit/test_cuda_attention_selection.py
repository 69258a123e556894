"""The CUDA attention backend's selection and calls, without a GPU: torch's flash-attention entry points are replaced,
and only they, by stand-ins that check what FA2 checks (pages of a multiple of 256 tokens, int32 block tables and
lengths) and compute what FA2 computes (causal aligned to each sequence's last key, GQA, a left window), per
sequence through SDPA. Everything of raytp's (signature detection, block size, num_splits, metadata, the gathered
keys, the self-check, the fallback) runs as it would on a GPU. tests/gpu runs the real kernels."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

import torch.nn.attention.varlen as torch_varlen
from raytp.config import EngineConfig
from raytp.model.attention import build_metadata, random_step, select_backend
from raytp.model.attention import cuda as cuda_attention
from raytp.model.attention.cuda import CHECK_DECODE_STEP, CHECK_STEP, CudaFlashAttention
from raytp.model.attention.reference import ReferenceAttention

CPU = torch.device("cpu")


def flash_rows(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, left: int, scale: float) -> torch.Tensor:
    """FA2 on one sequence: q (n, H, D) are its last n positions; keys/values (L, Hkv, D) its whole context."""
    n, L = q.shape[0], keys.shape[0]
    pos = torch.arange(L - n, L).unsqueeze(1)  # (n, 1) position of each query row
    j = torch.arange(L).unsqueeze(0)  # (1, L)
    allowed = (j <= pos) & ((j >= pos - left) if left >= 0 else True)  # (n, L)
    groups = q.shape[1] // keys.shape[1]
    k, v = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)  # (L, H, D)
    out = F.scaled_dot_product_attention(q.transpose(0, 1).float(), k.transpose(0, 1).float(),
                                         v.transpose(0, 1).float(), attn_mask=allowed, scale=scale)
    return out.transpose(0, 1).to(q.dtype)  # (n, H, D)


class FakeKernels:
    """Stand-ins for varlen_attn (paged, torch >= 2.12) and aten's _flash_attention_forward, recording each call."""

    def __init__(self):
        self.calls: list[dict] = []

    def varlen_attn(self, query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
        page = key.shape[1]
        assert block_table is not None and seqused_k is not None
        if page % 256:  # FA2's own check, mha_varlen_fwd
            raise RuntimeError("Paged KV cache block size must be divisible by 256")
        assert block_table.dtype == torch.int32 and seqused_k.dtype == torch.int32 and cu_seq_q.dtype == torch.int32
        assert enable_gqa and window_size[1] == 0
        self.calls.append({"kind": "paged", "page": page, "num_splits": num_splits, "max_q": max_q,
                           "seqused_k": seqused_k.tolist()})
        outs = []
        for b in range(len(seqused_k)):
            L = int(seqused_k[b])
            pages = block_table[b, : -(-L // page)].long()
            keys = key[pages].flatten(0, 1)[:L]  # (L, Hkv, D)
            values = value[pages].flatten(0, 1)[:L]
            outs.append(flash_rows(query[cu_seq_q[b] : cu_seq_q[b + 1]], keys, values, window_size[0], scale))
        return torch.cat(outs)

    def flash_forward(self, query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
                      return_debug_mask, *, scale=None, window_size_left=None, window_size_right=None,
                      seqused_k=None, **unused):
        assert dropout_p == 0.0 and window_size_right == 0 and is_causal == (window_size_left == -1)
        assert key.shape[0] == int(cum_seq_k[-1])  # the keys come gathered, one sequence after another
        assert cum_seq_k.dtype == torch.int32 and (seqused_k is None or seqused_k.dtype == torch.int32)
        self.calls.append({"kind": "gathered", "max_q": max_q, "max_k": max_k, "cum_seq_k": cum_seq_k.tolist(),
                           "seqused_k": None if seqused_k is None else seqused_k.tolist()})
        # With seqused_k, FA2 reads only the first seqused_k[b] keys of sequence b's cum_seq_k range.
        ends = [int(cum_seq_k[b]) + (int(seqused_k[b]) if seqused_k is not None else
                                     int(cum_seq_k[b + 1] - cum_seq_k[b])) for b in range(len(cum_seq_q) - 1)]
        out = torch.cat([flash_rows(query[cum_seq_q[b] : cum_seq_q[b + 1]], key[cum_seq_k[b] : ends[b]],
                                    value[cum_seq_k[b] : ends[b]], window_size_left, scale)
                         for b in range(len(cum_seq_q) - 1)])
        return out, None, None, None, None


class FakeOp:
    """aten._flash_attention_forward's stand-in: the real op's schema (what raytp reads), the fake's computation."""

    def __init__(self, fn):
        self.default, self.fn = torch.ops.aten._flash_attention_forward.default, fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def varlen_attn_torch_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                           window_size=(-1, -1)):
    """torch 2.11's varlen_attn signature: no paged cache."""
    raise AssertionError("raytp must not call a varlen_attn that reads no paged cache")


@pytest.fixture
def kernels(monkeypatch):
    fake = FakeKernels()
    monkeypatch.setattr(torch_varlen, "varlen_attn", fake.varlen_attn)
    monkeypatch.setattr(torch.ops.aten, "_flash_attention_forward", FakeOp(fake.flash_forward))
    return fake


def run_step(backend, spec, block_size, window=None, heads=8, kv_heads=2, dtype=torch.bfloat16, seed=5):
    chunks, q, k, v, cache = random_step(spec, heads, kv_heads, 64, block_size, dtype, seed=seed)
    outs = [b.forward(q, k, v, cache.clone(), build_metadata(chunks, block_size, CPU, window), 0.125).float()
            for b in (backend, ReferenceAttention())]
    return (outs[0] - outs[1]).abs().max().item()


MIXED = [(0, 9), (5, 1), (13, 1), (700, 6), (0, 1), (300, 1), (3, 17), (1000, 40)]
DECODE = [(5, 1), (900, 1), (299, 1)]


def test_paged_kernel_at_256_token_pages_checks_itself_and_splits_only_decode_steps(kernels):
    backend = CudaFlashAttention(torch.bfloat16, 256, device="cpu")
    assert (backend.kernel, backend.label) == ("paged", "cuda-paged")
    # The self-check ran the kernel on a 4k context with chunks (one split) and on decode rows only.
    assert [c["seqused_k"] for c in kernels.calls] == [[s + n for s, n in CHECK_STEP],
                                                       [s + n for s, n in CHECK_DECODE_STEP]]
    assert max(s + n for s, n in CHECK_STEP) >= 4096
    assert [c["num_splits"] for c in kernels.calls] == [1, None]
    kernels.calls.clear()
    for window in (None, 300):
        assert run_step(backend, MIXED, 256, window) < 2e-2
        assert run_step(backend, DECODE, 256, window) < 2e-2
    assert [(c["page"], c["num_splits"]) for c in kernels.calls] == [(256, 1), (256, None)] * 2


@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (8, 2), (8, 1)])
def test_a_block_size_the_paged_kernel_refuses_runs_on_gathered_keys(kernels, heads, kv_heads):
    backend = CudaFlashAttention(torch.float16, 16, device="cpu")
    assert backend.label == "cuda-gathered" and "not a multiple of 256" in backend.describe()
    kernels.calls.clear()
    assert run_step(backend, MIXED, 16, None, heads, kv_heads, torch.float16) < 2e-2
    assert run_step(backend, MIXED, 16, 7, heads, kv_heads, torch.float16) < 2e-2
    assert {c["kind"] for c in kernels.calls} == {"gathered"}


def test_a_torch_whose_varlen_attn_reads_no_pages_gathers_at_any_block_size(kernels, monkeypatch):
    monkeypatch.setattr(torch_varlen, "varlen_attn", varlen_attn_torch_2_11)
    assert cuda_attention.paged_varlen_attn() is None
    backend = CudaFlashAttention(torch.bfloat16, 256, device="cpu")
    assert backend.kernel == "gathered" and "reads no paged cache" in backend.describe()
    assert run_step(backend, MIXED, 256) < 2e-2


def test_a_kernel_that_computes_wrong_fails_its_self_check(kernels, monkeypatch):
    def wrong(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
              window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
        return torch.zeros_like(query)

    monkeypatch.setattr(torch_varlen, "varlen_attn", wrong)
    with pytest.raises(RuntimeError, match="differs from the reference"):
        CudaFlashAttention(torch.bfloat16, 256, device="cpu")


def test_the_cuda_backend_that_cannot_run_is_an_error_when_named_and_a_logged_fallback_on_auto(caplog):
    # No CUDA here: the same path as a torch without flash attention or a failed self-check.
    with pytest.raises(RuntimeError, match="attention_backend 'cuda' cannot run here: CUDA is not available"):
        select_backend("cuda", "cuda", torch.bfloat16, 256)
    with caplog.at_level(logging.ERROR, logger="raytp.model.attention"):
        fallback = select_backend("cuda", "auto", torch.bfloat16, 256)
    assert fallback.label == "reference"
    assert any(r.levelno == logging.ERROR and "falling back to the reference" in r.getMessage() for r in caplog.records)
    with pytest.raises(RuntimeError, match="float16/bfloat16, not torch.float32"):
        CudaFlashAttention(torch.float32, 256, device="cpu")


def test_block_size_defaults_to_the_paged_kernels_page_on_cuda(kernels, monkeypatch):
    cuda = dict(model="tiny", device="cuda")
    assert EngineConfig(**cuda).resolved_block_size() == 256
    assert EngineConfig(**cuda, block_size=32).resolved_block_size() == 32  # asked for: gathered keys
    assert EngineConfig(**cuda, attention_backend="reference").resolved_block_size() == 16
    assert EngineConfig(model="tiny", device="cpu").resolved_block_size() == 16
    monkeypatch.setattr(torch_varlen, "varlen_attn", varlen_attn_torch_2_11)
    assert EngineConfig(**cuda).resolved_block_size() == 16


@pytest.mark.parametrize("block_size", [16, 256])
def test_a_decode_graph_s_fixed_key_span_reads_only_each_sequence_s_keys(kernels, block_size):
    """Decode graphs (cuda_graphs.py) fix the keys per sequence at key_span; the kernel is told the real lengths."""
    backend = CudaFlashAttention(torch.bfloat16, block_size, device="cpu")
    span = 1024
    for window in (None, 100):
        chunks, q, k, v, cache = random_step(DECODE, 8, 2, 64, block_size, torch.bfloat16, seed=3)
        ref = ReferenceAttention().forward(q, k, v, cache.clone(), build_metadata(chunks, block_size, CPU, window), 0.125)
        meta = build_metadata(chunks, block_size, CPU, window)
        meta.key_span, meta.max_seq_len = span, span
        # A graph's block tables are as wide as max_model_len needs: at least the span.
        meta.block_tables = F.pad(meta.block_tables, (0, span // block_size - meta.block_tables.shape[1]))
        kernels.calls.clear()
        out = backend.forward(q, k, v, cache.clone(), meta, 0.125)
        assert (out.float() - ref.float()).abs().max().item() < 2e-2
        (call,) = kernels.calls
        lens = [s + n for s, n in DECODE]
        if backend.kernel == "gathered":
            assert call["cum_seq_k"] == [b * span for b in range(len(DECODE) + 1)] and call["seqused_k"] == lens
            assert call["max_k"] == span
        else:
            assert call["seqused_k"] == lens and call["num_splits"] is None
