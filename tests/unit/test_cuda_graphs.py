"""The host side of decode graphs (raytp/model/cuda_graphs.py), without a GPU: which steps replay a graph, at what
padded shape, and the inputs a replay reads (they must say what build_metadata says for the real rows, and send the
padding rows' K/V to the scratch slot). tests/gpu/test_gpu_graphs.py captures and replays them."""
from __future__ import annotations

import numpy as np
import torch

from raytp.cluster.comm import SingleRank
from raytp.cluster.memory import MemoryProfile
from raytp.model.attention import SeqChunk, build_metadata
from raytp.model.cuda_graphs import DecodeGraphs, graph_batch_sizes, key_span
from raytp.model.loader import load_model
from tests.helpers import write_llama

CPU = torch.device("cpu")


def test_padded_batch_sizes_are_bounded_and_cover_max_num_seqs():
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(5) == [1, 2, 4, 8]
    assert graph_batch_sizes(32) == [1, 2, 4, 8, 16, 24, 32]
    assert graph_batch_sizes(1000)[-1] == 256 and len(graph_batch_sizes(1000)) == 13


def test_key_spans_double_from_256_tokens_up_to_max_model_len_in_whole_blocks():
    assert key_span(1, 16, 4096) == 256
    assert key_span(256, 16, 4096) == 256
    assert key_span(257, 16, 4096) == 512
    assert key_span(3000, 16, 4096) == 4096
    assert key_span(100, 16, 200) == 208  # max_model_len 200 in 16-token blocks
    assert key_span(1, 256, 300) == 256 and key_span(290, 256, 300) == 512


def test_replay_inputs_match_the_eager_metadata_and_pad_into_the_scratch_slot(tmp_path):
    model = load_model(write_llama(tmp_path), SingleRank(), progress=False)
    bs, scratch = 16, 39 * 16
    cache = torch.zeros(model.kv_cache_shape(40 * bs))
    graphs = DecodeGraphs(model, cache, bs, max_num_seqs=6, max_model_len=200, scratch_slot=scratch)
    assert graphs.batch_sizes == [1, 2, 4, 8]
    chunks = [SeqChunk(5, 1, [3]), SeqChunk(40, 1, [7, 2, 9]), SeqChunk(0, 1, [11])]
    shape = graphs.shape_for(chunks)
    assert shape == (4, 208)
    graphs.load_inputs([10, 20, 30], chunks, shape[0])
    meta, eager = graphs.metadata(*shape), build_metadata(chunks, bs, CPU)
    assert meta.key_span == meta.max_seq_len == 208 and meta.max_query_len == 1
    assert graphs.d_ids[:4].tolist() == [10, 20, 30, 0]
    # The real rows: what the eager step would read.
    for name in ("positions", "slot_mapping", "seq_lens"):
        assert getattr(meta, name)[:3].tolist() == getattr(eager, name).tolist(), name
    assert torch.equal(meta.block_tables[:3, :3], eager.block_tables)
    assert not meta.block_tables[:, 3:].any()
    # The padding row: one key at position 0, written to the scratch slot.
    assert (meta.positions[3].item(), meta.slot_mapping[3].item(), meta.seq_lens[3].item()) == (0, scratch, 1)
    assert meta.cu_seq_lens.tolist() == np.cumsum([0, 6, 41, 1, 1]).tolist()
    assert meta.query_start.tolist() == [0, 1, 2, 3, 4]


def test_steps_that_do_not_fit_a_graph_run_eagerly(tmp_path):
    model = load_model(write_llama(tmp_path), SingleRank(), progress=False)
    cache = torch.zeros(model.kv_cache_shape(40 * 16))
    graphs = DecodeGraphs(model, cache, 16, max_num_seqs=6, max_model_len=2000, scratch_slot=0)
    decode = [SeqChunk(5, 1, [3])]
    assert graphs.shape_for(decode) == (1, 256)
    assert graphs.shape_for([SeqChunk(600, 1, [0] * 38)]) == (1, 1024)
    assert graphs.shape_for(decode + [SeqChunk(0, 7, [4])]) is None  # a prompt chunk
    assert graphs.shape_for(decode * 9) is None  # more sequences than the largest graph
    gathered = DecodeGraphs(model, cache, 16, max_num_seqs=6, max_model_len=2000, scratch_slot=0,
                            gathered_keys_limit=2048)
    assert gathered.shape_for(decode * 8) == (8, 256)
    assert gathered.shape_for([SeqChunk(600, 1, [0] * 38)] * 3) is None  # 4 x 1024 keys to copy per layer
    assert gathered.largest_shape() == (8, 256)  # the most keys under the limit
    assert DecodeGraphs(model, cache, 16, 6, 2000, 0, gathered_keys_limit=None).largest_shape() == (8, 2000)


def test_the_graphs_memory_counts_against_the_kv_cache():
    profile = MemoryProfile(total=100, used=40, reserved=30, peak_reserved=35, graph_pool=5)
    assert profile.peak == 35 + 5 + 10
    assert profile.kv_cache_bytes(0.9) == 90 - 50
    assert "CUDA graphs" in profile.describe(0.9)
