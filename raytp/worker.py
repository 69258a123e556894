"""TPWorker: one tensor-parallel rank.

It owns the rank's communicator, model shard and KV cache, and runs one step
when told to: build the attention metadata, run the shard (its all-reduces
meet the other ranks'), and sample the next tokens. Every rank samples (the
logits are all-gathered, so every rank gets the same tokens) and remembers
them, because the engine may already have sent the next step with
PREVIOUS_TOKEN in place of tokens it has not seen yet. The class is
plain Python: cluster.py runs it as a Ray actor (processes named
`ray::TPWorker`); benchmarks and GPU tests run it in-process at TP=1.
"""
from __future__ import annotations

import logging
import os
import socket
import time
import torch

from raytp.comm import (
    Communicator,
    GlooCommunicator,
    GlooRendezvous,
    NcclCommunicator,
    ShmCommunicator,
    ShmRendezvous,
    SingleRank,
    create_shm_rendezvous,
    free_port,
)
from raytp.cpu_binding import bind_rank
from raytp.model.attention import SeqChunk, build_metadata, select_backend
from raytp.model.loader import DTYPES, load_model
from raytp.sampling import RowContext, SamplingParams, gather_logprobs, sample
from raytp.step import PREVIOUS_TOKEN, SeqStep, StepLogprobs, StepResult

log = logging.getLogger(__name__)

# Default KV-cache budget per rank on CPU, where free memory is not a good guide.
_CPU_KV_BUDGET_BYTES = 2 * 2**30


