"""CUDA: a GPU rank's host copies (gpu_host_copies): its shard, and its KV cache mirrored after every step
(raytp/cluster/kv_mirror.py); and the rank started in a lost rank's place that restores both (skipped without CUDA).

In-process, world size 1 (the GPU machine has no Ray): a rank with a store prefills some sequences (eager steps
and decode steps replayed from CUDA graphs, whose padding rows write the scratch block only); a second rank
process's worth of state (a new TPWorker) restores from the store alone (the checkpoint's weights moved away): the
shard's host copy, the cache's mirror. Its cache equals the first rank's on every slot a sequence owns, and both
decode the same tokens.
"""
import glob
import os

import pytest
import torch

from raytp.cluster.rank_store import new_store_dir, remove_store
from raytp.cluster.worker import TPWorker
from raytp.engine.step import SeqStep
from raytp.sampling import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

BLOCK = 16
NUM_BLOCKS = 64
GREEDY = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(small_llama):
    return small_llama


@pytest.fixture
def store():
    path = new_store_dir("/dev/shm") or new_store_dir("/tmp")
    yield path
    remove_store(path)


def _decode(w: TPWorker, steps: list[SeqStep], tokens: list[int], done: int) -> list[int]:
    return w.execute([SeqStep([t], s.prompt_len + done, s.block_table, GREEDY, done + 1, s.request_id,
                              prompt_len=s.prompt_len) for s, t in zip(steps, tokens)]).token_ids


@pytest.mark.parametrize("graphs", [False, True])
def test_a_rank_restored_from_the_host_mirror_decodes_as_the_lost_one(checkpoint, store, graphs):
    rank = TPWorker(0, 1, "cuda", "bfloat16")
    rank.init_communicator(None)
    rank.load(checkpoint, block_size=BLOCK, store_dir=store)
    if graphs:
        assert rank.configure_cuda_graphs(8, 2048)
    rank.init_kv_cache(NUM_BLOCKS, BLOCK)
    assert rank.kv_mirror is not None and rank.kv_cache.is_cuda
    g = torch.Generator().manual_seed(1)
    steps = [SeqStep(torch.randint(3, 1000, (n,), generator=g).tolist(), 0, blocks, GREEDY, 0, f"r{i}", prompt_len=n)
             for i, (n, blocks) in enumerate([(40, [9, 2, 30, 31]), (7, [5, 6]), (18, [40, 11, 12])])]
    tokens = rank.execute(steps).token_ids
    for done in range(3):  # decode steps (graph replays where configured) write into the mirror too
        tokens = _decode(rank, steps, tokens, done)

    replacement = TPWorker(0, 1, "cuda", "bfloat16")
    weights = glob.glob(os.path.join(checkpoint, "*.safetensors"))
    for path in weights:  # the replacement's shard is the host copy: it reads no weights from the checkpoint
        os.rename(path, path + ".away")
    try:
        info = replacement.restore(checkpoint, "auto", store, NUM_BLOCKS, BLOCK,
                                   graph_limits=(8, 2048) if graphs else None)
    finally:
        for path in weights:
            os.rename(path + ".away", path)
    replacement.init_communicator(None, epoch=1)
    assert info["pid"] > 0 and replacement.kv_cache.is_cuda
    owned = torch.tensor([b * BLOCK + i for s in steps for b in s.block_table for i in range(BLOCK)], device="cuda")
    assert torch.equal(replacement.kv_cache.index_select(2, owned), rank.kv_cache.index_select(2, owned))
    for done in range(3, 6):
        assert _decode(replacement, steps, tokens, done) == (tokens := _decode(rank, steps, tokens, done))
