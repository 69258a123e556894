"""The CPU attention backend: a small C++ op that reads the block KV cache in place, and torch's CPU flash attention
for long prompt chunks and for sequences on a shared prefix.

No library offers variable-length paged attention on the CPU for plain torch
(SDPA needs the keys gathered into padded batches, FlexAttention needs
torch.compile per shape), so paged_attention_cpu.cpp does it in a few hundred
lines: one call per layer for a step's decode rows and short chunks, GQA and
sliding windows included. It computes row by row (rows that share their first
cache block, key tile by key tile, so a shared prefix is read once). A long
prompt chunk instead gathers its context once and goes through torch's flash
attention (`_scaled_dot_product_flash_attention_for_cpu`: blocked, float32
sums, its GEMMs on AMX tiles where the CPU has them), with an additive mask for
its causal (and sliding-window) pattern. So do the rows of sequences on one
cached prefix (requests admitted together on a shared system prompt or
document): one call for all of them, over the prefix once and each one's keys
after it, the mask keeping each row to the prefix and its own keys. In
bfloat16 on a CPU with AMX tiles the op keeps every row: what a group of rows
shares (a cached prefix; in a chunk, the keys before the group's rows) goes
through tiles there, faster than flash attention. The op is built once per
machine and cached on disk (raytp/model/cpu_ops.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from raytp.model.attention import AttentionBackend, AttentionMetadata
from raytp.model.cpu_ops import ATTENTION_SOURCE, load_extension
from raytp.model.layers import padded_rows, rowwise_op


def load_op():
    """The compiled op (built on first use on this machine, see cpu_ops.py); raises if there is no toolchain."""
    return load_extension(ATTENTION_SOURCE)


# Flash attention's shapes are bucketed (keys to a multiple of this, query rows by padded_rows): its GEMM kernels
# are made (JIT-compiled) for each new shape, and without buckets nearly every chunk would bring new ones.
KEY_BUCKET = 128


@dataclass
class FlashGroup:
    """Rows that one call of torch's flash attention computes: a prompt chunk's, or those of several sequences on
    one cached prefix (each row sees the prefix and its own sequence's keys after it, up to its position)."""

    rows: torch.Tensor  # (R,) int64: the rows in q
    slots: torch.Tensor  # (L_pad,) cache slot of each key, then padding keys (slot of the first: finite, unseen)
    # (R_pad, L_pad) additive mask in q's dtype (what the flash op takes): 0 where a row sees a key, else -inf
    # (padding rows: the first key only). Made with the step's plan, at its first layer; every layer uses it.
    mask: torch.Tensor


@dataclass
class FlashPlan:
    """What a step computes through flash attention (derived once per step); the op skips those sequences."""

    groups: list[FlashGroup]
    skip: torch.Tensor  # (B,) bool


def _slots(meta: AttentionMetadata, b: int, start: int, end: int) -> torch.Tensor:
    """(end - start,) cache slots of sequence b's positions start .. end - 1."""
    positions = torch.arange(start, end)
    return meta.block_tables[b].long()[positions // meta.block_size] * meta.block_size + positions % meta.block_size


def flash_group(meta: AttentionMetadata, seqs: list[int], prefix_len: int, dtype: torch.dtype) -> FlashGroup:
    """The FlashGroup of sequences `seqs` (indices in the step) sharing their first prefix_len keys (0 for one
    chunk alone), its mask in `dtype`. Its keys: the prefix once, then each sequence's own after it. Row i of sequence b at position p
    sees the prefix and b's keys up to p (within the sliding window); keys and rows are padded to buckets (KEY_BUCKET,
    padded_rows) so that the flash kernels' shapes repeat."""
    offsets, lens = meta.query_start.tolist(), meta.seq_lens.tolist()
    window = meta.sliding_window or 0
    # Per key: its cache slot, its position, and whose it is (-1: the shared prefix, i: seqs[i]'s own)
    slots, key_pos, key_owner = [_slots(meta, seqs[0], 0, prefix_len)], [torch.arange(prefix_len)], [
        torch.full((prefix_len,), -1)]
    # Per row: its row in q, its position, and whose it is
    rows, row_pos, row_owner = [], [], []
    for i, b in enumerate(seqs):
        num_new = offsets[b + 1] - offsets[b]
        slots.append(_slots(meta, b, prefix_len, lens[b]))
        key_pos.append(torch.arange(prefix_len, lens[b]))
        key_owner.append(torch.full((lens[b] - prefix_len,), i))
        rows.append(torch.arange(offsets[b], offsets[b + 1]))
        row_pos.append(torch.arange(lens[b] - num_new, lens[b]))
        row_owner.append(torch.full((num_new,), i))
    L, R = sum(len(k) for k in slots), sum(len(r) for r in rows)
    key_pad, row_pad = -L % KEY_BUCKET, padded_rows(R) - R
    # Padding keys: the first key's slot (finite values), owned by nobody; padding rows: owned by nobody
    slots = torch.cat(slots)  # (L,)
    slots = torch.cat([slots, slots[:1].expand(key_pad)])  # (L_pad,)
    key_pos = torch.cat(key_pos + [torch.zeros(key_pad, dtype=torch.long)])  # (L_pad,)
    key_owner = torch.cat(key_owner + [torch.full((key_pad,), -2)])  # (L_pad,)
    rows = torch.cat(rows)  # (R,)
    row_pos = torch.cat(row_pos + [torch.zeros(row_pad, dtype=torch.long)])  # (R_pad,)
    row_owner = torch.cat(row_owner + [torch.full((row_pad,), -3)])  # (R_pad,)
    seen = ((key_owner == -1) | (key_owner == row_owner[:, None])) & (key_pos <= row_pos[:, None])  # (R_pad, L_pad)
    if window:
        seen &= key_pos > row_pos[:, None] - window
    seen[R:, 0] = True  # a padding row sees the first key, so that its softmax stays finite
    return FlashGroup(rows, slots, torch.zeros(seen.shape, dtype=dtype).masked_fill_(~seen, float("-inf")))


def plan_flash(meta: AttentionMetadata, dtype: torch.dtype, min_rows: int, min_keys: int, group_min_rows: int,
               group_min_rows_per_seq: int = 1) -> FlashPlan:
    """Which of the step's sequences go through flash attention (computing in `dtype`): those sharing a cached
    prefix of at least min_keys keys, with at least group_min_rows rows among them (and group_min_rows_per_seq
    per sequence on average) and no more keys of their own after it than the prefix has (so that keys seen by one
    row only do not outweigh the shared ones), as one group;
    then a chunk of at least min_rows new tokens on at least min_keys keys alone. Not groups under a sliding window,
    where rows see different prefixes."""
    offsets, lens = meta.query_start.tolist(), meta.seq_lens.tolist()
    num_new = [offsets[b + 1] - offsets[b] for b in range(len(lens))]
    groups, skip = [], torch.zeros(len(lens), dtype=torch.bool)
    on_block: dict[int, list[int]] = {}  # first cache block -> the sequences with enough cached context
    if meta.sliding_window is None:
        first_blocks = meta.block_tables[:, 0].tolist()
        for b, seq_len in enumerate(lens):
            if seq_len - num_new[b] >= min_keys:
                on_block.setdefault(first_blocks[b], []).append(b)
    for seqs in on_block.values():
        rows = sum(num_new[b] for b in seqs)
        if len(seqs) < 2 or rows < group_min_rows or rows < group_min_rows_per_seq * len(seqs):
            continue
        # The blocks all of them hold, within every one's context (positions before its new tokens).
        context_blocks = min((lens[b] - num_new[b]) // meta.block_size for b in seqs)
        tables = meta.block_tables[seqs, :context_blocks]  # (n, C)
        same = (tables == tables[0]).all(dim=0)  # (C,)
        prefix_len = (context_blocks if bool(same.all()) else int(same.to(torch.int8).argmin())) * meta.block_size
        if prefix_len < min_keys or sum(lens[b] - prefix_len for b in seqs) > prefix_len:
            continue
        groups.append(flash_group(meta, seqs, prefix_len, dtype))
        skip[seqs] = True
    for b, seq_len in enumerate(lens):
        if not skip[b] and num_new[b] >= min_rows and seq_len >= min_keys:
            groups.append(flash_group(meta, [b], 0, dtype))
            skip[b] = True
    return FlashPlan(groups, skip)


class CpuPagedAttention(AttentionBackend):
    name = "cpu"
    # What goes through torch's flash attention instead of the op, by dtype: (a chunk's min new tokens, its min keys,
    # min rows of sequences on one cached prefix of at least min keys, and min rows per sequence among them).
    # Measured on one core of a Xeon with AMX (8 heads / 4 KV heads of 64, 2026-12-05): for one chunk, the op's time /
    # flash attention's is 1.0-2.7x in bfloat16 from 16 rows on 128 keys (0.3-1.0x at 4-8 rows) and 1.3-1.5x in
    # float32 from 32 rows on 512 keys (0.4-0.9x at fewer rows or keys). Other dtypes go by float32's.
    flash_thresholds = {torch.bfloat16: (16, 128, 16, 1), torch.float32: (32, 512, 32, 1)}

    def __init__(self):
        self.op = load_op()
        # bfloat16 where the op computes on AMX tiles (op.amx()) what a group of rows shares (a cached prefix's keys;
        # within a chunk, the keys before a group's rows): every row stays in the op, no flash attention. In the
        # engine, one core of a Xeon with AMX, alternating with flash attention as before (2026-12-05): 8 requests
        # admitted on a cached 768-token prefix 13-15% faster (bench-58m 47.2 -> 41.2 ms, SmolLM2 161 -> 138), a
        # 256-token prompt 7% (bench-58m 29.5 -> 27.3 ms, SmolLM2 106 -> 99), a 256-token chunk on 768 cached
        # tokens level (44.9 / 44.2, 165 / 164). Only for the shapes those tiles take (see takes_all); tests turn
        # it off to exercise flash attention in bfloat16.
        self.amx_instead_of_flash = self.op.amx()

    def takes_all(self, q: torch.Tensor, kv_heads: int, meta: AttentionMetadata) -> bool:
        """Whether the op computes every row of this step itself (q: (T, H, D)): bfloat16 on AMX tiles, head_dim a
        multiple of 32 up to 128, cache blocks of a multiple of 16 slots (a tile's keys), no sliding window (rows see
        keys from the first), and at least 2 query heads per KV head (a group of 16 rows then brings the 32 query
        vectors from which the values' sums are on tiles too; with one, flash attention stays faster for chunks)."""
        _, heads, head_dim = q.shape
        return (self.amx_instead_of_flash and q.dtype == torch.bfloat16 and head_dim % 32 == 0 and head_dim <= 128
                and heads >= 2 * kv_heads and meta.block_size % 16 == 0 and meta.sliding_window is None)

    def rotate_and_cache(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int,
                         cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """As the base class, in one call of raytp's per-token op (rowwise_cpu.cpp) where it serves this dtype."""
        op = rowwise_op(qkv)
        if op is None or not (qkv.is_contiguous() and cache.is_contiguous()):
            return super().rotate_and_cache(qkv, cos, sin, heads, cache, meta)
        # cos/sin (T, D); cache[0], cache[1]: (slots, Hkv, D)
        return op.rotary_write_kv(qkv, cos, sin, heads, cache[0], cache[1], meta.slot_mapping)

    def attend(self, q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        # q: (T, H, D); cache[0], cache[1]: (slots, Hkv, D) -> (T, H, D)
        if meta.derived is None:
            if self.takes_all(q, cache.shape[2], meta):
                meta.derived = FlashPlan([], torch.zeros(len(meta.seq_lens), dtype=torch.bool))
            else:
                thresholds = self.flash_thresholds.get(q.dtype) or self.flash_thresholds[torch.float32]
                meta.derived = plan_flash(meta, q.dtype, *thresholds)
        plan: FlashPlan = meta.derived
        # (T, H, D): the op's float32 rows rounded once
        out = self.op.paged_attention(q, cache[0], cache[1], meta.block_tables, meta.query_start, meta.seq_lens,
                                      meta.block_size, scale, meta.sliding_window or 0, plan.skip).to(q.dtype)
        for group in plan.groups:
            out[group.rows] = self._flash_attention(q[group.rows], cache, group, scale)
        return out

    def _flash_attention(self, q: torch.Tensor, cache: torch.Tensor, group: FlashGroup, scale: float) -> torch.Tensor:
        """A group's rows through torch's CPU flash attention (blocked, float32 sums, its GEMMs on AMX tiles where
        the CPU has them): q (R, H, D) -> (R, H, D)."""
        R, H, D = q.shape
        Hkv = cache.shape[2]
        G = H // Hkv  # query heads per KV head
        R_pad, L_pad = group.mask.shape
        if R_pad != R:
            q = torch.cat([q, q.new_zeros(R_pad - R, H, D)])  # (R_pad, H, D)
        q = q.view(R_pad, Hkv, G, D).permute(1, 2, 0, 3)  # (Hkv, G, R_pad, D), a view
        # (L_pad, Hkv, D) -> (Hkv, G, L_pad, D): each KV head seen by its G query heads (a stride-0 view, no copy)
        k, v = (cache[i].index_select(0, group.slots).permute(1, 0, 2).unsqueeze(1).expand(Hkv, G, L_pad, D)
                for i in (0, 1))
        out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=group.mask,
                                                                            scale=scale)
        return out[:, :, :R].permute(2, 0, 1, 3).reshape(R, H, D)  # (Hkv, G, R_pad, D) -> (R, H, D)
