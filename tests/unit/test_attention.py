"""The compiled CPU attention backend against the reference (padded SDPA) on mixed steps.

Each step mixes whole prompts, prompt chunks that continue a cached prefix,
and decode rows, over shuffled (non-contiguous) cache blocks; shapes cover
MHA, GQA, one KV head shared by all query heads (what a rank holds when KV
heads are replicated across TP ranks) and sliding windows.
"""
from __future__ import annotations

import pytest
import torch

from raytp.model.attention import SeqChunk, build_metadata, random_step, select_backend

CPU = torch.device("cpu")
BLOCK_SIZE = 4


# Prompts, decode rows, chunks after a prefix.
MIXED = [(0, 9), (5, 1), (13, 1), (8, 6), (0, 1), (30, 1), (3, 17), (0, 24), (21, 40)]


@pytest.mark.parametrize(
    "heads,kv_heads,window",
    [(4, 4, None), (8, 2, None), (6, 1, None), (8, 2, 5), (4, 4, 1)],
    ids=["mha", "gqa", "one_kv_head", "gqa_window5", "window1"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("gemm_min_rows", [17, 1, 1000], ids=["gemm-long", "gemm-all", "gemm-none"])
def test_cpu_backend_matches_reference(heads, kv_heads, window, dtype, gemm_min_rows):
    reference, fast = select_backend("cpu", "reference"), select_backend("cpu", "cpu")
    assert fast.name == "cpu"
    # Which sequences take the GEMM path instead of the row-by-row op: the 17-, 24- and 40-token chunks, all of
    # them (decode rows too), or none.
    fast.flash_thresholds = {dtype: (gemm_min_rows, 0, gemm_min_rows)}
    fast.amx_instead_of_flash = False  # (the AMX path: test_op_on_amx_tiles_takes_every_row)
    chunks, q, k, v, cache = random_step(MIXED, heads, kv_heads, 32, BLOCK_SIZE, dtype, seed=heads * 10 + kv_heads)
    outs = []
    for backend in (reference, fast):
        meta = build_metadata(chunks, BLOCK_SIZE, CPU, window)
        c = cache.clone()
        outs.append((backend.forward(q, k, v, c, meta, 32**-0.5), c))
    (ref_out, ref_cache), (out, new_cache) = outs
    assert out.shape == (q.shape[0], heads * 32)
    assert torch.equal(new_cache, ref_cache)  # the same K/V written to the same slots
    tol = 2e-6 if dtype == torch.float32 else 2e-2
    err = (out.float() - ref_out.float()).abs().max().item()
    print(f"{heads}/{kv_heads} window={window} {dtype}: max abs error {err:.2e}")
    assert err < tol



@pytest.mark.parametrize("head_dim", [32, 64, 48], ids=["d32", "d64", "d48"])
@pytest.mark.parametrize("window", [None, 7], ids=["full", "window7"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("thresholds", [(1000, 0, 1000), (1000, 0, 2), (2, 0, 1000)],
                         ids=["op", "prefix-group", "chunk"])
def test_cpu_backend_matches_reference_on_shared_prefix_blocks(head_dim, window, dtype, thresholds):
    """Sequences that share a cached prefix's blocks (what prefix caching hands out), with decode rows and a short
    chunk after it, beside a sequence of its own: the op computes rows that share blocks together; or the four
    sequences' 8 rows go through one flash call (the prefix once, then each one's own keys, masked to their own);
    or the 5-token chunk goes through flash attention alone."""
    reference, fast = select_backend("cpu", "reference"), select_backend("cpu", "cpu")
    fast.flash_thresholds = {dtype: thresholds}
    fast.amx_instead_of_flash = False
    prefix = [9, 2, 14, 5, 11]  # 20 cached tokens
    chunks = [
        SeqChunk(20, 1, prefix + [0]),
        SeqChunk(29, 1, prefix + [7, 3, 12]),
        SeqChunk(20, 5, prefix + [4, 15]),
        SeqChunk(17, 1, [8, 6, 10, 13, 17]),
        SeqChunk(23, 1, prefix + [18]),
    ]
    gen = torch.Generator().manual_seed(head_dim)
    T = sum(c.num_new for c in chunks)
    q, k, v = (torch.randn(T, n, head_dim, generator=gen).to(dtype) for n in (8, 4, 4))
    cache = torch.randn(2, 19 * BLOCK_SIZE, 4, head_dim, generator=gen).to(dtype)
    metas = [build_metadata(chunks, BLOCK_SIZE, CPU, window) for _ in range(2)]
    outs = [backend.forward(q, k, v, cache.clone(), meta, 0.1) for backend, meta in zip((reference, fast), metas)]
    plan = metas[1].derived
    grouped = thresholds[2] < 1000 and window is None
    chunk_alone = thresholds[0] < 1000
    assert len(plan.groups) == grouped + chunk_alone
    assert int(plan.skip.sum()) == 4 * grouped + chunk_alone
    tol = 2e-6 if dtype == torch.float32 else 2e-2
    assert (outs[1].float() - outs[0].float()).abs().max().item() < tol

def bf16_error_on_blocks_of_16(reference, fast, chunks, heads, kv_heads, head_dim, cache_blocks, seed):
    """The step `chunks` (cache blocks of 16) in bfloat16 with random q, k, v and cache through both backends: the
    largest absolute difference of their outputs."""
    gen = torch.Generator().manual_seed(seed)
    T = sum(c.num_new for c in chunks)
    q, k, v = (torch.randn(T, n, head_dim, generator=gen).to(torch.bfloat16) for n in (heads, kv_heads, kv_heads))
    cache = torch.randn(2, cache_blocks * 16, kv_heads, head_dim, generator=gen).to(torch.bfloat16)
    outs = [backend.forward(q, k, v, cache.clone(), build_metadata(chunks, 16, CPU), head_dim**-0.5)
            for backend in (reference, fast)]
    err = (outs[1].float() - outs[0].float()).abs().max().item()
    print(f"{heads}/{kv_heads} d{head_dim} (op.amx() = {fast.op.amx()}): max abs error {err:.2e}")
    return err


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 4, 64), (9, 3, 64), (8, 1, 32), (16, 2, 128), (4, 4, 64)],
                         ids=["gqa2", "gqa3", "one_kv_head_d32", "gqa8_d128", "mha"])
def test_op_on_blocks_of_16_matches_reference(heads, kv_heads, head_dim):
    """bfloat16 with cache blocks of 16, where (on a CPU with AMX: op.amx()) the op's scores over the keys a group's
    rows share come from AMX tiles: decode rows of six sequences on a 48-token cached prefix (more query vectors than
    a tile's 16 for most head counts), two that share only its first block, a 21-token chunk after 43 cached tokens
    of its own (its rows share all keys before it; 43 is not whole tiles), and a lone decode row on a block of its
    own. All through the op (no flash attention), against the reference."""
    reference, fast = select_backend("cpu", "reference"), select_backend("cpu", "cpu")
    fast.flash_thresholds = {torch.bfloat16: (1000, 0, 1000, 1)}
    prefix = [3, 7, 1]
    chunks = [SeqChunk(48 + i, 1, prefix + [10 + i]) for i in range(6)]  # decode rows at positions 48 .. 53
    chunks += [SeqChunk(40, 1, [3, 20, 21]), SeqChunk(70, 1, [3, 22, 23, 24, 25])]  # share block 3 only
    chunks += [SeqChunk(43, 21, [26, 27, 28, 29]), SeqChunk(9, 1, [30])]
    assert not build_metadata(chunks, 16, CPU).derived  # (plan made by forward, per step)
    err = bf16_error_on_blocks_of_16(reference, fast, chunks, heads, kv_heads, head_dim, 32,
                                     seed=heads * 100 + head_dim)
    assert err < 2e-2


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 4, 64), (9, 3, 64), (16, 2, 128), (4, 4, 64)],
                         ids=["gqa2", "gqa3", "gqa8_d128", "mha"])
