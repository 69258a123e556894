"""The CUDA attention backend: torch's flash-attention varlen kernel reading the paged cache through a block table.

`torch.nn.attention.varlen.varlen_attn` (torch >= 2.10) takes the whole step
(prefill chunks and decode rows) as one variable-length batch, with the cache
as a pool of pages and a block table per sequence. It is checked against the
reference on a small problem when the backend is built, so a kernel that does
not run on this GPU (or a torch without it) falls back to the reference at
start-up instead of failing the first step.
"""
from __future__ import annotations

import torch

from raytp.model.attention import AttentionBackend, AttentionMetadata


class CudaVarlenAttention(AttentionBackend):
    name = "cuda"

    def __init__(self, dtype: torch.dtype = torch.bfloat16):
        from torch.nn.attention.varlen import varlen_attn  # ImportError on an older torch

        if not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available")
        if dtype not in (torch.float16, torch.bfloat16):
            raise RuntimeError(f"flash attention runs in float16/bfloat16, not {dtype}")
        self.varlen_attn = varlen_attn
        self._check_against_reference(dtype)

    def _check_against_reference(self, dtype: torch.dtype) -> None:
        """Prefill, a chunk after a cached prefix and decode rows, GQA: raises unless it matches the reference."""
        from raytp.model.attention import build_metadata, random_step
        from raytp.model.attention.reference import ReferenceAttention

        chunks, q, k, v, cache = random_step([(0, 7), (9, 1), (5, 4)], 4, 2, 64, 16, dtype, "cuda", seed=1)
        outs = []
        for backend in (self, ReferenceAttention()):
            meta = build_metadata(chunks, 16, torch.device("cuda"))
            outs.append(backend.forward(q, k, v, cache.clone(), meta, 0.125).float())
        err = (outs[0] - outs[1]).abs().max().item()
        if not err < 3e-2:
            raise RuntimeError(f"varlen attention differs from the reference by {err:.2e} on this GPU")

    def attend(self, q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        Hkv, D = cache.shape[2], cache.shape[3]
        pages = cache.view(2, -1, meta.block_size, Hkv, D)  # (2, pages, page_size, Hkv, D)
        # The kernel's left window counts the keys before the query; ours counts the query too.
        window = (meta.sliding_window - 1, 0) if meta.sliding_window else (-1, 0)
        return self.varlen_attn(q, pages[0], pages[1], meta.query_start, meta.cu_seq_lens, meta.max_query_len,
                                meta.max_seq_len, scale=scale, window_size=window, enable_gqa=True,
                                seqused_k=meta.seq_lens, block_table=meta.block_tables)  # (T, H, D)
