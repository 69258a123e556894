"""TPWorker: one tensor-parallel rank.

It owns the rank's communicator, model shard and KV cache, and runs one step
when told to: build the attention metadata, run the shard (its all-reduces
meet the other ranks'), and sample the next tokens. Every rank samples (the
logits are all-gathered, so every rank gets the same tokens) and remembers
them, because the engine may already have sent the next step with
PREVIOUS_TOKEN in place of tokens it has not seen yet. The class is
plain Python: cluster.py runs it as a Ray actor (TPWorkerActor, processes named
`ray::TPWorkerActor`); benchmarks and GPU tests run it in-process at TP=1.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import socket
import threading
import time
import torch

from raytp.cluster.comm import (
    CollectiveAborted,
    Communicator,
    GlooCommunicator,
    GlooRendezvous,
    NcclCommunicator,
    ShmCommunicator,
    ShmRendezvous,
    SingleRank,
    create_shm_rendezvous,
    free_port,
    open_store,
)
from raytp.cluster.devices import nvml_uuid, ray_gpu_ids, select_cuda_device
from raytp.cluster.kv_mirror import KVHostMirror
from raytp.cluster.memory import MemoryProfile
from raytp.cluster.stage_link import SocketLink, listen
from raytp.cluster.step_memory import RecentSequences, TokensFromLastStage, send_tokens
from raytp.cluster.rank_store import (kv_path, load_shard, map_kv_cache, mark_user, save_shard, shard_path,
                                      sweep_stale_stores)
from raytp.model.attention import SeqChunk, build_metadata, select_backend, token_slots
from raytp.model.cuda_graphs import MAX_GATHERED_KEYS, DecodeGraphs, graph_batch_sizes
from raytp.model.layers import build_gemm_kernels
from raytp.model.llama import LlamaModel
from raytp.model.pipeline import Stage
from raytp.model.loader import DTYPES, load_model, read_model_args, weight_bytes
from raytp.outputs import TokenLogprob
from raytp.sampling import RowContext, SamplingParams, gather_logprobs, sample
from raytp.engine.step import PREVIOUS_TOKEN, SeqStep, StepLogprobs, StepResult
from raytp.cluster.topology import check_nvlink

log = logging.getLogger(__name__)

# Default KV-cache budget per rank on CPU, where free memory is not a good guide.
_CPU_KV_BUDGET_BYTES = 2 * 2**30


class TimedCommunicator(Communicator):
    """Wraps a communicator and adds up the time its collectives take (for raytp_allreduce_seconds).

    On CPU a collective returns when it is done: wall-clock time is its time.
    On CUDA a collective only enqueues work on the step's stream and returns at
    once, so each is bracketed by CUDA events on that stream instead, read by
    take_seconds() once the step has synced.
    """

    def __init__(self, inner: Communicator, cuda_events: bool = False):
        self.inner, self.rank, self.world_size = inner, inner.rank, inner.world_size
        self.cuda_events = cuda_events
        self._wall_seconds = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []  # this step's, in use
        self._spare_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []  # read, for the next steps

    def _timed(self, fn, *args):
        if self.cuda_events and torch.cuda.is_current_stream_capturing():
            return fn(*args)  # captured into a decode graph: its replays are not timed (events cannot time them)
        if self.cuda_events:
            # Two per collective, two collectives a layer: reused from step to step instead of created each time.
            start, end = (self._spare_events.pop() if self._spare_events
                          else (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            start.record()  # on the current (the step's) stream, like the collective
            out = fn(*args)
            end.record()
            self._events.append((start, end))
            return out
        t0 = time.perf_counter()
        out = fn(*args)
        self._wall_seconds += time.perf_counter() - t0
        return out

    def reset(self) -> None:
        """Forget the time taken so far; an unread step's events (it failed) are recorded anew before reuse."""
        self._spare_events += self._events
        self._wall_seconds, self._events = 0.0, []

    def take_seconds(self) -> float:
        """Seconds in collectives since the last reset; on CUDA call it after the step's stream has synced."""
        seconds = self._wall_seconds + sum(start.elapsed_time(end) for start, end in self._events) / 1e3  # ms -> s
        self.reset()
        return seconds

    def all_reduce(self, tensor):
        return self._timed(self.inner.all_reduce, tensor)

    def all_gather(self, tensor, dim=-1):
        return self._timed(self.inner.all_gather, tensor, dim)

    def broadcast(self, tensor, src=0):
        return self._timed(self.inner.broadcast, tensor, src)

    def barrier(self):
        self.inner.barrier()

    def abort(self):
        self.inner.abort()

    def close(self):
        self.inner.close()


