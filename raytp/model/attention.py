"""Paged attention over a block KV cache, for any mix of prefill and decode.

A step computes T new tokens belonging to B sequences, laid out one sequence
after another. Sequence b has `num_new` new tokens starting at position
`start`; its earlier tokens are already in the cache. The cache of one layer
is (2, num_slots, kv_heads, head_dim) with num_slots = num_blocks * block_size;
a sequence's block table maps its positions to slots.

Attention runs as one padded batch: queries (B, Lq) and the keys of each
sequence gathered from the cache (B, Lk), with a mask that is causal, hides
padding and applies a sliding window when the model has one.
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
class AttentionMetadata:
    positions: torch.Tensor  # (T,) position of each new token
    slot_mapping: torch.Tensor  # (T,) cache slot each new token's K/V goes to
    query_index: torch.Tensor  # (B, Lq) index into T of each padded query
    query_valid: torch.Tensor  # (B * Lq,) True where the padded query is a real token
    key_slots: torch.Tensor  # (B, Lk) cache slot of each key of each sequence
    mask: torch.Tensor  # (B, 1, Lq, Lk) True where the query may attend to the key
    last_token_index: torch.Tensor  # (B,) index into T of each sequence's last new token


def build_metadata(
    chunks: list[SeqChunk], block_size: int, device: torch.device, sliding_window: int | None = None
) -> AttentionMetadata:
    num_new = torch.tensor([c.num_new for c in chunks])  # (B,)
    start = torch.tensor([c.start for c in chunks])  # (B,)
    ctx_len = start + num_new  # (B,)
    B, Lq, Lk = len(chunks), int(num_new.max()), int(ctx_len.max())
    max_blocks = max(len(c.block_table) for c in chunks)
    tables = torch.zeros(B, max_blocks, dtype=torch.long)  # (B, max_blocks)
    for b, c in enumerate(chunks):
        tables[b, : len(c.block_table)] = torch.tensor(c.block_table, dtype=torch.long)

    k_pos = torch.arange(Lk)  # (Lk,)
    key_slots = tables[:, k_pos // block_size] * block_size + k_pos % block_size  # (B, Lk)

    i = torch.arange(Lq)  # (Lq,)
    q_valid = i.unsqueeze(0) < num_new.unsqueeze(1)  # (B, Lq)
    q_pos = start.unsqueeze(1) + i.unsqueeze(0)  # (B, Lq)
    offsets = torch.cumsum(num_new, 0) - num_new  # (B,) index in T of each sequence's first token
    query_index = torch.where(q_valid, offsets.unsqueeze(1) + i.unsqueeze(0), 0)  # (B, Lq)

    mask = k_pos.view(1, 1, Lk) <= q_pos.unsqueeze(-1)  # (B, Lq, Lk) causal (also hides keys past ctx_len)
    if sliding_window is not None:
        mask &= q_pos.unsqueeze(-1) - k_pos.view(1, 1, Lk) < sliding_window
    mask &= q_valid.unsqueeze(-1)
    # A padding query must see at least one key, or softmax gives NaN; its output is dropped anyway.
    mask[:, :, 0] |= ~q_valid

    positions = q_pos[q_valid]  # (T,)
    seq_of_token = torch.arange(B).unsqueeze(1).expand(B, Lq)[q_valid]  # (T,)
    slot_mapping = key_slots[seq_of_token, positions]  # (T,)
    return AttentionMetadata(
        positions=positions.to(device),
        slot_mapping=slot_mapping.to(device),
        query_index=query_index.to(device),
        query_valid=q_valid.reshape(-1).to(device),
        key_slots=key_slots.to(device),
        mask=mask.unsqueeze(1).to(device),
        last_token_index=(offsets + num_new - 1).to(device),
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
    B, Lq = meta.query_index.shape
    H, D = q.shape[1], q.shape[2]
    qp = q[meta.query_index].transpose(1, 2)  # (B, H, Lq, D)
    kp = cache[0][meta.key_slots].transpose(1, 2)  # (B, Hkv, Lk, D)
    vp = cache[1][meta.key_slots].transpose(1, 2)  # (B, Hkv, Lk, D)
    out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=meta.mask, scale=scale, enable_gqa=True)  # (B, H, Lq, D)
    out = out.transpose(1, 2).reshape(B * Lq, H * D)  # (B * Lq, H * D)
    return out[meta.query_valid]  # (T, H * D)
