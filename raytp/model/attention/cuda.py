"""The CUDA attention backend: flash attention 2 through torch, reading the paged KV cache.

Two ways in, chosen once by what the installed torch offers (read from the
call signatures, not the version string):

- **paged**: `torch.nn.attention.varlen.varlen_attn` with `block_table`,
  `seqused_k` and `enable_gqa` (torch >= 2.12). The kernel reads the cache's
  pages in place. FA2's paged path takes pages of a multiple of 256 tokens only
  (`TORCH_CHECK(!paged_KV || page_block_size % 256 == 0)` in mha_varlen_fwd),
  so the engine's block size must be one: `block_size` left unset is 256 on
  CUDA (config.resolved_block_size).
- **gathered**: torch's flash-attention op without a block table (torch
  2.5-2.11, whose varlen_attn has no block_table, or a block size that is not
  a multiple of 256). Each layer first gathers its sequences' keys and values
  into one contiguous variable-length batch (an index_select each, with the
  index derived once per step): a copy of the context per layer, but no padding
  and no host sync, unlike the reference.

Split-KV (the kernel's own choice when num_splits is unset) with ragged query
lengths has an open silent-correctness report (pytorch/pytorch#194167), so a
step with any prompt chunk runs num_splits=1; a decode-only step (one query row
per sequence) lets the kernel split long contexts, where splitting pays.

The backend checks itself against the reference when built, at the engine's
block size, on a step with several sequences, a 4k-token context, prompt
chunks and decode rows, and on a decode-only step over the same contexts.
"""
from __future__ import annotations

import inspect

import torch

from raytp.model.attention import AttentionBackend, AttentionMetadata

PAGE_MULTIPLE = 256  # FA2's paged KV cache: a page (our block) is a multiple of this many tokens
_PAGED_ARGS = {"block_table", "seqused_k", "enable_gqa", "num_splits"}

# (start, new tokens) per sequence: a prompt, a chunk after a 4000-token cached prefix, decode rows (one at 4096
# keys), a chunk after a short prefix.
CHECK_STEP = [(0, 40), (4000, 96), (4095, 1), (300, 1), (17, 9)]
CHECK_DECODE_STEP = [(4095, 1), (300, 1), (2000, 1)]


def paged_varlen_attn():
    """torch's varlen_attn if it reads a paged cache (block_table, seqused_k, enable_gqa, num_splits), else None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn if _PAGED_ARGS <= set(inspect.signature(varlen_attn).parameters) else None


def flash_forward_op():
    """aten's flash-attention forward if it takes the variable-length arguments this backend passes, else None."""
    op = getattr(torch.ops.aten, "_flash_attention_forward", None)
    if op is None:
        return None
    names = {a.name for a in op.default._schema.arguments}
    return op if {"cum_seq_q", "cum_seq_k", "window_size_left", "window_size_right"} <= names else None


def paged_kernel_fits(block_size: int) -> bool:
    """Whether the paged kernel is in this torch and reads pages of block_size tokens."""
    return paged_varlen_attn() is not None and block_size % PAGE_MULTIPLE == 0