def test_decode_rows_on_a_long_shared_prefix(heads, kv_heads, head_dim):
    """bfloat16, cache blocks of 16: decode rows of eight sequences on one cached 208-token prefix (each with 4-32
    keys of its own after it), as between the admissions of requests on a shared system prompt. On a CPU with AMX
    their scores and values' sums over the prefix (13 key tiles: the values' last 32-key tile half full) come from
    AMX tiles (8+ query vectors), their own keys' from the AVX-512 passes; against the reference."""
    reference, fast = select_backend("cpu", "reference"), select_backend("cpu", "cpu")
    prefix = list(range(13))  # 13 blocks, 208 keys
    chunks = [SeqChunk(208 + 4 * i + 3, 1, prefix + [13 + 3 * i, 14 + 3 * i, 15 + 3 * i]) for i in range(8)]
    err = bf16_error_on_blocks_of_16(reference, fast, chunks, heads, kv_heads, head_dim, 40, seed=heads * 7 + head_dim)
    assert err < 2e-2


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 4, 64), (9, 3, 64), (16, 2, 128), (12, 2, 96), (8, 4, 32),
                                                     (4, 4, 64)],
                         ids=["gqa2", "gqa3", "gqa8_d128", "gqa6_d96", "gqa2_d32", "mha"])
