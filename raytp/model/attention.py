"""Paged attention over a block KV cache, for any mix of prefill and decode.

A step computes T new tokens belonging to B sequences, laid out one sequence
after another. Sequence b has `num_new` new tokens starting at position
`start`; its earlier tokens are already in the cache. The cache of one layer
is (2, num_slots, kv_heads, head_dim) with num_slots = num_blocks * block_size;
a sequence's block table maps its positions to slots.

Attention runs as padded batches: the decode sequences (one new token each)
as one batch with a single query row, the prefill sequences as another, so a
long prompt joining the step does not pad every decode row to its length.
Each batch gathers its sequences' keys block by block from the cache, with a
mask that is causal, hides padding and applies a sliding window when the
model has one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SeqChunk:
    """One sequence's part of a step."""

    start: int  # position of the first new token
    num_new: int  # new tokens computed this step
    block_table: list[int]  # cache blocks holding positions 0 .. start + num_new - 1


@dataclass
class AttentionBatch:
    """Sequences that attend together, padded to the same query and key lengths."""

    query_index: torch.Tensor  # (b, Lq) index into T of each padded query
    query_valid: torch.Tensor  # (b * Lq,) True where the padded query is a real token
    token_index: torch.Tensor  # (n,) index into T of each real query, in padded order
    block_tables: torch.Tensor  # (b, blocks) cache blocks of each sequence; keys are their slots in order
    mask: torch.Tensor  # (b, 1, Lq, blocks * block_size) True where the query may attend to the key


@dataclass
class AttentionMetadata:
    positions: torch.Tensor  # (T,) position of each new token
    slot_mapping: torch.Tensor  # (T,) cache slot each new token's K/V goes to
    batches: list[AttentionBatch]  # decode sequences and prefill sequences, each non-empty
    last_token_index: torch.Tensor  # (B,) index into T of each sequence's last new token
    block_size: int


def _batch(chunks: list[SeqChunk], offsets: list[int], block_size: int, device: torch.device,
           sliding_window: int | None) -> AttentionBatch:
    num_new = torch.tensor([c.num_new for c in chunks])  # (b,)
    start = torch.tensor([c.start for c in chunks])  # (b,)
    first = torch.tensor(offsets)  # (b,) index in T of each sequence's first new token
    b, Lq = len(chunks), int(num_new.max())
    blocks = max(len(c.block_table) for c in chunks)
    tables = torch.zeros(b, blocks, dtype=torch.long)  # (b, blocks); padding points at block 0, masked out
    for i, c in enumerate(chunks):
        tables[i, : len(c.block_table)] = torch.tensor(c.block_table, dtype=torch.long)

    q = torch.arange(Lq)  # (Lq,)
    q_valid = q.unsqueeze(0) < num_new.unsqueeze(1)  # (b, Lq)
    q_pos = start.unsqueeze(1) + q.unsqueeze(0)  # (b, Lq)
    query_index = torch.where(q_valid, first.unsqueeze(1) + q.unsqueeze(0), 0)  # (b, Lq)
    k_pos = torch.arange(blocks * block_size).view(1, 1, -1)  # (1, 1, Lk)
    mask = k_pos <= q_pos.unsqueeze(-1)  # (b, Lq, Lk): causal, and hides keys past each sequence's end
    if sliding_window is not None:
        mask &= q_pos.unsqueeze(-1) - k_pos < sliding_window
    mask &= q_valid.unsqueeze(-1)
    # A padding query must see at least one key, or softmax gives NaN; its output is dropped anyway.
    mask[:, :, 0] |= ~q_valid
    return AttentionBatch(
        query_index=query_index.to(device),
        query_valid=q_valid.reshape(-1).to(device),
        token_index=query_index[q_valid].to(device),
        block_tables=tables.to(device),
        mask=mask.unsqueeze(1).to(device),
    )


def build_metadata(
    chunks: list[SeqChunk], block_size: int, device: torch.device, sliding_window: int | None = None
) -> AttentionMetadata:
    offsets, positions, slots = [], [], []
    t = 0
    for c in chunks:
        offsets.append(t)
        t += c.num_new
        pos = torch.arange(c.start, c.start + c.num_new)  # (num_new,)
        table = torch.tensor(c.block_table, dtype=torch.long)
        positions.append(pos)
        slots.append(table[pos // block_size] * block_size + pos % block_size)
    batches = []
    for is_decode in (True, False):
        members = [i for i, c in enumerate(chunks) if (c.num_new == 1) == is_decode]
        if members:
            batches.append(_batch([chunks[i] for i in members], [offsets[i] for i in members], block_size, device,
                                  sliding_window))
    return AttentionMetadata(
        positions=torch.cat(positions).to(device),
        slot_mapping=torch.cat(slots).to(device),
        batches=batches,
        last_token_index=torch.tensor([o + c.num_new - 1 for o, c in zip(offsets, chunks)], device=device),
        block_size=block_size,
    )


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """q: (T, H, D), k/v: (T, Hkv, D), cache: (2, slots, Hkv, D) -> (T, H * D).

    Writes the new keys and values into the cache, then attends over each
    sequence's whole context.
    """
    cache[0].index_copy_(0, meta.slot_mapping, k)
    cache[1].index_copy_(0, meta.slot_mapping, v)
    T, H, D = q.shape
    Hkv = cache.shape[2]
    paged = cache.view(2, -1, meta.block_size, Hkv, D)  # (2, blocks, block_size, Hkv, D)
    out = q.new_empty(T, H * D)
    for batch in meta.batches:
        b, Lq = batch.query_index.shape
        qp = q[batch.query_index].transpose(1, 2)  # (b, H, Lq, D)
        kp = paged[0][batch.block_tables].view(b, -1, Hkv, D).transpose(1, 2)  # (b, Hkv, Lk, D)
        vp = paged[1][batch.block_tables].view(b, -1, Hkv, D).transpose(1, 2)  # (b, Hkv, Lk, D)
        o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=batch.mask, scale=scale, enable_gqa=True)  # (b, H, Lq, D)
        o = o.transpose(1, 2).reshape(b * Lq, H * D)[batch.query_valid]  # (n, H * D)
        out[batch.token_index] = o
    return out
