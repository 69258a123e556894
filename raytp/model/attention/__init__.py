"""Paged attention over the block KV cache, for any mix of prefill and decode.

A step computes T new tokens belonging to B sequences, laid out one sequence
after another. Sequence b has `num_new` new tokens starting at position
`start`; its earlier tokens are already in the cache. The cache of one layer
is (2, num_slots, kv_heads, head_dim) with num_slots = num_blocks * block_size;
a sequence's block table maps its positions to slots.

`build_metadata` turns a step's chunks into variable-length metadata (query
offsets, context lengths, block tables) that every backend reads. The
backends, chosen once at start-up by `select_backend`:

- `reference`: padded batches through SDPA with a dense mask (reference.py);
  simple and obviously right, the one the others are tested against.
- `cpu`: a small compiled C++ op that reads the cache in place (cpu.py).
- `cuda`: flash attention 2 through torch, reading the paged cache in place
  where this torch can (pages of 256 tokens), else over keys gathered per
  layer (cuda.py).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from raytp.model.layers import apply_rotary

log = logging.getLogger(__name__)

BACKENDS = ("reference", "cpu", "cuda")


@dataclass
class SeqChunk:
    """One sequence's part of a step."""

    start: int  # position of the first new token
    num_new: int  # new tokens computed this step
    block_table: list[int]  # cache blocks holding positions 0 .. start + num_new - 1


@dataclass
class AttentionMetadata:
    positions: torch.Tensor  # (T,) position of each new token
    slot_mapping: torch.Tensor  # (T,) cache slot each new token's K/V goes to
    query_start: torch.Tensor  # (B + 1,) int32: sequence b's new tokens are rows query_start[b] .. query_start[b+1]-1
    seq_lens: torch.Tensor  # (B,) int32: tokens in the cache for sequence b once this step's are written
    cu_seq_lens: torch.Tensor  # (B + 1,) int32: cumulative seq_lens
    block_tables: torch.Tensor  # (B, max_blocks) int32, padded with 0 past each sequence's blocks
    last_token_index: torch.Tensor  # (B,) index into T of each sequence's last new token
    max_query_len: int
    max_seq_len: int
    num_keys: int  # sum of seq_lens: every key the step's sequences attend to
    block_size: int
    sliding_window: int | None
    # Decode graphs (cuda_graphs.py): every sequence's keys are read as this many slots from its block table (those
    # past seq_lens ignored by the kernel), so that the step's shapes do not depend on the context lengths.
    key_span: int | None = None
    # What a backend derives from this metadata at its first layer and reuses for the rest of the step (the
    # reference's padded batches, the CPU backend's long chunks).
    derived: object = None


