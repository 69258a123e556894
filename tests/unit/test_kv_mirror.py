"""The KV cache's host mirror (raytp/cluster/kv_mirror.py), run on CPU tensors: the arrangement of a GPU rank with
gpu_host_copies, where the cache is the rank's own memory and the mirror a file. (tests/gpu runs it on a GPU.)

- the slots a step writes, as the worker derives them for the mirror, are build_metadata's slot mapping;
- after real prefill steps the mirror equals the rank's cache (gathered a few layers at a time), its space was
  reserved when it was made, and a rank that takes the rank's place with it decodes the same tokens;
- a mirror the file system has no room for is refused when it is created.
"""
import os
import random

import pytest
import torch

from raytp.cluster import kv_mirror
from raytp.cluster.kv_mirror import KVHostMirror
from raytp.cluster.rank_store import kv_path, new_store_dir, remove_store
from raytp.cluster.worker import TPWorker
from raytp.engine.step import SeqStep
from raytp.model.attention import SeqChunk, build_metadata, token_slots
from raytp.sampling import SamplingParams
from tests.helpers import write_llama

pytestmark = pytest.mark.timeout(120)

BLOCK = 16
NUM_BLOCKS = 32
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def test_token_slots_are_the_metadata_s_slot_mapping():
    rng = random.Random(3)
    for _ in range(20):
        chunks = []
        for _ in range(rng.randint(1, 6)):
            blocks = rng.sample(range(100), rng.randint(1, 6))
            start = rng.randint(0, len(blocks) * BLOCK - 1)
            chunks.append(SeqChunk(start, rng.randint(1, len(blocks) * BLOCK - start), blocks))
        meta = build_metadata(chunks, BLOCK, torch.device("cpu"))
        assert token_slots(chunks, BLOCK).tolist() == meta.slot_mapping.tolist()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_llama(tmp_path_factory.mktemp("mirror"), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=512, initializer_range=0.1, seed=5)


def _worker(checkpoint) -> TPWorker:
    w = TPWorker(0, 1, "cpu", "float32")
    w.init_communicator(None)
    w.load(checkpoint)
    return w


def _decode(w: TPWorker, steps: list[SeqStep], tokens: list[int]) -> list[int]:
    """One decode step of the prefilled sequences, from the given next tokens; the tokens it samples."""
    return w.execute([SeqStep([t], s.prompt_len, s.block_table, GREEDY, 1, s.request_id, prompt_len=s.prompt_len)
                      for s, t in zip(steps, tokens)]).token_ids


def test_a_rank_restored_from_the_mirror_has_the_cache_and_decodes_the_same(checkpoint, tmp_path, monkeypatch):
    # Small enough that a step's slots are gathered a layer at a time and a restore reads in several chunks.
    monkeypatch.setattr(kv_mirror, "RECORD_BYTES", 1)
    monkeypatch.setattr(kv_mirror, "RESTORE_CHUNK_BYTES", 3 * 4096)
    store = new_store_dir("/dev/shm") or str(tmp_path / "store")  # tmpfs, as in production, where it is there
    try:
        _restore_and_decode(checkpoint, store)
    finally:
        remove_store(store)


def _restore_and_decode(checkpoint, store: str) -> None:
    rank = _worker(checkpoint)
    rank.init_kv_cache(NUM_BLOCKS, BLOCK)
    rank.kv_mirror = KVHostMirror(kv_path(store, 0), tuple(rank.kv_cache.shape), rank.kv_cache.dtype, create=True)
    g = torch.Generator().manual_seed(0)
    # Two steps: three prompts in scattered blocks, the second step a later chunk of one of them.
    steps = [SeqStep(torch.randint(3, 500, (n,), generator=g).tolist(), 0, blocks, GREEDY, 0, f"r{i}", prompt_len=n)
             for i, (n, blocks) in enumerate([(20, [7, 3]), (5, [12]), (33, [30, 0, 21])])]
    first = rank.execute(steps).token_ids
    more = SeqStep(torch.randint(3, 500, (9,), generator=g).tolist(), 20, [7, 3], GREEDY, 0, "r0", prompt_len=29)
    rank.execute([more])
    steps[0] = more
    # Every slot those steps wrote is on the host, and no other was written.
    mirrored = KVHostMirror(kv_path(store, 0), tuple(rank.kv_cache.shape), rank.kv_cache.dtype, create=False)
    allocated = os.stat(kv_path(store, 0)).st_blocks
    assert torch.equal(mirrored.restore("cpu"), rank.kv_cache) and rank.kv_cache.abs().sum() > 0
    # The mirror's whole size was set aside when it was made; a restore takes nothing more.
    assert os.stat(kv_path(store, 0)).st_blocks == allocated >= os.stat(kv_path(store, 0)).st_size // 512

    replacement = _worker(checkpoint)  # (a CPU rank with a store maps the cache file: here, the mirror's)
    replacement.store_dir = store
    replacement.init_kv_cache(NUM_BLOCKS, BLOCK, restore=True)
    next_tokens = [7, first[1], first[2]]
    assert _decode(replacement, steps, next_tokens) == _decode(rank, steps, next_tokens)


def test_a_mirror_the_file_system_has_no_room_for_is_refused_naming_the_sizes(tmp_path):
    with pytest.raises(ValueError) as err:  # 1 TiB: more than this machine's disk and memory
        KVHostMirror(str(tmp_path / "rank0.kv"), (2, 2, 2**33, 4, 4), torch.bfloat16, create=True)
    assert "gpu_host_copies" in str(err.value) and "1024.0 GiB" in str(err.value) and "GiB free" in str(err.value)


def test_a_rank_started_in_a_lost_one_s_place_restores_from_the_store_alone(checkpoint, tmp_path):
    """TPWorker.restore in-process on CPU (the method a GPU rank runs, there copying to its device): with the
    checkpoint's weights moved away, the new rank takes the lost one's shard and KV cache from the store and decodes
    what the lost one would have."""
    import glob

    store = new_store_dir("/dev/shm") or str(tmp_path / "store")
    weights = glob.glob(os.path.join(checkpoint, "*.safetensors"))
    try:
        lost = TPWorker(0, 1, "cpu", "float32")
        lost.init_communicator(None)
        lost.load(checkpoint, store_dir=store)
        lost.init_kv_cache(NUM_BLOCKS, BLOCK)
        g = torch.Generator().manual_seed(2)
        steps = [SeqStep(torch.randint(3, 500, (n,), generator=g).tolist(), 0, blocks, GREEDY, 0, f"s{i}",
                         prompt_len=n) for i, (n, blocks) in enumerate([(17, [4, 9]), (30, [1, 2])])]
        first = lost.execute(steps).token_ids
        for path in weights:
            os.rename(path, path + ".away")
        replacement = TPWorker(0, 1, "cpu", "float32")
        info = replacement.restore(checkpoint, "auto", store, NUM_BLOCKS, BLOCK)
        replacement.init_communicator(None, epoch=1)
        assert info["pid"] == os.getpid()
        assert _decode(replacement, steps, first) == _decode(lost, steps, first)
    finally:
        for path in weights:
            if os.path.exists(path + ".away"):
                os.rename(path + ".away", path)
        remove_store(store)
