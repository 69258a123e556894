"""CUDA graphs for decode steps: one replay instead of ~30 kernel launches per layer from Python.

A decode step (every sequence adds one token) is the same few hundred small
kernels step after step; at batch 1 on a GPU, launching them from eager Python
takes longer than running them. So decode steps replay graphs captured once per
shape. A graph fixes its tensors' shapes and addresses, so:

- The batch is padded to a size from a bounded set (`graph_batch_sizes`); the
  padding rows write their K/V to the cache's scratch slot (a block no
  sequence owns) and their outputs are dropped.
- The attention reads each sequence's keys up to a fixed span (a power of two,
  at least MIN_KEY_SPAN tokens, at most max_model_len): the metadata's
  `key_span`; the kernel is told each sequence's real length (`seqused_k`).
  A graph is captured per (padded batch, key span), lazily: at warm-up for the
  shortest span, later at the first step that needs a longer one.
- The step's inputs (token ids, positions, cache slots, lengths, block tables)
  live in one static device buffer, filled from one pinned host buffer with one
  non-blocking copy per step; the graph writes its hidden states into one static
  output buffer. The LM head and the sampler run eagerly after the replay.

All graphs share one memory pool: they never run at the same time, and each
step reads the output before the next replay. Steps that do not fit (a prompt
chunk, more sequences than the largest size, a key span the gathered kernel
would copy too much of) run eagerly.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from raytp.model.attention import AttentionMetadata, SeqChunk

log = logging.getLogger(__name__)

# Padded batch sizes: fine steps where batches are common and small, coarser above (vLLM and SGLang use alike).
BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
MIN_KEY_SPAN = 256  # tokens: the shortest key span a graph reads; longer spans double
# The gathered kernel copies batch x span keys per layer: above this many keys a step runs eagerly instead (it
# copies only the keys that exist there).
MAX_GATHERED_KEYS = 1 << 17


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """The padded batch sizes to capture: every size below max_num_seqs and the first one that holds it (all of
    BATCH_SIZES when max_num_seqs is larger: bigger steps run eagerly, where launches cost little beside the work)."""
    sizes = [b for b in BATCH_SIZES if b < max_num_seqs]
    return sizes + [b for b in BATCH_SIZES if b >= max_num_seqs][:1]


def key_span(max_seq_len: int, block_size: int, max_model_len: int) -> int:
    """The fixed number of key slots per sequence that covers max_seq_len: a power of two from MIN_KEY_SPAN (a
    multiple of the block size), at most max_model_len rounded up to whole blocks."""
    cap = -(-max_model_len // block_size) * block_size
    span = max(MIN_KEY_SPAN, block_size, 1 << max(0, max_seq_len - 1).bit_length())
    span = -(-span // block_size) * block_size
    return min(span, cap)


class DecodeGraphs:
    """The decode graphs of one rank's model over one KV cache (captured again if either changes)."""

    def __init__(self, model, kv_cache: torch.Tensor, block_size: int, max_num_seqs: int, max_model_len: int,
                 scratch_slot: int, gathered_keys_limit: int | None = MAX_GATHERED_KEYS):
        """kv_cache: (layers, 2, slots, Hkv, D); scratch_slot: a slot no sequence uses (padding rows write there);
        gathered_keys_limit: None for a kernel that reads the paged cache in place, else the most keys per step."""
        self.model, self.kv_cache, self.block_size = model, kv_cache, block_size
        self.max_model_len, self.scratch_slot = max_model_len, scratch_slot
        self.gathered_keys_limit = gathered_keys_limit
        self.batch_sizes = graph_batch_sizes(max_num_seqs)
        self.max_blocks = -(-max_model_len // block_size)
        B = self.batch_sizes[-1]
        # One buffer: int64 token ids, positions and slots (B each), then int32 context lengths (B), their sums
        # (B + 1) and block tables (B, max_blocks).
        n64, n32 = 3 * B, 2 * B + 1 + B * self.max_blocks
        self._host = torch.zeros(8 * n64 + 4 * n32, dtype=torch.uint8, pin_memory=kv_cache.is_cuda)
        self._static = torch.zeros(self._host.shape, dtype=torch.uint8, device=kv_cache.device)
        h64, h32 = self._host[: 8 * n64].numpy().view(np.int64), self._host[8 * n64 :].numpy().view(np.int32)
        d64, d32 = self._static[: 8 * n64].view(torch.int64), self._static[8 * n64 :].view(torch.int32)
        self.h_ids, self.h_positions, self.h_slots = h64[:B], h64[B : 2 * B], h64[2 * B :]
        self.h_seq_lens, self.h_cu_seq_lens = h32[:B], h32[B : 2 * B + 1]
        self.h_tables = h32[2 * B + 1 :].reshape(B, self.max_blocks)
        self.d_ids, self.d_positions, self.d_slots = d64[:B], d64[B : 2 * B], d64[2 * B :]
        self.d_seq_lens, self.d_cu_seq_lens = d32[:B], d32[B : 2 * B + 1]
        self.d_tables = d32[2 * B + 1 :].view(B, self.max_blocks)
        self._query_start = torch.arange(B + 1, dtype=torch.int32, device=kv_cache.device)  # one row per sequence
        self.out = torch.zeros(B, model.args.hidden_size, dtype=model.dtype, device=kv_cache.device)  # (B, hidden)
        self.pool = None  # the graphs' shared memory pool, from the first capture on
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.replays = 0

    # ---- which steps ----------------------------------------------------------------------------------------

    def shape_for(self, chunks: list[SeqChunk]) -> tuple[int, int] | None:
        """(padded batch, key span) of a decode step, or None if it runs eagerly."""
        if len(chunks) > self.batch_sizes[-1] or any(c.num_new != 1 for c in chunks):
            return None
        batch = next(b for b in self.batch_sizes if b >= len(chunks))
        span = key_span(max(c.start + 1 for c in chunks), self.block_size, self.max_model_len)
        if self.gathered_keys_limit is not None and batch * span > self.gathered_keys_limit:
            return None
        return batch, span

    # ---- one step -----------------------------------------------------------------------------------------

    def run(self, token_ids: list[int], chunks: list[SeqChunk], shape: tuple[int, int]) -> torch.Tensor:
        """One decode step (shape from shape_for) -> hidden states (B, hidden), a view of the static output that the
        next replay overwrites."""
        if shape not in self.graphs:
            self.capture(*shape)
        self.load_inputs(token_ids, chunks, shape[0])
        self.graphs[shape].replay()
        self.replays += 1
        return self.out[: len(chunks)]

    def load_inputs(self, token_ids: list[int], chunks: list[SeqChunk], batch: int) -> None:
        """Fill the host buffer for this step and copy it to the static one (on the step's stream, before the
        replay, not blocking the host)."""
        self._fill(token_ids, chunks, batch)
        self._static.copy_(self._host, non_blocking=True)

    def _fill(self, token_ids: list[int], chunks: list[SeqChunk], batch: int) -> None:
        """The host buffer for this step; rows past the real ones are padding (token 0 at position 0, one key,
        K/V into the scratch slot)."""
        n, bs = len(chunks), self.block_size
        self.h_ids[:n] = token_ids
        self.h_ids[n:batch] = 0
        positions = np.fromiter((c.start for c in chunks), dtype=np.int64, count=n)  # (n,) the new token's
        self.h_positions[:n] = positions
        self.h_positions[n:batch] = 0
        self.h_tables[:batch] = 0
        for i, c in enumerate(chunks):
            self.h_tables[i, : len(c.block_table)] = c.block_table
        self.h_slots[:n] = self.h_tables[np.arange(n), positions // bs].astype(np.int64) * bs + positions % bs
        self.h_slots[n:batch] = self.scratch_slot
        self.h_seq_lens[:n] = positions + 1
        self.h_seq_lens[n:batch] = 1
        self.h_cu_seq_lens[0] = 0
        np.cumsum(self.h_seq_lens[:batch], out=self.h_cu_seq_lens[1 : batch + 1])

    def metadata(self, batch: int, span: int) -> AttentionMetadata:
        """The metadata a graph of this shape reads: views of the static buffer, sizes fixed."""
        return AttentionMetadata(
            positions=self.d_positions[:batch], slot_mapping=self.d_slots[:batch],
            query_start=self._query_start[: batch + 1], seq_lens=self.d_seq_lens[:batch],
            cu_seq_lens=self.d_cu_seq_lens[: batch + 1], block_tables=self.d_tables[:batch],
            last_token_index=self._query_start[:batch].long(), max_query_len=1, max_seq_len=span,
            num_keys=batch * span, block_size=self.block_size, sliding_window=self.model.args.sliding_window,
            key_span=span)

    # ---- capture ------------------------------------------------------------------------------------------

    def capture(self, batch: int, span: int) -> None:
        """Capture the decode graph of this shape on the current stream's device. The inputs are set to padding
        first: the warm-up run before the capture really writes K/V (to the scratch slot only)."""
        self._fill([], [], batch)
        self._static.copy_(self._host)
        meta = self.metadata(batch, span)
        ids = self.d_ids[:batch]
        # A warm-up run on a side stream first, as torch's docs ask (lazy initialisation stays out of the graph).
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.model(ids, meta, self.kv_cache)
        torch.cuda.current_stream().wait_stream(side)
        meta.derived = None  # what the warm-up derived belongs to no graph
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: a rank's other threads (Ray's pool, the communicator's abort) may touch CUDA meanwhile.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            self.out[:batch].copy_(self.model(ids, meta, self.kv_cache))
        self.graphs[(batch, span)] = graph
        log.debug("captured the decode graph of batch %d, key span %d", batch, span)

    def capture_all(self, span: int | None = None) -> int:
        """Capture every batch size at one key span (default the shortest); how many graphs that made."""
        span = span or key_span(1, self.block_size, self.max_model_len)
        made = 0
        for batch in self.batch_sizes:
            if self.gathered_keys_limit is not None and batch * span > self.gathered_keys_limit:
                break
            if (batch, span) not in self.graphs:
                self.capture(batch, span)
                made += 1
        return made

    def largest_shape(self) -> tuple[int, int]:
        """The shape whose graph holds the most memory: with the gathered kernel, the most keys copied (batch x
        span), else the largest batch at the longest span."""
        cap = key_span(self.max_model_len, self.block_size, self.max_model_len)
        spans = sorted({key_span(min(MIN_KEY_SPAN << i, cap), self.block_size, self.max_model_len) for i in range(20)})
        limit = self.gathered_keys_limit
        shapes = [(b, s) for b in self.batch_sizes for s in spans if limit is None or b * s <= limit]
        if not shapes:  # not even the smallest graph fits under the limit: steps run eagerly, no graph memory
            return self.batch_sizes[0], spans[0]
        return max(shapes, key=lambda shape: (shape[0] * shape[1] if limit is not None else 0, *shape))