class NotConnected(Communicator):
    """A rank's place in a group before it has joined the group's communicator (a spare taking a dead rank's
    index builds its shard first): every collective refuses."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def _refuse(self, *args):
        raise CollectiveAborted(f"rank {self.rank} has not joined the group's communicator yet")

    all_reduce = all_gather = broadcast = barrier = _refuse


GREEDY_ONE = SamplingParams(max_tokens=1, temperature=0.0)
# The KV sizing step's rows ask for what costs a step the most memory besides its activations: top-p/top-k's sort of
# the vocabulary, sampled logprobs, and prompt logprobs (their logits, PROMPT_LOGITS_ROWS rows at a time). Seeded:
# the rank's own generator is left as it was.
MEMORY_HUNGRY = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.9, top_k=50, seed=0, logprobs=20,
                               prompt_logprobs=20)
PROMPT_LOGITS_ROWS = 256  # prompt logprobs: logits of at most this many rows at once (each row is vocab floats)


def throwaway_steps(seq_lens: list[int], block_size: int, params: SamplingParams = GREEDY_ONE) -> list[SeqStep]:
    """Prefills of these lengths (token 0 throughout), in consecutive KV blocks from block 0, each with `params`."""
    steps, next_block = [], 0
    for i, n in enumerate(seq_lens):
        blocks = -(-n // block_size)  # ceil
        steps.append(SeqStep([0] * n, 0, list(range(next_block, next_block + blocks)), params, 0, f"throwaway-{i}",
                             prompt_len=n, prompt_logprobs=params.prompt_logprobs is not None))
        next_block += blocks
    return steps


def on_rank_device(method):
    """Run a rank's method with the rank's GPU as the calling thread's current device. CUDA's current device is per
    thread: the actor's constructor sets it on its own thread, but Ray runs a threaded actor's calls (load, the
    communicator, KV sizing) on threads of its pool, and the steps on the rank's step thread, where it would be
    device 0: wrong wherever CUDA_VISIBLE_DEVICES does not hold this rank's GPU alone."""

    @functools.wraps(method)
    def on_device(self, *args, **kwargs):
        if self.cuda_index is None:
            return method(self, *args, **kwargs)
        with torch.cuda.device(self.cuda_index):
            return method(self, *args, **kwargs)

    return on_device


