"""CUDA: what only a GPU shows of issue 14 (skipped without CUDA).

- a rank's GPU: torch's UUID of it is the name NVML knows it by (the NVLink check looks GPUs up by it);
- steps, and the collectives in them, run on the worker's own stream, not the legacy default stream;
- collective time is GPU time (CUDA events), not the time it takes to enqueue the work;
- NCCL: the warm-up collective at init, abort on close;
- the KV cache is sized so that the largest step stays within gpu_memory_utilization.
"""
import time

import pytest
import torch

from raytp.cluster.comm import Communicator
from raytp.config import EngineConfig
from raytp.cluster.executor import LocalExecutor, profile_seq_lens
from raytp.sampling import SamplingParams
from raytp.engine.step import SeqStep
from raytp.cluster.worker import MEMORY_HUNGRY, TimedCommunicator, TPWorker, throwaway_steps
from tests.helpers import write_llama

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class StreamRecorder(Communicator):
    """TP=1 collectives (the identity) that note the stream each was called on."""

    rank, world_size = 0, 1

    def __init__(self):
        self.streams = []

    def all_reduce(self, tensor):
        self.streams.append(torch.cuda.current_stream().cuda_stream)
        return tensor

    def all_gather(self, tensor, dim=-1):
        return self.all_reduce(tensor)

    def broadcast(self, tensor, src=0):
        return tensor

    def barrier(self):
        pass


class GpuSleep(Communicator):
    """A collective that keeps the GPU busy for a while and returns at once, as NCCL's do."""

    rank, world_size = 0, 1

    def all_reduce(self, tensor):
        torch.cuda._sleep(100_000_000)  # ~50 ms of GPU cycles
        return tensor

    all_gather = broadcast = all_reduce

    def barrier(self):
        pass


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_llama(tmp_path_factory.mktemp("readiness"), seed=3)


@pytest.fixture
def worker(checkpoint):
    w = TPWorker(0, 1, "cuda", "bfloat16")
    w.init_communicator(None)
    w.load(checkpoint)
    w.init_kv_cache(16, 4)
    yield w
    w.shutdown()


@pytest.mark.timeout(120)
def test_rank_gpu_uuid_is_nvml_s(worker):
    info = worker.node_info()
    assert worker.cuda_index == torch.cuda.current_device() == 0
    assert info["gpu_uuid"].startswith("GPU-")
    pynvml = pytest.importorskip("pynvml")
    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByUUID(info["gpu_uuid"])  # raises NVMLError_NotFound if the names differ
        assert pynvml.nvmlDeviceGetUUID(handle) == info["gpu_uuid"]
    finally:
        pynvml.nvmlShutdown()
    assert worker.check_nvlink([info["gpu_uuid"]], refuse=True) is None  # one GPU: no pair to miss


@pytest.mark.timeout(120)
def test_step_and_its_collectives_run_on_the_worker_s_stream(worker):
    recorder = StreamRecorder()
    worker.comm.inner = recorder
    greedy = SamplingParams(max_tokens=1, temperature=0.0)
    worker.execute([SeqStep(list(range(1, 9)), 0, [0, 1], greedy, 0, "a")])
    assert recorder.streams and set(recorder.streams) == {worker.stream.cuda_stream}
    assert worker.stream.cuda_stream != torch.cuda.default_stream().cuda_stream


@pytest.mark.timeout(60)
def test_collective_time_is_gpu_time_not_enqueue_time():
    timed = TimedCommunicator(GpuSleep(), cuda_events=True)
    x = torch.zeros(4, device="cuda")
    stream = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        t0 = time.perf_counter()
        timed.all_reduce(x)
        enqueued = time.perf_counter() - t0
        stream.synchronize()
        wall = time.perf_counter() - t0
    seconds = timed.take_seconds()
    print(f"enqueue {enqueued * 1e3:.3f} ms, GPU {seconds * 1e3:.1f} ms, wall {wall * 1e3:.1f} ms")
    assert 0.5 * wall < seconds <= wall
    assert timed.take_seconds() == 0.0  # taken once


