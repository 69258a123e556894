"""CUDA: decode steps replayed from CUDA graphs (raytp/model/cuda_graphs.py) compute what eager steps compute
(skipped without CUDA).

- a padded graph step's hidden states equal the eager step's, at several batch sizes and key spans, the spans
  captured when first needed; the padding rows write only to the scratch block;
- the rank replays graphs for decode steps once configured, and its greedy tokens equal those of a rank without;
- an NCCL all-reduce (world size 1) captured in a graph runs on replay, as the TP>1 graphs' collectives must.
"""
import pytest
import torch

from raytp.cluster.worker import TPWorker
from raytp.engine.step import PREVIOUS_TOKEN, SeqStep
from raytp.model.attention import SeqChunk, build_metadata
from raytp.sampling import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

GREEDY = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(small_llama):
    return small_llama


def make_worker(checkpoint, block_size: int, graphs: bool, num_blocks: int = 64) -> TPWorker:
    w = TPWorker(0, 1, "cuda", "bfloat16")
    w.init_communicator(None)
    w.load(checkpoint, block_size=block_size)
    if graphs:
        assert w.configure_cuda_graphs(8, 2048) == [1, 2, 4, 8]
    w.init_kv_cache(num_blocks, block_size)
    return w


def prefill(w: TPWorker, lens: list[int], block_size: int) -> list[SeqChunk]:
    """Prefill sequences of these lengths (eagerly) in consecutive blocks; the chunks of their next decode step."""
    g = torch.Generator().manual_seed(sum(lens))
    steps, first = [], 0
    for i, n in enumerate(lens):
        blocks = list(range(first, first + -(-(n + 1) // block_size)))
        first += len(blocks)
        steps.append(SeqStep(torch.randint(3, 1000, (n,), generator=g).tolist(), 0, blocks, GREEDY, 0, f"p{i}",
                             prompt_len=n))
    w.execute(steps)
    return [SeqChunk(n, 1, s.block_table) for n, s in zip(lens, steps)]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("block_size", [16, 256])
def test_a_graph_step_equals_the_eager_step(checkpoint, block_size):
    w = make_worker(checkpoint, block_size, graphs=True, num_blocks=160 if block_size == 16 else 12)
    graphs = w._decode_graphs()
    scratch_block = w.kv_cache.shape[2] // block_size - 1
    for lens in ([7], [3, 200, 40], [300, 5, 600, 17, 90], [1000, 2]):
        chunks = prefill(w, lens, block_size)
        ids = [5 + i for i in range(len(lens))]
        shape = graphs.shape_for(chunks)
        assert shape is not None and shape[0] >= len(lens)
        with torch.cuda.stream(w.stream):
            meta = build_metadata(chunks, block_size, torch.device("cuda"))
            eager = w.model(torch.tensor(ids, device="cuda"), meta, w.kv_cache).float()  # (B, hidden)
            before = w.kv_cache.clone()
            replayed = graphs.run(ids, chunks, shape).float()
        w.stream.synchronize()
        err = ((replayed - eager).norm() / eager.norm()).item()
        assert err < 1e-2, (lens, shape, err)
        # The replay wrote the real rows' slots (as the eager step did) and, for padding rows, the scratch block:
        # nothing else.
        untouched = torch.ones(w.kv_cache.shape[2], dtype=torch.bool, device="cuda")
        untouched[meta.slot_mapping] = False
        untouched[scratch_block * block_size :] = False
        assert torch.equal(w.kv_cache[:, :, untouched], before[:, :, untouched])
    assert {span for _, span in graphs.graphs} >= {256, 1024}  # longer spans captured when first needed
    assert graphs.replays == 4
    w.shutdown()


@pytest.mark.timeout(300)
def test_a_rank_with_graphs_generates_the_tokens_of_a_rank_without(checkpoint):
    tokens = {}
    for graphs in (False, True):
        w = make_worker(checkpoint, 16, graphs)
        w.warm_up(64)
        g = torch.Generator().manual_seed(4)
        prompts = [torch.randint(3, 1000, (n,), generator=g).tolist() for n in (5, 30, 61)]
        tables = [list(range(8 * i, 8 * i + 8)) for i in range(3)]
        out = [w.execute([SeqStep(p, 0, t, GREEDY, 0, f"r{i}", prompt_len=len(p))
                          for i, (p, t) in enumerate(zip(prompts, tables))]).token_ids]
        for step in range(1, 40):
            seqs = [SeqStep([PREVIOUS_TOKEN], len(p) + step - 1, t, GREEDY, step, f"r{i}", prompt_len=len(p))
                    for i, (p, t) in enumerate(zip(prompts, tables)) if step < 40 - 10 * i]  # rows finish apart
            out.append(w.execute(seqs).token_ids)
        tokens[graphs] = out
        if graphs:
            assert w.graphs.replays == 39 and (4, 256) in w.graphs.graphs and (2, 256) in w.graphs.graphs
        w.shutdown()
    agree = sum(a == b for x, y in zip(tokens[False], tokens[True]) for a, b in zip(x, y))
    total = sum(len(x) for x in tokens[False])
    assert agree == total, f"{agree}/{total} greedy tokens agree"


@pytest.mark.timeout(120)
def test_an_nccl_all_reduce_captured_in_a_graph_runs_on_replay():
    from raytp.cluster.comm import NcclCommunicator, nccl_unique_id
    from raytp.cluster.worker import TimedCommunicator

    comm = TimedCommunicator(NcclCommunicator(nccl_unique_id(), 0, 1), cuda_events=True)
    x = torch.zeros(1024, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        y = comm.all_reduce(x * 2)  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    comm.reset()
    with torch.cuda.graph(graph):
        y = comm.all_reduce(x * 2)
    x.copy_(torch.arange(1024.0, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, torch.arange(1024.0, device="cuda") * 2)
    assert comm.take_seconds() == 0.0  # captured collectives are not timed
    comm.close()