class TimedCommunicator(Communicator):
    """Wraps a communicator and adds up the time spent in collectives (for raytp_allreduce_seconds)."""

    def __init__(self, inner: Communicator):
        self.inner, self.rank, self.world_size = inner, inner.rank, inner.world_size
        self.seconds = 0.0

    def _timed(self, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        self.seconds += time.perf_counter() - t0
        return out

    def all_reduce(self, tensor):
        return self._timed(self.inner.all_reduce, tensor)

    def all_gather(self, tensor, dim=-1):
        return self._timed(self.inner.all_gather, tensor, dim)

    def broadcast(self, tensor, src=0):
        return self._timed(self.inner.broadcast, tensor, src)

    def barrier(self):
        self.inner.barrier()

    def close(self):
        self.inner.close()


class TPWorker:
    def __init__(self, rank: int, world_size: int, device: str, dtype: str, seed: int = 0, num_threads: int | None = None,
                 bind_cores: bool = False):
        self.rank, self.world_size, self.device, self.dtype = rank, world_size, device, dtype
        if device == "cuda":
            # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU: it is device 0 here.
            torch.cuda.set_device(0)
        elif num_threads:
            if bind_cores:  # before torch starts its thread pool, which inherits the binding
                bind_rank(num_threads)
            torch.set_num_threads(num_threads)
        self.comm: TimedCommunicator | None = None
        self.model = None
        self.kv_cache: torch.Tensor | None = None
        self.block_size = 16
        self.generator = torch.Generator().manual_seed(seed)  # the same seed on every rank: the same samples
        self.last_sampled: dict[str, int] = {}  # request id -> token sampled in the previous step
        self.histories: dict[str, list[int]] = {}  # penalized requests of the previous step -> their tokens so far

    # ---- placement and communicator set-up ----------------------------------

    def node_info(self) -> dict:
        info = {"rank": self.rank, "hostname": socket.gethostname(), "pid": os.getpid(), "device": self.device}
        try:
            import ray

            info["node_ip"] = ray.util.get_node_ip_address()
            info["gpu_ids"] = [str(g) for g in ray.get_gpu_ids()]
        except Exception:  # in-process use, without Ray
            info["node_ip"], info["gpu_ids"] = "127.0.0.1", []
        return info

    def make_rendezvous(self, cpu_collectives: str = "shm"):
        """Rank 0 only: what the other ranks need to join (NCCL unique id, shared-memory segment or gloo address)."""
        if self.world_size == 1:
            return None  # no collectives at all
        if self.device == "cuda":
            from raytp.comm import nccl_unique_id

            return nccl_unique_id()
        host = self.node_info()["node_ip"]
        if cpu_collectives == "shm":
            # A STRICT_PACK group is on one node: its CPU ranks share memory.
            return create_shm_rendezvous(host, self.world_size)
        return GlooRendezvous(host, free_port(host))

    def init_communicator(self, rendezvous, timeout_s: float = 60.0) -> str:
        if self.world_size == 1:
            inner = SingleRank()
        elif self.device == "cuda":
            inner = NcclCommunicator(rendezvous, self.rank, self.world_size)
        elif isinstance(rendezvous, ShmRendezvous):
            inner = ShmCommunicator(rendezvous, self.rank, self.world_size, timeout_s)
        else:
            inner = GlooCommunicator(rendezvous, self.rank, self.world_size, timeout_s)
        self.comm = TimedCommunicator(inner)
        return type(inner).__name__

    # ---- weights and KV cache -------------------------------------------------

    def load(self, model_path: str, attention_backend: str = "auto", pack_weights: bool = True) -> dict:
        device = "cuda" if self.device == "cuda" else "cpu"
        attention = select_backend(device, attention_backend, DTYPES[self.dtype])
        self.model = load_model(model_path, self.comm, self.dtype, device, progress=self.rank == 0,
                                attention=attention, pack_weights=pack_weights)
        from raytp.model.loader import weight_bytes

        return {"rank": self.rank, "weight_bytes": weight_bytes(self.model), "attention": attention.name}

    def kv_block_bytes(self, block_size: int) -> int:
        shape = self.model.kv_cache_shape(block_size)
        return int(torch.Size(shape).numel()) * torch.empty((), dtype=self.model.dtype).element_size()

    def max_kv_blocks(self, block_size: int, gpu_memory_utilization: float) -> int:
        """How many blocks this rank can hold."""
        if self.device == "cuda":
            free, total = torch.cuda.mem_get_info()
            budget = free - (1 - gpu_memory_utilization) * total
        else:
            budget = _CPU_KV_BUDGET_BYTES
        return max(0, int(budget // self.kv_block_bytes(block_size)))

    def init_kv_cache(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.kv_cache = None  # free the old cache first
        device = "cuda" if self.device == "cuda" else "cpu"
        self.kv_cache = torch.zeros(self.model.kv_cache_shape(num_blocks * block_size), dtype=self.model.dtype, device=device)

    def warm_up(self, num_tokens: int) -> float:
        """Run one throw-away step of `num_tokens` tokens (short sequences), like a big prefill step.

        The first step at a new size pays for memory first touched and GEMM
        kernels built for its shapes (on CPU a first 512-token step took twice
        as long as the next one); paying it here keeps it out of the first
        requests' latency. Every rank runs it together (its collectives meet).
        The K/V it writes land in blocks that are free: a block is always
        written before it is read. Returns the seconds it took.
        """
        t0 = time.perf_counter()
        num_blocks = self.kv_cache.shape[2] // self.block_size
        per_seq = min(2, num_blocks)  # blocks per sequence: short ones, so attention stays cheap
        seq_len = per_seq * self.block_size
        num_seqs = max(1, min(num_tokens // seq_len, num_blocks // per_seq))
        greedy = SamplingParams(max_tokens=1, temperature=0.0)
        steps = [SeqStep([0] * seq_len, 0, list(range(i * per_seq, (i + 1) * per_seq)), greedy, 0, f"warm-up-{i}")
                 for i in range(num_seqs)]
        self.execute(steps)
        self.last_sampled, self.histories = {}, {}
        return time.perf_counter() - t0

    # ---- the step ---------------------------------------------------------------

    def ping(self) -> int:
        return self.rank

    def execute(self, seqs: list[SeqStep]) -> StepResult:
        t0 = time.perf_counter()
        self.comm.seconds = 0.0
        device = self.kv_cache.device
        chunks = [SeqChunk(s.start, len(s.token_ids), s.block_table) for s in seqs]
        meta = build_metadata(chunks, self.block_size, device, self.model.args.sliding_window)
        ids = [[self.last_sampled[s.request_id] if t == PREVIOUS_TOKEN else t for t in s.token_ids] for s in seqs]
        input_ids = torch.tensor([t for row in ids for t in row], dtype=torch.long, device=device)  # (T,)
        hidden = self.model(input_ids, meta, self.kv_cache)  # (T, hidden)
        logits = self.model.compute_logits(hidden[meta.last_token_index])  # (B, vocab), all-gather inside
        contexts = self._contexts(seqs, ids)
        tokens = sample(logits, [s.params for s in seqs], [s.num_generated for s in seqs], self.generator, contexts)
        self.last_sampled = {s.request_id: t for s, t in zip(seqs, tokens)}
        logprobs = self._logprobs(seqs, ids, tokens, logits, hidden, meta.last_token_index)
        return StepResult(tokens, self.comm.seconds, time.perf_counter() - t0, logprobs)

    def _contexts(self, seqs: list[SeqStep], ids: list[list[int]]) -> list[RowContext] | None:
        """Each row's tokens so far (penalized rows; kept for the next step) and banned ids; None if no row
        needs either."""
        histories = {}
        for s, row in zip(seqs, ids):
            if s.params.penalized:
                if s.history is not None:
                    history = list(s.history)
                elif s.start == 0:
                    history = []
                elif s.request_id in self.histories:  # it was in this rank's previous step
                    history = self.histories[s.request_id]
                else:
                    raise RuntimeError(f"step protocol: {s.request_id} continues at {s.start} without its history "
                                       "and was not in the previous step")
                del history[s.start :]
                history.extend(row)
                histories[s.request_id] = history
        self.histories = histories
        if not histories and not any(s.banned_ids for s in seqs):
            return None
        return [RowContext(histories[s.request_id][: s.prompt_len], histories[s.request_id][s.prompt_len :], s.banned_ids)
                if s.request_id in histories else RowContext(banned_ids=s.banned_ids) for s in seqs]

    def _logprobs(self, seqs: list[SeqStep], ids: list[list[int]], tokens: list[int], logits: torch.Tensor,
                  hidden: torch.Tensor, last_index: torch.Tensor) -> StepLogprobs | None:
        """Logprobs of sampled tokens and of prompt tokens, where asked; only rank 0 sends them back."""
        sampled_rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        prompt_rows = [i for i, s in enumerate(seqs) if s.prompt_logprobs]
        if not sampled_rows and not prompt_rows:
            return None
        out = StepLogprobs({}, {})
        # Prompt logprobs: the logits at each position of the chunk predict the next prompt token. Every rank
        # computes these logits (the vocab all-gather is a collective), for the same rows.
        targets, spans = [], []  # spans: (seq index, first row, number of rows)
        for i in prompt_rows:
            s = seqs[i]
            row_targets = (ids[i] + ([s.lookahead] if s.lookahead is not None else []))[1:]
            row_targets = row_targets[: max(0, s.prompt_len - 1 - s.start)]
            if row_targets:
                first = int(last_index[i]) - len(ids[i]) + 1
                spans.append((i, first, len(row_targets)))
                targets.extend(row_targets)
        prompt_logits = None
        if spans:
            rows = torch.cat([torch.arange(f, f + n) for _, f, n in spans]).to(hidden.device)  # (P,)
            prompt_logits = self.model.compute_logits(hidden[rows])  # (P, vocab)
        if self.rank != 0:
            return None
        if sampled_rows:  # one batched log-softmax; each row keeps its own top N
            index = torch.tensor(sampled_rows, device=logits.device)
            rows = gather_logprobs(logits.index_select(0, index), [tokens[i] for i in sampled_rows],
                                   max(seqs[i].params.logprobs for i in sampled_rows))
            for i, lp in zip(sampled_rows, rows):
                lp.top = lp.top[: seqs[i].params.logprobs]
                out.sampled[i] = lp
        offset = 0
        for i, _, n in spans:
            out.prompt[i] = gather_logprobs(prompt_logits[offset : offset + n], targets[offset : offset + n],
                                            seqs[i].params.prompt_logprobs)
            offset += n
        return out

    def shutdown(self) -> None:
        if self.comm is not None:
            self.comm.close()
