"""The CPU attention backend: a small C++ op that reads the block KV cache in place, and GEMMs for long prompt
chunks.

No library offers variable-length paged attention on the CPU for plain torch
(SDPA needs the keys gathered into padded batches, FlexAttention needs
torch.compile per shape), so paged_attention_cpu.cpp does it in a few hundred
lines: one call per layer for a step's decode rows and short chunks, GQA and
sliding windows included. It computes row by row (rows that share their first
cache block, key tile by key tile, so a shared prefix is read once); a long
prompt chunk instead gathers its context once and runs through oneDNN's
GEMMs, which reuse each key across all its queries. It is built once per
machine and cached on disk (raytp/model/cpu_ops.py).
"""
from __future__ import annotations

import torch

from raytp.model.attention import AttentionBackend, AttentionMetadata
from raytp.model.cpu_ops import ATTENTION_SOURCE, load_extension
from raytp.model.layers import onednn_linear_available, padded_rows, rowwise_op


def load_op():
    """The compiled op (built on first use on this machine, see cpu_ops.py); raises if there is no toolchain."""
    return load_extension(ATTENTION_SOURCE)


# The GEMMs' shapes are bucketed (context keys to a multiple of this, query rows by padded_rows): oneDNN compiles
# a kernel for every new shape (~0.9 ms for a 60 x 800 one, against 0.07 ms to run it), and without buckets
# nearly every chunk would bring new ones.
KEY_BUCKET = 128


class LongChunk:
    """A prompt chunk computed with GEMMs: its query rows and its context's cache slots."""

    def __init__(self, rows: slice, slots: torch.Tensor, num_keys: int):
        self.rows = rows  # its new tokens' rows in q
        # (L_pad,) cache slot of each context position 0 .. L-1 (its new tokens last), then padding keys (slot of
        # position 0: real, finite values, masked out)
        self.slots = slots
        self.num_keys = num_keys  # L


def long_chunks(meta: AttentionMetadata, min_rows: int, min_keys: int) -> tuple[list[LongChunk], torch.Tensor]:
    """The step's chunks worth GEMMs (at least min_rows new tokens and min_keys keys), and a (B,) bool flag of their
    sequences for the op to skip."""
    offsets, lens = meta.query_start.tolist(), meta.seq_lens.tolist()
    chunks, skip = [], torch.zeros(len(lens), dtype=torch.bool)
    for b, seq_len in enumerate(lens):
        num_new = offsets[b + 1] - offsets[b]
        if num_new < min_rows or seq_len < min_keys:
            continue
        blocks = meta.block_tables[b, : -(-seq_len // meta.block_size)].long()
        slots = (blocks[:, None] * meta.block_size + torch.arange(meta.block_size)).reshape(-1)[:seq_len]  # (L,)
        padding = -seq_len % KEY_BUCKET
        slots = torch.cat([slots, slots[:1].expand(padding)])  # (L_pad,)
        chunks.append(LongChunk(slice(offsets[b], offsets[b + 1]), slots, seq_len))
        skip[b] = True
    return chunks, skip


class CpuPagedAttention(AttentionBackend):
    name = "cpu"
    # Which chunks go through GEMMs: measured on one core (2-vCPU EPYC, fp32, 8 heads / 4 KV heads of 64; best of 7,
    # 2026-12-02), the op (AVX-512, a chunk's rows sharing each key tile) wins below 64 new tokens (32 at 800 keys:
    # 0.67 ms against 0.88) and below ~512 keys at any row count (128 rows at 128 keys 0.23 against 0.54, 256 at 256
    # 0.8 against 1.2); from 512 keys up GEMMs are even or ahead (128 at 512 1.35 against 1.18, 256 at 1,200 6.5
    # against 4.6).
    gemm_min_rows = 64
    gemm_min_keys = 512

    def __init__(self):
        self.op = load_op()

    def rotate_and_cache(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int,
                         cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """As the base class, in one call of raytp's per-token op (rowwise_cpu.cpp) where it serves this dtype."""
        op = rowwise_op(qkv)
        if op is None or not (qkv.is_contiguous() and cache.is_contiguous()):
            return super().rotate_and_cache(qkv, cos, sin, heads, cache, meta)
        # cos/sin (T, 1, D) as (T, D); cache[0], cache[1]: (slots, Hkv, D)
        return op.rotary_write_kv(qkv, cos.squeeze(1), sin.squeeze(1), heads, cache[0], cache[1], meta.slot_mapping)

    def attend(self, q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        # q: (T, H, D); cache[0], cache[1]: (slots, Hkv, D) -> (T, H, D)
        if meta.derived is None:
            meta.derived = long_chunks(meta, self.gemm_min_rows, self.gemm_min_keys)
        chunks, skip = meta.derived
        out = self.op.paged_attention(q, cache[0], cache[1], meta.block_tables, meta.query_start, meta.seq_lens,
                                      meta.block_size, scale, meta.sliding_window or 0, skip)
        for chunk in chunks:
            out[chunk.rows] = self._chunk_attention(q[chunk.rows], cache, chunk, scale, meta.sliding_window or 0)
        return out

    def _chunk_attention(self, q: torch.Tensor, cache: torch.Tensor, chunk: LongChunk, scale: float,
                         window: int) -> torch.Tensor:
        """One sequence's chunk, one KV head at a time: q (M, H, D) -> (M, H, D)."""
        M, H, D = q.shape
        Hkv = cache.shape[2]
        G = H // Hkv  # query heads per KV head
        M_pad = padded_rows(M)
        q_pad = q.new_zeros(M_pad, H, D)
        q_pad[:M] = q * scale
        out = torch.empty_like(q)
        for h in range(Hkv):
            k = cache[0][:, h].index_select(0, chunk.slots)  # (L_pad, D)
            v_t = cache[1][:, h].index_select(0, chunk.slots).T.contiguous()  # (D, L_pad)
            qh = q_pad[:, h * G : (h + 1) * G].transpose(0, 1).reshape(G * M_pad, D)  # (G*M_pad, D), head-major
            scores = _matmul_t(qh, k).float()  # (G*M_pad, L_pad)
            self.op.causal_softmax_(scores, M, M_pad, chunk.num_keys, window)  # the probabilities, 0 where masked
            o = _matmul_t(scores.to(q.dtype), v_t).view(G, M_pad, D)  # (G, M_pad, D)
            out[:, h * G : (h + 1) * G] = o[:, :M].transpose(0, 1)
        return out


def _matmul_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T, through oneDNN where it is available (2x MKL's speed on some CPUs)."""
    if onednn_linear_available(a.dtype):
        return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    return a @ b.T
