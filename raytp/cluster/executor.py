"""What the engine runs its steps on.

`Executor` is the interface; `TPGroup` (cluster.py) is the Ray implementation
with one worker actor per rank, and `LocalExecutor` runs a single rank in this
process (benchmarks isolate Ray's and Serve's costs with it; GPU tests use it
where Ray is not installed).
"""
from __future__ import annotations

import asyncio
import logging
import math
import os
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from typing import Awaitable

from raytp.config import EngineConfig
from raytp.engine.step import SeqStep, StepResult
from raytp.cluster.worker import TPWorker
from raytp.model.loader import checkpoint_dtype

log = logging.getLogger(__name__)


class GroupFailure(RuntimeError):
    """The TP group cannot run steps any more (a worker died, hung or failed). `lost_ranks`: ranks known to be gone
    (a peer saw the process exit, or they did not answer), where known; `detect_s`: how long it took to tell (a hang
    is told by the watchdog's wait and a ping; a death within milliseconds)."""

    def __init__(self, message: str, lost_ranks: tuple[int, ...] = (), detect_s: float = 0.0):
        super().__init__(message)
        self.lost_ranks, self.detect_s = lost_ranks, detect_s


class PlacementError(RuntimeError):
    """The ranks of a group of the asked size could not be placed in time (the engine then tries a smaller size)."""


def choose_num_kv_blocks(config: EngineConfig, max_model_len: int, rank_capacity: int) -> int:
    """KV blocks per rank: the configured number; on CUDA all the capacity (memory that gpu_memory_utilization
    set aside for the cache: blocks beyond the running batch's keep more prefixes cached); on CPU, whose memory
    the host shares, enough for max_num_seqs full-length sequences, within capacity."""
    needed_one = math.ceil(max_model_len / config.resolved_block_size())
    if config.num_kv_blocks is not None:
        blocks = config.num_kv_blocks
    elif config.resolved_device() == "cuda":
        blocks = rank_capacity
    else:
        blocks = min(needed_one * config.max_num_seqs, rank_capacity)
    if blocks < needed_one:
        if config.num_kv_blocks is not None:
            fix = "lower max_model_len or raise num_kv_blocks"
        else:  # sized from memory: what leaves it more
            fix = (f"lower max_model_len, raise gpu_memory_utilization={config.gpu_memory_utilization:g} or "
                   f"tensor_parallel_size, or lower max_num_batched_tokens={config.resolved_max_num_batched_tokens()}")
        raise ValueError(
            f"KV cache of {blocks} blocks x {config.resolved_block_size()} tokens cannot hold one sequence of "
            f"max_model_len={max_model_len} ({needed_one} blocks); {fix}"
        )
    if blocks > rank_capacity:
        raise ValueError(f"num_kv_blocks={blocks} does not fit: a rank has room for {rank_capacity} blocks")
    return blocks


def warm_up_tokens(config: EngineConfig) -> int:
    """Tokens of the warm-up step a new group runs: the step budget, at most 512 (on CPU a 2048-token step
    takes ~0.7 s, which every rebuild would add to the pause of in-flight requests; a larger budget's first
    full step pays its own first-touch cost)."""
    return min(config.resolved_max_num_batched_tokens(), 512)


def profile_seq_lens(config: EngineConfig, max_model_len: int) -> list[int]:
    """The largest step, whose memory peak sizes the KV cache on GPU: max_num_batched_tokens tokens as prefills of
    max_num_seqs sequences (no sequence longer than max_model_len)."""
    num_tokens = min(config.resolved_max_num_batched_tokens(), config.max_num_seqs * max_model_len)
    num_seqs = min(config.max_num_seqs, num_tokens)
    base, extra = divmod(num_tokens, num_seqs)
    return [base + 1] * extra + [base] * (num_seqs - extra)


