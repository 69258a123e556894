"""KV-cache sizing: the arithmetic with a GPU's numbers injected, the profile step's shape, and the start-up error."""
import asyncio

import pytest

from raytp.config import EngineConfig
from raytp.engine.engine import AsyncEngine
from raytp.cluster.executor import GroupFailure, LocalExecutor, choose_num_kv_blocks, profile_seq_lens
from raytp.cluster.memory import GIB, MemoryProfile
from raytp.cluster.supervisor import TRANSIENT
from raytp.cluster import worker as worker_module
from raytp.cluster.worker import MEMORY_HUNGRY, TPWorker, throwaway_steps
from tests.helpers import write_llama

pytestmark = pytest.mark.timeout(60)

# An 80 GiB GPU after the profile step of an 8B model in bf16: 15 GiB of weights, a 3 GiB activation peak,
# 0.5 GiB held in torch's cache, and 1.5 GiB that torch does not allocate (CUDA context, NCCL buffers).
H100 = MemoryProfile(total=80 * GIB, used=17 * GIB, reserved=int(15.5 * GIB), peak_reserved=18 * GIB)


def test_peak_is_torch_s_peak_plus_what_torch_does_not_allocate():
    assert H100.peak == int(19.5 * GIB)


def test_kv_cache_gets_utilization_times_total_minus_peak():
    assert H100.kv_cache_bytes(0.9) == int(72 * GIB - 19.5 * GIB)
    assert H100.kv_cache_bytes(0.5) == int(40 * GIB - 19.5 * GIB)
    # (Sized from free memory after loading, the old way, 0.9 gave 63 - 8 = 55 GiB: with the largest step's
    # activations on top, the GPU went past 0.9 x 80 GiB.)


def test_no_room_is_zero_not_negative():
    assert H100.kv_cache_bytes(0.2) == 0


def test_description_names_the_numbers():
    text = H100.describe(0.9)
    assert "gpu_memory_utilization=0.9 x 80.0 GiB" in text and "peak 19.50 GiB" in text and "52.50 GiB" in text


def test_a_cache_too_small_for_one_sequence_is_a_clear_permanent_error():
    config = EngineConfig(model="m", device="cuda", gpu_memory_utilization=0.25, max_num_batched_tokens=8192,
                          block_size=16)
    capacity = H100.kv_cache_bytes(0.25) // (128 * 2**10 * 16)  # 128 KiB per token (Llama-3-8B, bf16), 16 per block
    assert capacity == 256  # 0.5 GiB: 4096 tokens
    with pytest.raises(ValueError) as err:
        choose_num_kv_blocks(config, 8192, capacity)
    msg = str(err.value)
    assert "cannot hold one sequence of max_model_len=8192 (512 blocks)" in msg
    assert "gpu_memory_utilization=0.25" in msg and "max_num_batched_tokens=8192" in msg
    assert not isinstance(err.value, TRANSIENT)  # the supervisor fails at once instead of rebuilding forever


def test_cuda_gives_the_cache_all_its_memory_and_cpu_what_the_batch_needs():
    # 52.5 GiB at 128 KiB per token and 16 per block: room for 26880 blocks, far more than 4 x 8192-token sequences.
    capacity = H100.kv_cache_bytes(0.9) // (128 * 2**10 * 16)
    assert choose_num_kv_blocks(EngineConfig(model="m", device="cuda", max_num_seqs=4, block_size=16), 8192, capacity) == capacity
    assert choose_num_kv_blocks(EngineConfig(model="m", device="cpu", max_num_seqs=4), 8192, capacity) == 4 * 512


def test_profile_step_is_the_token_budget_over_max_num_seqs():
    cfg = EngineConfig(model="m", device="cuda", max_num_seqs=256)
    assert profile_seq_lens(cfg, 8192) == [16] * 256  # 4096 tokens, the CUDA default budget
    cfg = EngineConfig(model="m", device="cpu", max_num_seqs=3, max_num_batched_tokens=100)
    assert profile_seq_lens(cfg, 8192) == [34, 33, 33]
    cfg = EngineConfig(model="m", device="cpu", max_num_seqs=2, max_num_batched_tokens=4096)
    assert profile_seq_lens(cfg, 100) == [100, 100]  # no sequence is longer than max_model_len
    cfg = EngineConfig(model="m", device="cpu", max_num_seqs=64, max_num_batched_tokens=16)
    assert profile_seq_lens(cfg, 100) == [1] * 16


def test_throwaway_steps_take_consecutive_blocks():
    steps = throwaway_steps([5, 16, 1], block_size=4)
    assert [s.block_table for s in steps] == [[0, 1], [2, 3, 4, 5], [6]]
    assert [len(s.token_ids) for s in steps] == [5, 16, 1] and all(s.start == 0 for s in steps)


def test_the_sizing_step_asks_for_what_costs_memory_and_prompt_logits_come_a_few_rows_at_a_time(tmp_path, monkeypatch):
    """The profile step's rows sort the vocabulary (top-p/top-k) and ask for sampled and prompt logprobs; prompt
    logits are computed PROMPT_LOGITS_ROWS rows at a time, with the same logprobs as all at once."""
    assert MEMORY_HUNGRY.top_p < 1 and MEMORY_HUNGRY.top_k > 1 and MEMORY_HUNGRY.temperature > 0
    assert MEMORY_HUNGRY.logprobs and MEMORY_HUNGRY.prompt_logprobs and MEMORY_HUNGRY.seed is not None
    steps = throwaway_steps([40, 3], 16, MEMORY_HUNGRY)
    assert all(s.prompt_logprobs and s.prompt_len == len(s.token_ids) for s in steps)
    worker = TPWorker(0, 1, "cpu", "float32")
    worker.init_communicator(None)
    worker.load(write_llama(tmp_path, vocab_size=512))
    worker.init_kv_cache(8, 16)
    whole = worker.execute(steps).logprobs
    monkeypatch.setattr(worker_module, "PROMPT_LOGITS_ROWS", 7)
    parts = worker.execute(steps).logprobs
    assert [len(whole.prompt[i]) for i in (0, 1)] == [39, 2]
    assert parts.prompt == whole.prompt and parts.sampled.keys() == whole.sampled.keys() == {0, 1}
    assert all(len(lp.top) == 20 for lp in whole.prompt[0])


def test_engine_start_fails_with_the_message(tmp_path):
    path = write_llama(tmp_path)
    config = EngineConfig(model=path, device="cpu", max_model_len=64, block_size=16, num_kv_blocks=3)

    async def start():
        engine = AsyncEngine(config, lambda c, p, n: LocalExecutor(c, p, n, num_threads=1))
        await engine.start()

    with pytest.raises(ValueError, match=r"KV cache of 3 blocks x 16 tokens cannot hold one sequence of max_model_len=64"):
        asyncio.run(start())
    assert not issubclass(ValueError, GroupFailure)