def token_slots(chunks: list[SeqChunk], block_size: int) -> np.ndarray:
    """(T,) int64: the KV-cache slot each new token of the chunks writes, in the step's row order (what
    build_metadata puts in slot_mapping)."""
    slots = []
    for c in chunks:
        positions = np.arange(c.start, c.start + c.num_new)  # (n,)
        table = np.asarray(c.block_table, dtype=np.int64)
        slots.append(table[positions // block_size] * block_size + positions % block_size)
    return np.concatenate(slots) if slots else np.empty(0, dtype=np.int64)


def build_metadata(
    chunks: list[SeqChunk], block_size: int, device: torch.device, sliding_window: int | None = None
) -> AttentionMetadata:
    """One step's metadata, computed on the host with numpy (no per-token Python) into one buffer, which goes to
    `device` as one copy (from pinned memory, not blocking the host, on CUDA) and is read there through views."""
    B = len(chunks)
    num_new = np.fromiter((c.num_new for c in chunks), dtype=np.int64, count=B)  # (B,)
    start = np.fromiter((c.start for c in chunks), dtype=np.int64, count=B)  # (B,)
    T = int(num_new.sum())
    max_blocks = max(len(c.block_table) for c in chunks)
    # The buffer: int64 positions (T), slots (T) and last-token rows (B), then int32 query starts (B + 1), context
    # lengths (B), their sums (B + 1) and block tables (B, max_blocks): the int32 ones are what flash attention reads.
    n64, n32 = 2 * T + B, 3 * B + 2 + B * max_blocks
    host = torch.empty(8 * n64 + 4 * n32, dtype=torch.uint8, pin_memory=torch.device(device).type == "cuda")
    i64, i32 = host[: 8 * n64].numpy().view(np.int64), host[8 * n64 :].numpy().view(np.int32)
    positions, slots, last_row = i64[:T], i64[T : 2 * T], i64[2 * T :]
    query_start, seq_lens = i32[: B + 1], i32[B + 1 : 2 * B + 1]
    cu_seq_lens, tables = i32[2 * B + 1 : 3 * B + 2], i32[3 * B + 2 :].reshape(B, max_blocks)

    query_start[0] = 0
    np.cumsum(num_new, out=query_start[1:])
    seq_of_row = np.repeat(np.arange(B), num_new)  # (T,)
    positions[:] = start[seq_of_row] + np.arange(T) - query_start[seq_of_row]
    tables[:] = 0  # past each sequence's blocks
    for i, c in enumerate(chunks):
        tables[i, : len(c.block_table)] = c.block_table
    slots[:] = tables[seq_of_row, positions // block_size].astype(np.int64) * block_size + positions % block_size
    last_row[:] = query_start[1:] - 1
    seq_lens[:] = start + num_new
    cu_seq_lens[0] = 0
    np.cumsum(seq_lens, out=cu_seq_lens[1:])

    buf = host.to(device, non_blocking=True)
    b64, b32 = buf[: 8 * n64].view(torch.int64), buf[8 * n64 :].view(torch.int32)
    return AttentionMetadata(
        positions=b64[:T],
        slot_mapping=b64[T : 2 * T],
        query_start=b32[: B + 1],
        seq_lens=b32[B + 1 : 2 * B + 1],
        cu_seq_lens=b32[2 * B + 1 : 3 * B + 2],
        block_tables=b32[3 * B + 2 :].view(B, max_blocks),
        last_token_index=b64[2 * T :],
        max_query_len=int(num_new.max()),
        max_seq_len=int(seq_lens.max()),
        num_keys=int(seq_lens.sum(dtype=np.int64)),
        block_size=block_size,
        sliding_window=sliding_window,
    )


class AttentionBackend:
    """Rotates a layer's new q and k and writes its new K/V into the cache (rotate_and_cache), then attends over
    each sequence's whole context (attend)."""

    name = "base"

    @property
    def label(self) -> str:
        """Which kernel runs (metrics, logs, engine_stats): the name, or the name and the kernel's variant."""
        return self.name

    def describe(self) -> str:
        return self.label

    def rotate_and_cache(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int,
                         cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """qkv: (T, (H + 2 Hkv) D), cos/sin: (T, D), cache: (2, slots, Hkv, D) -> rotated q (T, H, D)."""
        T, (_, kv_heads, D) = qkv.shape[0], cache.shape[1:]
        qk, v = qkv.split([(heads + kv_heads) * D, kv_heads * D], dim=-1)
        qk = apply_rotary(qk.view(T, -1, D), cos, sin)  # (T, H + Hkv, D): q and k rotated together
        q, k = qk.split([heads, kv_heads], dim=1)  # (T, H, D), (T, Hkv, D)
        self.write_cache(k, v.view(T, kv_heads, D), cache, meta)
        return q

    def write_cache(self, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata) -> None:
        """k/v: (T, Hkv, D) into cache (2, slots, Hkv, D) at the step's slots."""
        cache[0].index_copy_(0, meta.slot_mapping, k)
        cache[1].index_copy_(0, meta.slot_mapping, v)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """Already rotated q: (T, H, D), k/v: (T, Hkv, D), cache: (2, slots, Hkv, D) -> (T, H * D)."""
        self.write_cache(k, v, cache, meta)
        return self.attend(q, cache, meta, scale).reshape(q.shape[0], -1)

    def attend(self, q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        raise NotImplementedError


def select_backend(device: str, name: str = "auto", dtype: torch.dtype = torch.float32,
                   block_size: int = 16) -> AttentionBackend:
    """The attention backend for this rank: `name`, or for "auto" the fastest one that works on `device` in `dtype`
    at this KV block size.

    An explicit backend that cannot be built or does not pass its check is an
    error. With "auto", a fast backend that cannot (no C++ compiler, a torch
    without flash attention, flash attention in float32) falls back to the
    reference, logged as an error: the reference pads every sequence and copies
    its whole context each layer, so a replica on it is slow, and its label
    (metrics, engine_stats) says "reference".
    """
    from raytp.model.attention.reference import ReferenceAttention

    if name == "reference":
        return ReferenceAttention()
    if name not in ("auto", *BACKENDS):
        raise ValueError(f"unknown attention backend {name!r}; choose one of auto, {', '.join(BACKENDS)}")
    wanted = name if name != "auto" else ("cuda" if device == "cuda" else "cpu")
    try:
        if wanted == "cpu":
            from raytp.model.attention.cpu import CpuPagedAttention

            return CpuPagedAttention()
        from raytp.model.attention.cuda import CudaFlashAttention

        return CudaFlashAttention(dtype, block_size)
    except Exception as err:  # noqa: BLE001 - any build, import or self-check failure
        if name != "auto":
            raise RuntimeError(f"attention_backend {name!r} cannot run here: {err}") from err
        log.error("attention backend %r cannot run here (%s): falling back to the reference, which is slow", wanted, err)
        return ReferenceAttention()


def random_step(chunks_spec: list[tuple[int, int]], heads: int, kv_heads: int, head_dim: int, block_size: int,
                dtype: torch.dtype, device: str = "cpu", seed: int = 0):
    """A step to test a backend with: chunks_spec is [(start, num_new)] per sequence, over shuffled blocks.

    Returns (chunks, q (T, H, D), k, v (T, Hkv, D), cache (2, slots, Hkv, D)) with random values, the
    cache's earlier positions included (as if computed by earlier steps).
    """
    gen = torch.Generator().manual_seed(seed)
    blocks_needed = [-(-(start + n) // block_size) for start, n in chunks_spec]
    order = torch.randperm(sum(blocks_needed) + 3, generator=gen).tolist()
    chunks, used = [], 0
    for (start, num_new), nb in zip(chunks_spec, blocks_needed):
        chunks.append(SeqChunk(start, num_new, order[used : used + nb]))
        used += nb
    T = sum(n for _, n in chunks_spec)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    return (chunks, rand(T, heads, head_dim), rand(T, kv_heads, head_dim), rand(T, kv_heads, head_dim),
            rand(2, len(order) * block_size, kv_heads, head_dim))