class TPWorker:
    def __init__(self, rank: int, world_size: int, device: str, dtype: str, seed: int = 0, num_threads: int | None = None):
        self.rank, self.world_size, self.device, self.dtype = rank, world_size, device, dtype
        self.num_threads = num_threads
        self.cuda_index: int | None = None
        self.stream: torch.cuda.Stream | None = None
        if device == "cuda":
            self.cuda_index = select_cuda_device()  # the GPU Ray gave this rank (device 0 outside Ray)
            # Steps (and their NCCL collectives) run on a stream of their own: the legacy default
            # stream syncs with every other stream and cannot be captured in a CUDA graph.
            self.stream = torch.cuda.Stream()
        elif num_threads:
            torch.set_num_threads(num_threads)
        self.comm: TimedCommunicator | None = None
        self.model = None
        self.kv_cache: torch.Tensor | None = None
        self.block_size = 16
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)  # the same seed on every rank: the same samples
        # Where what this rank keeps outlives it, if anywhere (rank_store.py): its shard and KV cache (on GPU host
        # copies: the cache's is the mirror, kv_mirror.py).
        self.store_dir: str | None = None
        self.kv_mirror: KVHostMirror | None = None
        self._store = None  # rank 0: the rendezvous' store, listening from make_rendezvous until init_communicator
        self._spare_models: dict[int, LlamaModel] = {}  # a spare: every rank's model over the store, until it takes one
        self.graph_limits: tuple[int, int] | None = None  # (max_num_seqs, max_model_len) where decode steps use graphs
        self.graphs: DecodeGraphs | None = None  # over the current KV cache and communicator; made when first needed
        self.memory_profile: MemoryProfile | None = None  # CUDA: what sized the KV cache
        self.recent = RecentSequences()  # the tokens sampled for, and penalty histories of, recent steps' sequences
        # Pipeline stages: "prev" receives the residual stream from this rank's peer in the stage before, "next"
        # sends it to the one in the stage after (each a communicator of two: the sender is its rank 0); the last
        # stage sends its tokens to the first ("tokens", see step_memory.py).
        self.links: dict[str, Communicator] = {}
        self.tokens_from_last: TokensFromLastStage | None = None  # the first stage's side of "tokens"
        self._link_server = None  # the "next" link's socket, listening from make_link_rendezvous until connect_link
        self.stream_wait_seconds, self.stream_sent_bytes = 0.0, 0  # the running step's (StepResult)

    # ---- placement and communicator set-up ----------------------------------

    def node_info(self) -> dict:
        info = {"rank": self.rank, "hostname": socket.gethostname(), "pid": os.getpid(), "device": self.device}
        try:
            import ray

            info["node_ip"] = ray.util.get_node_ip_address()
            info["node_id"] = ray.get_runtime_context().get_node_id()
        except Exception:  # in-process use, without Ray
            info["node_ip"], info["node_id"] = "127.0.0.1", None
        info["gpu_ids"] = ray_gpu_ids()
        info["gpu_uuid"] = nvml_uuid(self.cuda_index) if self.cuda_index is not None else None
        return info

    def check_nvlink(self, gpu_uuids: list[str], refuse: bool) -> str | None:
        """Rank 0, on the ranks' node: a warning if the group's GPUs are not all NVLink-connected (see topology.py)."""
        return check_nvlink(gpu_uuids, refuse)

    def make_rendezvous(self, cpu_collectives: str = "shm"):
        """Rank 0 only: what the other ranks need to join (NCCL unique id, shared-memory segment or gloo address)."""
        if self.world_size == 1:
            return None  # no collectives at all
        if self.device == "cuda":
            from raytp.cluster.comm import nccl_unique_id

            return nccl_unique_id()
        host = self.node_info()["node_ip"]
        # A TP group is on one node: its CPU ranks share memory (shm), with gloo for the rest.
        shm = create_shm_rendezvous(host, self.world_size) if cpu_collectives == "shm" else None
        gloo = shm.gloo if shm is not None else GlooRendezvous(host, free_port(host))
        for attempt in range(3):
            try:
                self._store = open_store(gloo, self.world_size)
                break
            except RuntimeError as err:  # another process bound the port between free_port() and the store's bind
                if "EADDRINUSE" not in str(err) or attempt == 2:
                    raise
                log.warning("rendezvous port %d was taken meanwhile: another one", gloo.port)
                gloo = GlooRendezvous(host, free_port(host))
        return dataclasses.replace(shm, gloo=gloo) if shm is not None else gloo

    @on_rank_device
    def init_communicator(self, rendezvous, timeout_s: float = 60.0, epoch: int = 0) -> str:
        """Connect to the group's other ranks. Again after a peer was replaced (epoch > 0): the model's layers keep
        their communicator object and get the new connection inside it, and what the rank remembers of earlier
        steps goes (the engine replays the steps that were lost); every rank reseeds alike for unseeded sampling."""
        if self.world_size == 1:
            inner = SingleRank()
        elif self.device == "cuda":
            inner = NcclCommunicator(rendezvous, self.rank, self.world_size)
        else:
            store, self._store = self._store, None  # rank 0's, opened with the rendezvous
            if isinstance(rendezvous, ShmRendezvous):
                inner = ShmCommunicator(rendezvous, self.rank, self.world_size, timeout_s, store)
            else:
                inner = GlooCommunicator(rendezvous, self.rank, self.world_size, timeout_s, store)
        if self.comm is None:
            # CUDA events for NCCL; TP=1's collectives are the identity: nothing to time on the GPU.
            self.comm = TimedCommunicator(inner, cuda_events=isinstance(inner, NcclCommunicator))
        else:
            old, self.comm.inner = self.comm.inner, inner
            # The old connection's teardown can wait on the lost peer (gloo's store took 0.5 s once): not in the pause.
            threading.Thread(target=old.close, name="raytp-old-comm-close", daemon=True).start()
        self.graphs = None  # a graph's collectives are bound to the connection it was captured with
        if epoch:
            self.recent.forget_all()
            self.generator.manual_seed(self.seed + epoch)
        return type(inner).__name__

    @on_rank_device
    def abort_communicator(self) -> None:
        """Release this rank (and, through the shared segment, its peers) from a collective a dead peer blocks."""
        if self.comm is not None:
            self.comm.abort()
        for link in self.links.values():
            link.abort()

    def make_link_rendezvous(self, tcp: bool = False):
        """The sending side of a link between stages: where its peer (the same rank of the receiving stage) meets it.
        Over the network between nodes (TCP, stage_link.py; NCCL on GPUs unless `tcp`: the tokens the last stage
        sends the first are on the host already), never the shared-memory segment, as stages are on different nodes
        in general."""
        if self.device == "cuda" and not tcp:
            from raytp.cluster.comm import nccl_unique_id

            return nccl_unique_id()
        self._link_server, rendezvous = listen(self.node_info()["node_ip"])
        return rendezvous

    @on_rank_device
    def connect_link(self, rendezvous, side: str, timeout_s: float = 60.0, steps_remembered: int = 1) -> None:
        """Join the link to the stage after this one (side "next": this rank sends, made the rendezvous) or before
        it ("prev": receives); a pipeline's last stage sends its tokens to the first ("tokens_out", made the
        rendezvous; "tokens_in"), both of which then remember each sequence for `steps_remembered` steps."""
        rank = 0 if side in ("next", "tokens_out") else 1
        if self.device == "cuda" and side in ("next", "prev"):
            link = NcclCommunicator(rendezvous, rank, 2)
        else:
            server = None
            if rank == 0:  # the socket make_link_rendezvous opened, listening for the receiving stage's rank
                server, self._link_server = self._link_server, None
            link = SocketLink(rendezvous, rank, timeout_s, server)
        if side.startswith("tokens"):
            self.recent.steps = steps_remembered
        if side == "tokens_in":
            self.tokens_from_last = TokensFromLastStage(link, self.recent)
        old, self.links[side] = self.links.get(side), link
        if old is not None:  # (a replacement's: its teardown may wait on the lost peer, as init_communicator's)
            threading.Thread(target=old.close, name="raytp-old-link-close", daemon=True).start()

    # ---- weights and KV cache -------------------------------------------------

    @on_rank_device
    def load(self, model_path: str, attention_backend: str = "auto", pack_weights: bool = True,
             store_dir: str | None = None, quantization: str = "none", block_size: int = 16,
             expert_parallel: bool = False, stage: Stage | None = None) -> dict:
        """Load this rank's shard from the checkpoint; with store_dir, keep there what a replacement takes over
        (rank_store.py): the shard, written now (a GPU rank's: a host copy), and the KV cache (a GPU rank's: its host
        mirror). The attention backend is chosen for the KV cache's block size; `stage`: the pipeline stage
        whose layers this rank computes (all of them by default)."""
        device = "cuda" if self.device == "cuda" else "cpu"
        attention = select_backend(device, attention_backend, DTYPES[self.dtype], block_size)
        self.model = load_model(model_path, self.comm, self.dtype, device, progress=self.rank == 0,
                                attention=attention, pack_weights=pack_weights, quantization=quantization,
                                expert_parallel=expert_parallel, stage=stage)
        if store_dir is not None:
            if self.rank == 0:
                for stale in sweep_stale_stores(os.path.dirname(store_dir)):
                    log.warning("removed %s: a store left behind by a group whose processes all exited", stale)
            mark_user(store_dir)
            save_shard(self.model, shard_path(store_dir, self.rank))  # (a GPU rank's: a host copy)
            self.store_dir = store_dir
        return {"rank": self.rank, "weight_bytes": weight_bytes(self.model), "attention": attention.label,
                "attention_detail": attention.describe()}

    def configure_cuda_graphs(self, max_num_seqs: int, max_model_len: int) -> list[int]:
        """Decode steps replay CUDA graphs from now on (cuda_graphs.py), where the device, the attention kernel and
        the model allow: on CUDA with the flash-attention backend, dense models. Returns the padded batch sizes, []
        where graphs cannot run."""
        if self.device != "cuda" or not self.model.attention.label.startswith("cuda"):
            return []
        if self.model.stage.count > 1:  # a stage's step waits for the stream from the stage before it
            log.warning("decode steps run eagerly: CUDA graphs do not capture pipeline stages yet")
            return []
        if self.model.args.num_experts:  # the experts' grouping reads each expert's token count on the host
            log.warning("decode steps run eagerly: CUDA graphs do not capture mixture-of-experts layers yet")
            return []
        self.graph_limits = (max_num_seqs, max_model_len)
        self.graphs = None
        return graph_batch_sizes(max_num_seqs)

    def _decode_graphs(self) -> DecodeGraphs | None:
        """The decode graphs over the current KV cache (its last block is the padding rows' scratch), if configured."""
        if self.graph_limits is None or self.kv_cache is None:
            return None
        if self.graphs is None:
            max_num_seqs, max_model_len = self.graph_limits
            paged = self.model.attention.label == "cuda-paged"
            scratch_slot = self.kv_cache.shape[2] - self.block_size  # the first slot of the scratch block
            self.graphs = DecodeGraphs(self.model, self.kv_cache, self.block_size, max_num_seqs, max_model_len,
                                       scratch_slot, gathered_keys_limit=None if paged else MAX_GATHERED_KEYS)
        return self.graphs

    def prepare_spare(self, model_path: str, attention_backend: str, store_dir: str, world_size: int,
                      expert_parallel: bool = False, stage: Stage | None = None) -> None:
        """A spare builds every rank's model (of its pipeline stage) from the stage's shard store ahead of time (the
        weights are the store's pages, mapped: no copy, no extra memory), so that taking a rank's place costs
        nothing of the model's size."""
        mark_user(store_dir)
        self._spare_models = {rank: self._model_from_store(model_path, attention_backend, store_dir, rank, world_size,
                                                           expert_parallel, stage)
                              for rank in range(world_size)}

    def _model_from_store(self, model_path: str, attention_backend: str, store_dir: str, rank: int,
                          world_size: int, expert_parallel: bool = False, stage: Stage | None = None,
                          block_size: int = 16) -> LlamaModel:
        """Rank `rank`'s model with the shard in its store: on CPU computing with the file's pages, on GPU copied to
        the device from them."""
        device = "cuda" if self.device == "cuda" else "cpu"
        # The communicator object the layers keep; the connection inside comes when the rank joins the group.
        comm = TimedCommunicator(NotConnected(rank, world_size), cuda_events=device == "cuda" and world_size > 1)
        attention = select_backend(device, attention_backend, DTYPES[self.dtype], block_size)
        with torch.device(device):
            model = LlamaModel(read_model_args(model_path), comm, DTYPES[self.dtype], attention, expert_parallel, stage)
        load_shard(model, shard_path(store_dir, rank))
        return model

    @on_rank_device
    def take_over(self, rank: int, world_size: int, store_dir: str, num_kv_blocks: int, block_size: int) -> dict:
        """A spare becomes rank `rank` of a group that lost it: the dead rank's shard (built by prepare_spare) and KV
        cache come from its store (no checkpoint read, no packing, no cache to fill again). It joins the
        communicator next."""
        t0 = time.perf_counter()
        if rank not in self._spare_models:
            raise RuntimeError(f"spare asked to take rank {rank} before prepare_spare built its model")
        self.model = self._spare_models[rank]
        self._spare_models = {}  # the other ranks' models were only for this moment
        self.rank, self.world_size, self.comm = rank, world_size, self.model.comm
        shard_s = time.perf_counter() - t0
        self.store_dir = store_dir
        self.init_kv_cache(num_kv_blocks, block_size, restore=True)
        return {"shard_s": shard_s, "kv_s": time.perf_counter() - t0 - shard_s, "pid": os.getpid()}

    @on_rank_device
    def restore(self, model_path: str, attention_backend: str, store_dir: str, num_kv_blocks: int, block_size: int,
                expert_parallel: bool = False, stage: Stage | None = None,
                graph_limits: tuple[int, int] | None = None) -> dict:
        """This new process takes the place of a lost rank of the same number that no spare could take: the lost
        rank's shard and KV cache from the store (CPU: mapped; GPU: copied to the device from the shard's host copy
        and the cache's host mirror). It joins the communicator next."""
        t0 = time.perf_counter()
        self.model = self._model_from_store(model_path, attention_backend, store_dir, self.rank, self.world_size,
                                            expert_parallel, stage, block_size)
        self.comm = self.model.comm
        mark_user(store_dir)
        self.store_dir = store_dir
        if graph_limits is not None:
            self.configure_cuda_graphs(*graph_limits)
        shard_s = time.perf_counter() - t0
        self.init_kv_cache(num_kv_blocks, block_size, restore=True)
        return {"shard_s": shard_s, "kv_s": time.perf_counter() - t0 - shard_s, "pid": os.getpid()}

    def kv_block_bytes(self, block_size: int) -> int:
        shape = self.model.kv_cache_shape(block_size)
        return int(torch.Size(shape).numel()) * torch.empty((), dtype=self.model.dtype).element_size()

    @on_rank_device
    def max_kv_blocks(self, block_size: int, gpu_memory_utilization: float, profile_seq_lens: list[int]) -> int:
        """How many KV blocks this rank can hold.

        On CUDA, measured: the largest step (prefills of profile_seq_lens) is run
        first, after NCCL's warm-up, so that its activation peak, cuBLAS's
        workspace and NCCL's buffers are counted (memory.py). Every rank calls
        it together: the step's collectives meet.
        """
        if self.device != "cuda":
            return _CPU_KV_BUDGET_BYTES // self.kv_block_bytes(block_size)
        profile = self.memory_profile = self.profile_memory(profile_seq_lens, block_size)
        log.info("rank %d: %s", self.rank, profile.describe(gpu_memory_utilization))
        # One block fewer: init_kv_cache adds the decode graphs' scratch block.
        return max(0, profile.kv_cache_bytes(gpu_memory_utilization) // self.kv_block_bytes(block_size) - 1)

    def profile_memory(self, seq_lens: list[int], block_size: int) -> MemoryProfile:
        """Run one throw-away step of prefills of these lengths in a scratch KV cache just big enough; read the GPU."""
        steps = throwaway_steps(seq_lens, block_size, MEMORY_HUNGRY)
        self.init_kv_cache(sum(len(s.block_table) for s in steps), block_size)
        scratch_bytes = self.kv_cache.numel() * self.kv_cache.element_size()
        torch.cuda.reset_peak_memory_stats()
        self._run_throwaway(steps)
        # Reserved, not allocated: what the caching allocator held at the peak is what the device had to give
        # (its blocks' rounding and fragmentation included).
        peak_reserved = torch.cuda.max_memory_reserved() - scratch_bytes
        torch.cuda.empty_cache()  # the step's activations go back to the device
        graph_pool = self._measure_graph_pool()
        self.kv_cache = None
        torch.cuda.empty_cache()  # `used` below is the steady state
        free, total = torch.cuda.mem_get_info()
        return MemoryProfile(total=total, used=total - free, reserved=torch.cuda.memory_reserved(),
                             peak_reserved=peak_reserved, graph_pool=graph_pool)

    def _measure_graph_pool(self) -> int:
        """Device bytes the decode graphs take beside the steps' own memory: their static buffers, shared pool and
        instantiated graphs, for what warm-up captures and the largest graph, captured over the scratch cache (as
        free device memory goes down, so that memory outside torch's allocator counts too) and dropped."""
        if self.graph_limits is None:
            return 0
        torch.cuda.synchronize()
        free_before = torch.cuda.mem_get_info()[0]
        graphs = self._decode_graphs()
        graphs.capture_all()
        graphs.capture(*graphs.largest_shape())
        torch.cuda.synchronize()
        used = free_before - torch.cuda.mem_get_info()[0]
        self.graphs = None
        del graphs
        return max(0, used)

    @on_rank_device
    def init_kv_cache(self, num_blocks: int, block_size: int, restore: bool = False) -> None:
        """A zeroed KV cache, or (restore) the one this rank's store kept of a lost rank of the same number. With a
        store, on CPU the cache is a file that outlives this process (rank_store.py); on GPU it has a host mirror
        in such a file (kv_mirror.py)."""
        self.block_size = block_size
        self.kv_cache = None  # free the old cache first
        device = "cuda" if self.device == "cuda" else "cpu"
        self.graphs = None  # captured over the old cache
        # On CUDA one block more, which no sequence owns: the padding rows of decode graphs write their K/V there.
        shape = self.model.kv_cache_shape((num_blocks + (self.device == "cuda")) * block_size)
        self.kv_mirror = None
        if self.store_dir is None:
            self.kv_cache = torch.zeros(shape, dtype=self.model.dtype, device=device)
        elif device == "cpu":
            self.kv_cache = map_kv_cache(kv_path(self.store_dir, self.rank), shape, self.model.dtype,
                                         create=not restore)
        else:
            self.kv_mirror = KVHostMirror(kv_path(self.store_dir, self.rank), shape, self.model.dtype,
                                          create=not restore)
            self.kv_cache = (self.kv_mirror.restore(device) if restore
                             else torch.zeros(shape, dtype=self.model.dtype, device=device))
        if self.stream is not None:
            torch.cuda.synchronize()  # weights and cache were written on the default stream; steps read them on self.stream

    @on_rank_device
    def warm_up(self, num_tokens: int, kernels_up_to_seqs: int = 0) -> float:
        """Run one throw-away step of `num_tokens` tokens (short sequences), like a big prefill step; with
        kernels_up_to_seqs, then have oneDNN build the GEMM kernels of every step size up to num_tokens tokens and
        that many sequences (CPU).

        The first step at a new size pays for memory first touched and GEMM
        kernels built for its shapes (on CPU a first 512-token step took twice
        as long as the next one); paying it here keeps it out of the first
        requests' latency. Building every size's kernels costs more (0.67 s
        for bench-58m at 256 tokens and 32 sequences, half of it the LM head's
        GEMMs) than the ~0.13 s it saves the first burst of 32 requests, so a
        group rebuilt while requests wait for it skips that part. Every rank
        runs it together (its collectives meet). The K/V it writes land in
        blocks that are free: a block is always written before it is read.
        Returns the seconds it took.
        """
        t0 = time.perf_counter()
        num_blocks = self.kv_cache.shape[2] // self.block_size
        per_seq = min(2, num_blocks)  # blocks per sequence: short ones, so attention stays cheap
        seq_len = per_seq * self.block_size
        num_seqs = max(1, min(num_tokens // seq_len, num_blocks // per_seq))
        self._run_throwaway(throwaway_steps([seq_len] * num_seqs, self.block_size))
        if kernels_up_to_seqs:
            build_gemm_kernels(self.model, num_tokens, kernels_up_to_seqs)
        graphs = self._decode_graphs()
        if graphs is not None:  # every batch size at the shortest key span; longer spans when first needed
            with torch.cuda.stream(self.stream):
                made = graphs.capture_all()
            log.info("rank %d: captured %d decode graphs (batch sizes %s) in %.2fs", self.rank, made,
                     graphs.batch_sizes, time.perf_counter() - t0)
        return time.perf_counter() - t0

    def _run_throwaway(self, steps: list[SeqStep]) -> None:
        """Run steps that belong to no request; the ranks then remember nothing of them (the step after a
        throw-away one has no PREVIOUS_TOKEN to fill, and its histories were never penalized ones); a pipeline's
        last stage sends the first stage no tokens for them."""
        self.execute(steps, throwaway=True)
        self.recent.forget_all()

    # ---- the step ---------------------------------------------------------------

    def ping(self) -> int:
        return self.rank

    @on_rank_device
    def execute(self, seqs: list[SeqStep], throwaway: bool = False) -> StepResult:
        t0 = time.perf_counter()
        self.comm.reset()
        self.stream_wait_seconds, self.stream_sent_bytes = 0.0, 0
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            tokens, logprobs = self._step(seqs, throwaway)
            if self.kv_mirror is not None and not throwaway:
                # Before the tokens go back: a token the engine has seen has its K/V on the host.
                chunks = [SeqChunk(s.start, len(s.token_ids), s.block_table) for s in seqs]
                self.kv_mirror.record(self.kv_cache, token_slots(chunks, self.block_size))
        if self.stream is not None:
            self.stream.synchronize()  # the step's final sync: its collectives' CUDA events are complete now
        request_ids = [s.request_id for s in seqs]
        if self.tokens_from_last is not None and not throwaway:
            self.tokens_from_last.expect(request_ids)
        self.recent.ran(request_ids, tokens)
        return StepResult(tokens, self.comm.take_seconds(), time.perf_counter() - t0, logprobs,
                          expert_tokens=self.model.expert_tokens() if self.rank == 0 else None,
                          stream_wait_seconds=self.stream_wait_seconds, stream_sent_bytes=self.stream_sent_bytes)

    def _step(self, seqs: list[SeqStep], throwaway: bool) -> tuple[list[int], StepLogprobs | None]:
        device = self.kv_cache.device
        stage = self.model.stage
        chunks = [SeqChunk(s.start, len(s.token_ids), s.block_table) for s in seqs]
        if self.tokens_from_last is not None and not throwaway:  # the first stage of a pipeline
            t0 = time.perf_counter()
            self.tokens_from_last.read_for([s.request_id for s in seqs if PREVIOUS_TOKEN in s.token_ids])
            self.stream_wait_seconds = time.perf_counter() - t0  # (a wait for the stages after it, not compute)
        ids = None  # (the stages in between need no token ids)
        if stage.first or stage.last:
            tokens = self.recent.tokens
            ids = [[tokens[s.request_id] if t == PREVIOUS_TOKEN else t for t in s.token_ids] for s in seqs]
        graphs = self._decode_graphs()
        shape = graphs.shape_for(chunks) if graphs is not None else None
        if shape is not None:  # one new token per sequence: a graph replay
            hidden = graphs.run([row[0] for row in ids], chunks, shape)  # (B, hidden)
            last_index = torch.arange(len(seqs))  # (B,) each sequence's row of hidden
            last_hidden = hidden
        else:
            meta = build_metadata(chunks, self.block_size, device, self.model.args.sliding_window)
            input_ids, stream = None, None
            if stage.first:
                input_ids = torch.tensor([t for row in ids for t in row], dtype=torch.long, device=device)  # (T,)
            else:  # the residual stream after the stage before: (T, hidden)
                num_tokens = sum(len(s.token_ids) for s in seqs)
                stream = torch.empty(num_tokens, self.model.args.hidden_size, dtype=self.model.dtype, device=device)
                t0 = time.perf_counter()
                self.links["prev"].recv(stream, src=0)
                self.stream_wait_seconds = time.perf_counter() - t0
            hidden = self.model(input_ids, meta, self.kv_cache, stream)  # (T, hidden)
            if not stage.last:  # only the last stage samples
                self.links["next"].send(hidden, dst=1)
                self.stream_sent_bytes = hidden.numel() * hidden.element_size()
                return [], None
            last_index = meta.last_token_index
            last_hidden = hidden[last_index]  # (B, hidden)
        logits = self.model.compute_logits(last_hidden)  # (B, vocab), all-gather inside
        contexts = self._contexts(seqs, ids)
        tokens = sample(logits, [s.params for s in seqs], [s.num_generated for s in seqs], self.generator, contexts)
        if "tokens_out" in self.links and not throwaway:  # the last stage of a pipeline: to the first stage
            send_tokens(self.links["tokens_out"], self.recent.step, tokens)
        return tokens, self._logprobs(seqs, ids, tokens, logits, hidden, last_index)

    def _contexts(self, seqs: list[SeqStep], ids: list[list[int]]) -> list[RowContext] | None:
        """Each row's tokens so far (penalized rows; kept for the next steps), banned ids and grammar mask; None if
        no row needs any."""
        histories = {}  # this step's penalized rows'
        for s, row in zip(seqs, ids):
            if s.params.penalized:
                if s.history is not None:
                    history = list(s.history)
                elif s.start == 0:
                    history = []
                elif s.request_id in self.recent.histories:  # it was in one of this rank's recent steps
                    history = self.recent.histories[s.request_id]
                else:
                    raise RuntimeError(f"step protocol: {s.request_id} continues at {s.start} without its history "
                                       "and was in none of the recent steps")
                del history[s.start :]
                history.extend(row)
                histories[s.request_id] = history
        self.recent.histories.update(histories)
        if not histories and not any(s.banned_ids or s.allowed_tokens is not None for s in seqs):
            return None
        return [RowContext(histories[s.request_id][: s.prompt_len], histories[s.request_id][s.prompt_len :], s.banned_ids,
                           s.allowed_tokens)
                if s.request_id in histories else RowContext(banned_ids=s.banned_ids, allowed_tokens=s.allowed_tokens)
                for s in seqs]

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
        prompt_rows: list[TokenLogprob] = []  # rank 0: one per target, in order
        if spans:
            rows = torch.cat([torch.arange(f, f + n) for _, f, n in spans]).to(hidden.device)  # (P,)
            num_top = max(seqs[i].params.prompt_logprobs for i, _, _ in spans)
            # A few rows' logits at a time: a long prompt chunk's (P, vocab) floats at once would be GiBs.
            for lo in range(0, len(rows), PROMPT_LOGITS_ROWS):
                logits_part = self.model.compute_logits(hidden[rows[lo : lo + PROMPT_LOGITS_ROWS]])  # (<=C, vocab)
                if self.rank == 0:  # every rank computes the logits (the vocab all-gather is a collective)
                    prompt_rows += gather_logprobs(logits_part, targets[lo : lo + PROMPT_LOGITS_ROWS], num_top)
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
            out.prompt[i] = prompt_rows[offset : offset + n]
            for lp in out.prompt[i]:
                lp.top = lp.top[: seqs[i].params.prompt_logprobs]
            offset += n
        return out

    @on_rank_device
    def shutdown(self) -> None:
        if self.comm is not None:
            self.comm.close()
        for link in self.links.values():
            link.close()
        if self.device == "cuda":
            # The GPU's memory goes back now, even where something still holds this object (an in-process engine
            # started again in the same process sizes its KV cache from what is free).
            self.graphs = self.kv_cache = self.model = None
            torch.cuda.empty_cache()
