"""The CPU attention backend: a small C++ op that reads the block KV cache in place, and GEMMs for long prompt
chunks.

No library offers variable-length paged attention on the CPU for plain torch
(SDPA needs the keys gathered into padded batches, FlexAttention needs
torch.compile per shape), so paged_attention_cpu.cpp does it in a few hundred
lines: one call per layer for a step's decode rows and short chunks, GQA and
sliding windows included. It computes row by row (rows that share their first
cache block, key tile by key tile, so a shared prefix is read once); a long
prompt chunk instead gathers its context once and runs through oneDNN's
GEMMs, which reuse each key across all its queries. So do the rows of
sequences on one cached prefix (requests admitted together on a shared
system prompt or document): their attention to the prefix is one GEMM, the
op computes the rest of each row, and the two parts are merged by their
log-sum-exps. The op is built once per machine and cached on disk
(raytp/model/cpu_ops.py).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from raytp.model.attention import AttentionBackend, AttentionMetadata
from raytp.model.cpu_ops import ATTENTION_SOURCE, load_extension
from raytp.model.layers import padded_rows, rowwise_op


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


class SharedPrefix:
    """Rows of several sequences whose contexts begin with the same cached blocks: their attention to those keys."""

    def __init__(self, rows: torch.Tensor, slots: torch.Tensor, num_keys: int):
        self.rows = rows  # (R,) int64: the sequences' new tokens' rows in q
        self.slots = slots  # (L_pad,) cache slot of each prefix position 0 .. L-1, then padding keys (masked out)
        self.num_keys = num_keys  # L: every row sees all of them (they precede each sequence's new tokens)


@dataclass
class GemmPlan:
    """What a step computes with GEMMs (derived once per step): long chunks (the op skips their sequences) and shared
    prefixes (the op starts their sequences' rows at key_start)."""

    chunks: list[LongChunk]
    prefixes: list[SharedPrefix]
    skip: torch.Tensor  # (B,) bool
    key_start: torch.Tensor  # (B,) int32


def _context_slots(meta: AttentionMetadata, b: int, num_keys: int) -> torch.Tensor:
    """(L_pad,) cache slots of sequence b's positions 0 .. num_keys - 1, padded to a KEY_BUCKET multiple with the
    slot of position 0 (real, finite values, to be masked out)."""
    blocks = meta.block_tables[b, : -(-num_keys // meta.block_size)].long()
    slots = (blocks[:, None] * meta.block_size + torch.arange(meta.block_size)).reshape(-1)[:num_keys]  # (L,)
    return torch.cat([slots, slots[:1].expand(-num_keys % KEY_BUCKET)])


def plan_gemms(meta: AttentionMetadata, min_rows: int, min_keys: int, prefix_min_rows: int) -> GemmPlan:
    """Which of the step's rows go through GEMMs: a chunk of at least min_rows new tokens on at least min_keys keys
    (all its attention), and sequences sharing at least min_keys keys of cached prefix with at least prefix_min_rows
    rows among them (their attention to that prefix; not under a sliding window, where rows see different
    prefixes)."""
    offsets, lens = meta.query_start.tolist(), meta.seq_lens.tolist()
    first_blocks = meta.block_tables[:, 0].tolist()
    chunks, skip = [], torch.zeros(len(lens), dtype=torch.bool)
    on_block: dict[int, list[int]] = {}  # first cache block -> the sequences (not GEMM chunks) starting with it
    for b, seq_len in enumerate(lens):
        num_new = offsets[b + 1] - offsets[b]
        if num_new >= min_rows and seq_len >= min_keys:
            chunks.append(LongChunk(slice(offsets[b], offsets[b + 1]), _context_slots(meta, b, seq_len), seq_len))
            skip[b] = True
        elif seq_len - num_new >= min_keys and meta.sliding_window is None:
            on_block.setdefault(first_blocks[b], []).append(b)
    prefixes, key_start = [], torch.zeros(len(lens), dtype=torch.int32)
    for group in on_block.values():
        if len(group) < 2 or sum(offsets[b + 1] - offsets[b] for b in group) < prefix_min_rows:
            continue
        # The blocks all of them hold, within every one's context (positions before its new tokens).
        context_blocks = min((lens[b] - (offsets[b + 1] - offsets[b])) // meta.block_size for b in group)
        tables = meta.block_tables[group, :context_blocks]  # (n, C)
        same = (tables == tables[0]).all(dim=0)  # (C,)
        num_keys = (context_blocks if bool(same.all()) else int(same.to(torch.int8).argmin())) * meta.block_size
        if num_keys < min_keys:
            continue
        rows = torch.cat([torch.arange(offsets[b], offsets[b + 1]) for b in group])
        prefixes.append(SharedPrefix(rows, _context_slots(meta, group[0], num_keys), num_keys))
        key_start[group] = num_keys
    return GemmPlan(chunks, prefixes, skip, key_start)


class CpuPagedAttention(AttentionBackend):
    name = "cpu"
    # What goes through torch's flash attention instead of the op, by dtype: (a chunk's min new tokens, its min keys,
    # min rows on one shared prefix of at least min keys). Measured on one core of a Xeon with AMX (8 heads / 4 KV
    # heads of 64, 2026-12-05): for one chunk, the op's time / flash attention's is 1.0-2.7x in bfloat16 from 16 rows
    # on 128 keys (0.3-1.0x at 4-8 rows) and 1.3-1.5x in float32 from 32 rows on 512 keys (0.4-0.9x at fewer rows or
    # keys). Where several sequences on a cached prefix each bring 16-48 tokens, one flash call for all their rows
    # on the prefix (the op doing the rest) beats a call per sequence: the step admitting 4 of them on a 768-token
    # prefix 53 -> 46 ms; hence a chunk alone from 64 rows. Other dtypes go by float32's.
    gemm_thresholds = {torch.bfloat16: (64, 128, 16), torch.float32: (64, 512, 32)}

    def __init__(self):
        self.op = load_op()

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
            meta.derived = plan_gemms(meta, *(self.gemm_thresholds.get(q.dtype) or self.gemm_thresholds[torch.float32]))
        plan: GemmPlan = meta.derived
        # out (T, H, D), lse (T, H): float32
        out, lse = self.op.paged_attention(q, cache[0], cache[1], meta.block_tables, meta.query_start, meta.seq_lens,
                                           meta.block_size, scale, meta.sliding_window or 0, plan.skip, plan.key_start)
        for chunk in plan.chunks:
            out[chunk.rows], _ = self._gemm_attention(q[chunk.rows], cache, chunk.slots, chunk.num_keys, scale,
                                                      causal=True, window=meta.sliding_window or 0)
        for prefix in plan.prefixes:
            # softmax over prefix + rest = each part's softmax, weighted by its share of the exp-sum: sigmoid of
            # the difference of their log-sum-exps.
            o_prefix, lse_prefix = self._gemm_attention(q[prefix.rows], cache, prefix.slots, prefix.num_keys, scale,
                                                        causal=False)
            o_rest = out[prefix.rows]  # (R, H, D)
            weight = torch.sigmoid(lse_prefix - lse[prefix.rows]).unsqueeze(-1)  # (R, H, 1)
            out[prefix.rows] = o_rest + (o_prefix - o_rest) * weight
        return out.to(q.dtype)

    def _gemm_attention(self, q: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor, num_keys: int, scale: float,
                        causal: bool, window: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows' attention to the keys at `slots` (num_keys real ones, then padding) through torch's CPU flash
        attention (blocked, float32 sums, its GEMMs on AMX tiles where the CPU has them): q (M, H, D) -> out
        (M, H, D) and each row's log-sum-exp of scores (M, H) float32.

        causal: the rows are one chunk's new tokens, the last M of the keys (which each sees up to its own, within
        `window`); else every row sees every key (a prefix before all of them)."""
        M, H, D = q.shape
        Hkv = cache.shape[2]
        G = H // Hkv  # query heads per KV head
        M_pad, L_pad = padded_rows(M), slots.shape[0]
        if M_pad != M:
            q = torch.cat([q, q.new_zeros(M_pad - M, H, D)])  # (M_pad, H, D)
        q = q.view(M_pad, Hkv, G, D).permute(1, 2, 0, 3)  # (Hkv, G, M_pad, D), a view
        # (L_pad, Hkv, D) -> (Hkv, G, L_pad, D): each KV head seen by its G query heads (a stride-0 view, no copy)
        k, v = (cache[i].index_select(0, slots).permute(1, 0, 2).unsqueeze(1).expand(Hkv, G, L_pad, D) for i in (0, 1))
        mask = _key_mask(M, M_pad, L_pad, num_keys, window if causal else None, q.dtype)  # (M_pad, L_pad)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=mask, scale=scale)
        # out (Hkv, G, M_pad, D) -> (M, H, D); lse (Hkv, G, M_pad) -> (M, H)
        return out[:, :, :M].permute(2, 0, 1, 3).reshape(M, H, D), lse[:, :, :M].permute(2, 0, 1).reshape(M, H)


# A step's layers share their chunks' masks (every layer asks for the same ones; a few steps' worth kept).
@functools.lru_cache(maxsize=8)
def _key_mask(M: int, M_pad: int, L_pad: int, num_keys: int, window: int | None, dtype: torch.dtype) -> torch.Tensor:
    """(M_pad, L_pad) additive mask, 0 where a row sees a key and -inf elsewhere. window None: every row sees the
    num_keys real keys (a shared prefix); else (a chunk, its M new tokens the last of the keys) row i at position
    p = num_keys - M + i sees keys max(0, p - window + 1) .. p (window 0: no window). Padding rows (i >= M) see every
    real key, so that they stay finite."""
    keys = torch.arange(L_pad)  # (L_pad,)
    if window is None:
        seen = (keys < num_keys).expand(M_pad, L_pad)
    else:
        last = (num_keys - M + torch.arange(M_pad)).clamp(max=num_keys - 1)[:, None]  # (M_pad, 1)
        seen = keys <= last
        if window > 0:
            seen &= keys > last - window
    return torch.zeros(M_pad, L_pad, dtype=dtype).masked_fill_(~seen, float("-inf"))