class CudaFlashAttention(AttentionBackend):
    name = "cuda"

    def __init__(self, dtype: torch.dtype = torch.bfloat16, block_size: int = PAGE_MULTIPLE, device: str = "cuda"):
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available")
        if dtype not in (torch.float16, torch.bfloat16):
            raise RuntimeError(f"flash attention runs in float16/bfloat16, not {dtype}")
        self.block_size = block_size
        self.varlen_attn = paged_varlen_attn()
        if self.varlen_attn is not None and block_size % PAGE_MULTIPLE == 0:
            self.kernel = "paged"
        else:
            self.flash_forward = flash_forward_op()
            if self.flash_forward is None:
                raise RuntimeError(f"torch {torch.__version__} has neither a paged varlen_attn nor aten's "
                                   "_flash_attention_forward with variable lengths")
            self.kernel = "gathered"
        self._check_against_reference(dtype, device)

    @property
    def label(self) -> str:
        return f"cuda-{self.kernel}"

    def describe(self) -> str:
        if self.kernel == "paged":
            return f"flash attention 2, paged (pages of {self.block_size} tokens)"
        why = ("this torch's varlen_attn reads no paged cache" if self.varlen_attn is None
               else f"block_size {self.block_size} is not a multiple of {PAGE_MULTIPLE}")
        return f"flash attention 2 over keys gathered per layer ({why})"

    def _check_against_reference(self, dtype: torch.dtype, device: str) -> None:
        """Raises unless both check steps match the reference at this block size (GQA, head_dim 128)."""
        from raytp.model.attention import build_metadata, random_step
        from raytp.model.attention.reference import ReferenceAttention

        for i, spec in enumerate((CHECK_STEP, CHECK_DECODE_STEP)):
            chunks, q, k, v, cache = random_step(spec, 8, 2, 128, self.block_size, dtype, device, seed=1 + i)
            outs = []
            for backend in (self, ReferenceAttention()):
                meta = build_metadata(chunks, self.block_size, torch.device(device))
                outs.append(backend.forward(q, k, v, cache.clone(), meta, 128**-0.5).float())
            err = (outs[0] - outs[1]).abs().max().item()
            if not err < 3e-2:
                raise RuntimeError(f"{self.describe()} differs from the reference by {err:.2e} on this device "
                                   f"(block_size {self.block_size}, step {spec})")

    def attend(self, q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        # FA2's window counts the keys before the query; ours counts the query too. (-1, 0): causal, aligned to
        # the last key (a chunk's first row sees its cached prefix).
        left = meta.sliding_window - 1 if meta.sliding_window else -1
        if self.kernel == "paged":
            Hkv, D = cache.shape[2], cache.shape[3]
            pages = cache.view(2, -1, meta.block_size, Hkv, D)  # (2, pages, page_size, Hkv, D)
            return self.varlen_attn(q, pages[0], pages[1], meta.query_start, meta.cu_seq_lens, meta.max_query_len,
                                    meta.max_seq_len, scale=scale, window_size=(left, 0), enable_gqa=True,
                                    seqused_k=meta.seq_lens, block_table=meta.block_tables,
                                    num_splits=None if meta.max_query_len == 1 else 1)  # (T, H, D)
        slots, cu_seq_k, seqused_k = self._context_slots(meta)  # (K,), (B + 1,), (B,) or None
        keys, values = cache[0].index_select(0, slots), cache[1].index_select(0, slots)  # (K, Hkv, D) each
        # FA2 takes fewer KV heads than query heads (GQA) as they are.
        out = self.flash_forward(q, keys, values, meta.query_start, cu_seq_k, meta.max_query_len,
                                 meta.max_seq_len, 0.0, left == -1, False, scale=scale, window_size_left=left,
                                 window_size_right=0, seqused_k=seqused_k)
        return out[0]  # (T, H, D)

    @staticmethod
    def _context_slots(meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The cache slots of the keys to gather, sequence after sequence (K,), their cumulative counts per sequence
        (B + 1,) and, with a key span, how many of each sequence's are real (B,); derived at the step's first layer
        and reused by the others.

        Eagerly K is the sum of seq_lens. In a decode graph (meta.key_span) every sequence reads key_span slots
        (K = B x key_span), a fixed shape; the kernel uses only the first seq_lens[b] of sequence b's."""
        if meta.derived is None:
            device, bs = meta.seq_lens.device, meta.block_size
            if meta.key_span is not None:
                B, span = len(meta.seq_lens), meta.key_span
                pos = torch.arange(span, device=device)  # (span,)
                block = meta.block_tables[:, pos // bs].long()  # (B, span); past a sequence's blocks: block 0, unread
                slots = (block * bs + pos % bs).reshape(-1)  # (B * span,)
                cu_seq_k = torch.arange(B + 1, dtype=torch.int32, device=device) * span  # (B + 1,)
                meta.derived = (slots, cu_seq_k, meta.seq_lens)
            else:
                K = meta.num_keys
                seq_of_key = torch.repeat_interleave(torch.arange(len(meta.seq_lens), device=device), meta.seq_lens,
                                                     output_size=K)  # (K,)
                pos = torch.arange(K, device=device) - meta.cu_seq_lens[:-1].long()[seq_of_key]  # (K,) position in its sequence
                block = meta.block_tables[seq_of_key, pos // bs].long()  # (K,)
                meta.derived = (block * bs + pos % bs, meta.cu_seq_lens, None)
        return meta.derived