@pytest.mark.timeout(60)
def test_collective_events_are_reused_from_step_to_step():
    timed = TimedCommunicator(GpuSleep(), cuda_events=True)
    x = torch.zeros(4, device="cuda")
    seen = set()
    for _ in range(3):  # steps of two collectives each
        timed.all_reduce(x)
        timed.all_reduce(x)
        seen |= {id(e) for pair in timed._events for e in pair}
        torch.cuda.synchronize()
        assert timed.take_seconds() > 0
    assert len(seen) == 4  # the first step's two pairs, recorded again by the later steps


@pytest.mark.timeout(120)
def test_nccl_world_of_one_is_warm_timed_and_aborted():
    pytest.importorskip("cupy")
    from raytp.cluster.comm import NcclCommunicator, nccl_unique_id

    comm = NcclCommunicator(nccl_unique_id(), 0, 1)  # its warm-up collective ran here
    timed = TimedCommunicator(comm, cuda_events=True)
    x = torch.ones(16 * 2**20, device="cuda")  # 64 MiB
    assert torch.equal(timed.all_reduce(x), torch.ones_like(x))
    torch.cuda.synchronize()
    assert timed.take_seconds() > 0
    timed.close()  # ncclCommAbort
    assert comm._comm is None
    timed.close()  # again: nothing left to release


@pytest.mark.timeout(300)
def test_largest_step_stays_within_gpu_memory_utilization(tmp_path):
    # Wide enough that the largest step's activations (16k tokens x 8192 intermediate) are GiBs, not noise; and
    # 1024 sequences of 8192 tokens (8 KiB of KV per token) want more than the budget, so the cache takes all that is left.
    path = write_llama(tmp_path, hidden_size=1024, intermediate_size=8192, num_attention_heads=8, num_key_value_heads=8,
                       vocab_size=32000, max_position_embeddings=8192, seed=5)
    torch.cuda.empty_cache()
    cfg = EngineConfig(model=path, device="cuda", dtype="bfloat16", gpu_memory_utilization=0.3, max_num_seqs=1024,
                       max_num_batched_tokens=16384, block_size=16)
    ex = LocalExecutor(cfg, path, 8192)
    ex.start(1)
    try:
        w = ex.worker
        total = torch.cuda.mem_get_info()[1]
        cache_bytes = w.kv_cache.numel() * w.kv_cache.element_size()
        assert ex.num_kv_blocks < 1024 * 8192 // 16  # capped by memory, not by max_num_seqs full sequences
        assert cache_bytes > 0.15 * total  # not starved either
        torch.cuda.reset_peak_memory_stats()
        # The largest step, as costly as sizing assumed, in the real cache.
        w.execute(throwaway_steps(profile_seq_lens(cfg, 8192), cfg.block_size, MEMORY_HUNGRY))
        free, _ = torch.cuda.mem_get_info()
        non_torch = (total - free) - torch.cuda.memory_reserved()
        peak = torch.cuda.max_memory_reserved() + non_torch
        print(f"KV cache {cache_bytes / 2**30:.2f} GiB; largest step's peak {peak / 2**30:.2f} GiB of "
              f"0.3 x {total / 2**30:.1f} = {0.3 * total / 2**30:.2f} GiB")
        graphs = w.graphs.graphs if w.graphs is not None else {}
        assert peak <= 0.3 * total + 256 * 2**20, (
            f"peak {peak / 2**30:.2f} GiB: torch max reserved {torch.cuda.max_memory_reserved() / 2**30:.2f}, reserved "
            f"{torch.cuda.memory_reserved() / 2**30:.2f}, outside torch {non_torch / 2**30:.2f} GiB; profile: "
            f"{w.memory_profile.describe(0.3)}; {len(graphs)} graphs {sorted(graphs)}")
    finally:
        ex.shutdown()
