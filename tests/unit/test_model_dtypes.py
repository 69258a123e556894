"""bf16 and fp16 on CPU: raytp's model (TP=1) against transformers in the same dtype.

On this machine the two are bit-identical (raytp rounds where transformers
does: norms in float32, rotary tables cast to the model dtype); the bound
leaves room for other CPUs' kernels, and the argmax must agree almost everywhere.
"""
from __future__ import annotations

import pytest
import torch

from raytp.cluster.comm import SingleRank
from raytp.model.attention import SeqChunk, build_metadata
from raytp.model.loader import load_model
from tests.helpers import load_reference, write_llama

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_matches_transformers(tmp_path, dtype):
    path = write_llama(tmp_path, initializer_range=0.1)
    torch_dtype = getattr(torch, dtype)
    model = load_model(path, SingleRank(), dtype=dtype, progress=False)
    ref = load_reference(path, dtype=torch_dtype)
    ids = torch.randint(3, 128, (24,), generator=torch.Generator().manual_seed(0))
    block_size = 4
    cache = torch.zeros(model.kv_cache_shape(8 * block_size), dtype=torch_dtype)
    meta = build_metadata([SeqChunk(0, len(ids), list(range(7, 1, -1)) + [0])], block_size, torch.device("cpu"))
    hidden = model(ids, meta, cache)  # (T, hidden)
    ours = model.compute_logits(hidden)  # (T, vocab) float32
    with torch.no_grad():
        theirs = ref(ids.unsqueeze(0)).logits[0].float()  # (T, vocab)
    rel = (ours - theirs).abs().max() / theirs.abs().max()
    agree = (ours.argmax(-1) == theirs.argmax(-1)).float().mean()
    assert rel < 1e-2, f"{dtype}: max relative error {rel:.2e}"
    assert agree >= 0.9, f"{dtype}: argmax agrees on {agree:.0%} of positions"
    assert model.embed_tokens.weight.dtype == torch_dtype and cache.dtype == torch_dtype