class Executor(ABC):
    tp_size: int
    num_kv_blocks: int
    dtype: str  # what the ranks compute in (config.resolved_dtype for this checkpoint)
    attention_backend: str = ""  # the attention kernel the ranks run (its label), once started

    @abstractmethod
    def start(self, tp_size: int) -> None:
        """Build the group at this TP degree: workers, communicator, weights, KV cache."""

    @abstractmethod
    def execute(self, seqs: list[SeqStep]) -> StepResult:
        """Run one step on every rank; rank 0's sampled tokens come back. Raises GroupFailure."""

    @abstractmethod
    def submit(self, seqs: list[SeqStep]) -> Awaitable[StepResult]:
        """Start a step now and return its result to await (GroupFailure there). Steps run in the order they are
        submitted, so the engine may submit the next one while this one runs."""

    def can_place(self, tp_size: int) -> bool:
        """Whether a group of tp_size would fit right now (used to grow back after degrading)."""
        return False

    def replace_lost_ranks(self, known_lost: tuple[int, ...] = ()) -> dict[str, float]:
        """Replace dead or hung ranks and keep the others' processes, shards and KV caches (the KV cache as a whole
        survives); the seconds each phase took. GroupFailure where it cannot: the group must be rebuilt."""
        raise GroupFailure(f"{type(self).__name__} cannot replace a rank")

    def rebuild_stage(self, known_lost: tuple[int, ...] = ()) -> dict[str, float]:
        """A pipeline whose lost ranks are all in one stage: start that stage again and keep the other stages'
        processes and weights (every KV cache is stale then: the caller recomputes the running requests); the
        seconds each phase took. GroupFailure where it cannot: the whole group must be rebuilt."""
        raise GroupFailure(f"{type(self).__name__} has no pipeline stages")

    def spares_ready(self, timeout_s: float) -> int:
        """Wait up to timeout_s for the group's spare ranks to be up; how many are (none without spares)."""
        return 0

    @abstractmethod
    def worker_pids(self) -> list[int]:
        """Process id of each rank, in rank order."""

    @abstractmethod
    def check_health(self) -> None:
        """Raise GroupFailure unless every rank answers."""

    @abstractmethod
    def shutdown(self) -> None:
        """Release workers and resources (idempotent)."""


class LocalExecutor(Executor):
    """TP=1 in this process: no Ray, no collectives."""

    def __init__(self, config: EngineConfig, model_path: str, max_model_len: int, num_threads: int | None = None):
        self.config, self.model_path, self.max_model_len = config, model_path, max_model_len
        self.num_threads = num_threads
        self.dtype = config.resolved_dtype(checkpoint_dtype(model_path))
        self.worker: TPWorker | None = None
        self.tp_size, self.num_kv_blocks = 1, 0
        # One thread, so submitted steps run one after another, in order, off the event loop.
        self._runner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raytp-local-rank")

    def start(self, tp_size: int) -> None:
        if tp_size != 1 or self.config.pipeline_parallel_size != 1:
            raise ValueError(f"LocalExecutor runs one rank; tensor_parallel_size={tp_size} and pipeline_parallel_size="
                             f"{self.config.pipeline_parallel_size} need the Ray TPGroup")
        cfg = self.config
        w = TPWorker(0, 1, cfg.resolved_device(), self.dtype, cfg.seed, self.num_threads)
        w.init_communicator(None)
        bs = cfg.resolved_block_size()
        loaded = w.load(self.model_path, cfg.attention_backend, cfg.pack_weights, quantization=cfg.quantization,
                        block_size=bs, expert_parallel=cfg.expert_parallel)
        self.attention_backend = loaded["attention"]
        log.info("attention: %s", loaded["attention_detail"])
        if cfg.cuda_graphs:
            w.configure_cuda_graphs(cfg.max_num_seqs, self.max_model_len)
        capacity = w.max_kv_blocks(bs, cfg.gpu_memory_utilization, profile_seq_lens(cfg, self.max_model_len))
        self.num_kv_blocks = choose_num_kv_blocks(cfg, self.max_model_len, capacity)
        w.init_kv_cache(self.num_kv_blocks, bs)
        w.warm_up(warm_up_tokens(cfg), kernels_up_to_seqs=cfg.max_num_seqs)
        self.worker = w

    def execute(self, seqs):
        return self.worker.execute(seqs)

    def submit(self, seqs):
        return asyncio.get_running_loop().run_in_executor(self._runner, self.execute, seqs)

    def worker_pids(self) -> list[int]:
        return [os.getpid()]

    def check_health(self):
        if self.worker is None:
            raise GroupFailure("local worker is not running")

    def shutdown(self):
        if self.worker is not None:
            self.worker.shutdown()  # closes its communicator
        self.worker = None
