"""The reference attention backend: padded batches through SDPA with a dense mask.

Attention runs as padded batches: the decode sequences (one new token each)
as one batch with a single query row, the prefill sequences as another, so a
long prompt joining the step does not pad every decode row to its length.
Each batch gathers its sequences' keys block by block from the cache, with a
mask that is causal, hides padding and applies a sliding window when the
model has one. It copies every context every layer: slow, but plain torch and
easy to check by eye, so the fast backends are tested against it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from raytp.model.attention import AttentionBackend, AttentionMetadata, SeqChunk


@dataclass
class AttentionBatch:
    """Sequences that attend together, padded to the same query and key lengths."""

    query_index: torch.Tensor  # (b, Lq) index into T of each padded query
    query_valid: torch.Tensor  # (b * Lq,) True where the padded query is a real token
    token_index: torch.Tensor  # (n,) index into T of each real query, in padded order
    block_tables: torch.Tensor  # (b, blocks) cache blocks of each sequence; keys are their slots in order
    mask: torch.Tensor  # (b, 1, Lq, blocks * block_size) True where the query may attend to the key


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


class ReferenceAttention(AttentionBackend):
    name = "reference"

    @staticmethod
    def _padded_batches(meta: AttentionMetadata, device: torch.device) -> list[AttentionBatch]:
        offsets, lens = meta.query_start.tolist(), meta.seq_lens.tolist()
        tables = meta.block_tables.tolist()
        chunks = []
        for b, seq_len in enumerate(lens):
            num_new = offsets[b + 1] - offsets[b]
            chunks.append(SeqChunk(seq_len - num_new, num_new, tables[b][: -(-seq_len // meta.block_size)]))
        batches = []
        for is_decode in (True, False):
            members = [i for i, c in enumerate(chunks) if (c.num_new == 1) == is_decode]
            if members:
                batches.append(_batch([chunks[i] for i in members], [offsets[i] for i in members], meta.block_size,
                                      device, meta.sliding_window))
        return batches

    def attend(self, q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """q: (T, H, D), cache: (2, slots, Hkv, D) -> (T, H * D)."""
        T, H, D = q.shape
        Hkv = cache.shape[2]
        paged = cache.view(2, -1, meta.block_size, Hkv, D)  # (2, blocks, block_size, Hkv, D)
        if meta.derived is None:
            meta.derived = self._padded_batches(meta, q.device)
        out = q.new_empty(T, H * D)
        for batch in meta.derived:
            b, Lq = batch.query_index.shape
            qp = q[batch.query_index].transpose(1, 2)  # (b, H, Lq, D)
            kp = paged[0][batch.block_tables].view(b, -1, Hkv, D).transpose(1, 2)  # (b, Hkv, Lk, D)
            vp = paged[1][batch.block_tables].view(b, -1, Hkv, D).transpose(1, 2)  # (b, Hkv, Lk, D)
            o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=batch.mask, scale=scale, enable_gqa=True)  # (b, H, Lq, D)
            o = o.transpose(1, 2).reshape(b * Lq, H * D)[batch.query_valid]  # (n, H * D)
            out[batch.token_index] = o
        return out