def test_op_on_amx_tiles_takes_every_row(heads, kv_heads, head_dim):
    """bfloat16 with cache blocks of 16 as the engine runs it (no thresholds set): where the op computes on AMX tiles
    (op.amx(); 2+ query heads per KV head), no row goes to flash attention, and its groups share the keys and values
    they arranged for the tiles: chunks of 32, 20 and 20 rows on a cached 144-token prefix (the first sequence's
    second group shares 160 keys, the next group only the 144 of the prefix, which end half a 32-key tile; groups of
    16 rows straddle sequences; past 128 shared keys the values' sums are on tiles too), a 170-token prompt from
    scratch (each group shares more keys than the one before it), decode rows on the prefix and a lone one; against
    the reference. Without AMX, or with one query head per KV head, the flash plan as before."""
    reference, fast = select_backend("cpu", "reference"), select_backend("cpu", "cpu")
    prefix = [3, 7, 1, 12, 40, 41, 42, 43, 44]
    chunks = [SeqChunk(144, 32, prefix + [20, 21]), SeqChunk(144, 20, prefix + [22, 23]),
              SeqChunk(144, 20, prefix + [24, 25])]
    chunks += [SeqChunk(0, 170, list(range(50, 61))), SeqChunk(144, 1, prefix + [33]),
               SeqChunk(150, 1, prefix + [34]), SeqChunk(9, 1, [35])]
    gen = torch.Generator().manual_seed(heads * 10 + head_dim)
    T = sum(c.num_new for c in chunks)
    q, k, v = (torch.randn(T, n, head_dim, generator=gen).to(torch.bfloat16) for n in (heads, kv_heads, kv_heads))
    cache = torch.randn(2, 64 * 16, kv_heads, head_dim, generator=gen).to(torch.bfloat16)
    metas = [build_metadata(chunks, 16, CPU) for _ in range(2)]
    outs = [backend.forward(q, k, v, cache.clone(), meta, head_dim**-0.5) for backend, meta in zip((reference, fast),
                                                                                                  metas)]
    takes_all = fast.takes_all(q.view(T, heads, head_dim), kv_heads, metas[1])
    assert takes_all == (fast.op.amx() and heads > kv_heads)
    assert (not metas[1].derived.groups) == takes_all  # else flash takes the prompt and the prefix's chunks
    err = (outs[1].float() - outs[0].float()).abs().max().item()
    print(f"{heads}/{kv_heads} d{head_dim} (op.amx() = {fast.op.amx()}): max abs error {err:.2e}")
    assert err < 2e-2


def test_window_and_prefix_change_the_result():
    """The cases above would pass trivially if the window or the cached prefix were ignored by both backends."""
    fast = select_backend("cpu", "cpu")
    chunks, q, k, v, cache = random_step([(12, 3)], 4, 2, 16, BLOCK_SIZE, torch.float32, seed=3)

    def run(window, c):
        return fast.forward(q, k, v, c, build_metadata(chunks, BLOCK_SIZE, CPU, window), 0.25)

    full = run(None, cache.clone())
    assert not torch.allclose(full, run(4, cache.clone()))
    other_prefix = cache.clone()
    other_prefix[:, chunks[0].block_table[0] * BLOCK_SIZE] += 1.0  # position 0's key and value
    assert not torch.allclose(full, run(None, other_prefix))


def test_metadata_is_variable_length():
    chunks = [SeqChunk(0, 3, [4, 1]), SeqChunk(5, 1, [2, 0]), SeqChunk(2, 4, [3, 5])]
    meta = build_metadata(chunks, BLOCK_SIZE, CPU)
    assert meta.query_start.tolist() == [0, 3, 4, 8]
    assert meta.seq_lens.tolist() == [3, 6, 6]
    assert meta.cu_seq_lens.tolist() == [0, 3, 9, 15]
    assert meta.positions.tolist() == [0, 1, 2, 5, 2, 3, 4, 5]
    # position p of a sequence lives in slot table[p // 4] * 4 + p % 4
    assert meta.slot_mapping.tolist() == [16, 17, 18, 1, 14, 15, 20, 21]
    assert meta.last_token_index.tolist() == [2, 3, 7]
    assert meta.block_tables.tolist() == [[4, 1], [2, 0], [3, 5]]
    assert (meta.max_query_len, meta.max_seq_len) == (4, 6)


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        select_backend("cpu", "flash")
