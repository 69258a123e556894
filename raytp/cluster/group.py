"""TPGroup: one tensor-parallel group on Ray.

A STRICT_PACK placement group with one bundle per rank puts every rank on one
node; one TPWorkerActor per bundle; rank 0 makes the rendezvous (gloo
address or NCCL unique id) and it reaches the other ranks as an argument of
their init call. Every wait has a timeout: nothing here hangs.

`replace_lost_ranks` mends the group after a rank died or hung, keeping the
survivors' processes, shards and KV caches: the survivors' running step is
aborted, a warm spare (spares.py; CPU) takes each lost rank's index, or
where none is up a new rank process is started in the lost rank's bundle;
its shard and KV cache come from the store the lost rank left in shared
memory (rank_store.py; a GPU rank's host copies, the cache's mirrored by
kv_mirror.py), and every rank joins a new communicator with the old rank
numbers. Where that cannot be done, the supervisor rebuilds the group.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time

import ray
from ray.exceptions import (ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError, RayError,
                            WorkerCrashedError)
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from raytp.config import EngineConfig
from raytp.cluster.executor import (Executor, GroupFailure, PlacementError, choose_num_kv_blocks, profile_seq_lens,
                            warm_up_tokens)
from raytp.cluster.comm import CollectiveAborted
from raytp.cluster.rank_store import new_store_dir, remove_store
from raytp.cluster.spares import SparePool
from raytp.cluster.watchdog import StepWatchdog
from raytp.engine.step import SeqStep, StepResult
from raytp.cluster.worker_actor import MAX_CONCURRENT_CALLS, SPARE_RANK, TPWorkerActor
from raytp.model.loader import checkpoint_dtype, read_model_args
from raytp.model.pipeline import merge_expert_tokens, model_partition, moe_layers_per_stage

SPARE_REFILL_DELAY_S = 3.0
PING_TIMEOUT_S = 1.0  # a live rank answers a ping in milliseconds, even mid-step (its Ray calls have threads of their own)

KILLED_RANKS_EXIT_S = 30.0  # how long a teardown on GPUs waits for its killed ranks' processes to be gone

log = logging.getLogger(__name__)


def wait_until_gone(actors: list, timeout_s: float) -> bool:
    """Wait until every actor (killed) is dead, so that its process and the GPU memory it held are gone; False if
    one is still alive after timeout_s. Ray answers a call to a dead actor with RayActorError."""
    deadline = time.monotonic() + timeout_s
    for actor in actors:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                ray.get(actor.ping.remote(), timeout=min(1.0, left))
            except ActorDiedError:  # (not ActorUnavailableError: that one may come while the process still exits)
                break
            except (GetTimeoutError, ActorUnavailableError):
                continue
            time.sleep(0.05)  # it answered: not killed yet
    return True


def _largest_node(resource: str) -> tuple[float, float]:
    """(most of `resource` on one alive node, free in the whole cluster)."""
    totals = [n["Resources"].get(resource, 0.0) for n in ray.nodes() if n.get("Alive")]
    return max(totals, default=0.0), ray.available_resources().get(resource, 0.0)


def _bundle(device: str, cpus: float, ranks: int = 1) -> dict[str, float]:
    """Resources of `ranks` ranks that must share a node."""
    return {"GPU": ranks, "CPU": cpus * ranks} if device == "cuda" else {"CPU": cpus * ranks}


class PhaseClock:
    """The seconds each phase of a recovery took: end(name) closes the phase that ran since the previous one."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._since = time.monotonic()

    def end(self, name: str) -> None:
        now = time.monotonic()
        self.seconds[name], self._since = now - self._since, now


class TPGroup(Executor):
    def __init__(self, config: EngineConfig, model_path: str, max_model_len: int):
        self.config, self.model_path, self.max_model_len = config, model_path, max_model_len
        self.device, self.dtype = config.resolved_device(), config.resolved_dtype(checkpoint_dtype(model_path))
        self.pg = None
        self.workers: list = []
        self.tp_size, self.num_kv_blocks = 0, 0
        self.epoch = 0  # communicators the current workers joined, less one: steps carry it
        self.steps_sent = 0  # steps sent in this epoch: the next one's number
        self.rebuilding = False  # started before: requests may be waiting for this start
        self.node_ids: list[str] = []  # each stage's node
        # Per stage, on its node (CPU, with spares): the ranks' shards and KV caches in shared memory, and the warm
        # spares that would take a lost rank's place.
        self.store_dirs: list[str] | None = None
        self.spares: list[SparePool] | None = None
        self._refill: threading.Timer | None = None  # the spare pool's refill after a replacement
        self._refill_lock = threading.Lock()
        self.watchdog: StepWatchdog | None = None  # step times of the current group (start() makes it)
        # Pipeline stages (one: the whole model); self.workers holds stage 0's ranks, then stage 1's, ...
        args = read_model_args(model_path)
        self.stages = model_partition(args, config.pipeline_parallel_size, config.pipeline_partition)
        self.moe_layers = moe_layers_per_stage(args, self.stages)

    # ---- building ----------------------------------------------------------------

    def _placement_group(self, tp_size: int):
        """One bundle per rank, all on one node; a pipeline: one bundle per stage (its ranks share a node), the
        stages spread over nodes or packed (pipeline_placement)."""
        if len(self.stages) == 1:
            return placement_group([_bundle(self.device, self.config.cpus_per_rank) for _ in range(tp_size)],
                                   strategy="STRICT_PACK")
        strategy = "SPREAD" if self.config.pipeline_placement == "spread" else "PACK"
        return placement_group([_bundle(self.device, self.config.cpus_per_rank, tp_size) for _ in self.stages],
                               strategy=strategy)

    def _bundle_index(self, stage: int, rank: int) -> int:
        return rank if len(self.stages) == 1 else stage

    def _place(self, tp_size: int) -> None:
        self.pg = self._placement_group(tp_size)
        try:
            ray.get(self.pg.ready(), timeout=self.config.placement_timeout_s)
        except GetTimeoutError:
            remove_placement_group(self.pg)
            self.pg = None
            resource = "GPU" if self.device == "cuda" else "CPU"
            per_rank = 1 if self.device == "cuda" else self.config.cpus_per_rank
            largest, free = _largest_node(resource)
            stages = len(self.stages)
            raise PlacementError(
                f"tensor_parallel_size={tp_size} needs {tp_size * per_rank:g} {resource}s on one node "
                f"({per_rank:g} per rank)"
                + (f", for each of pipeline_parallel_size={stages} stages ({stages * tp_size * per_rank:g} in all)"
                   if stages > 1 else "")
                + f"; the largest node has {largest:g} {resource}s in total and the cluster has {free:g} free "
                f"(waited {self.config.placement_timeout_s:g}s)"
                + ("; on CPU, cpus_per_rank below 1 (e.g. 0.5) lets more ranks than cores share them"
                   if self.device == "cpu" else "")
            ) from None

    def _new_rank(self, rank: int, tp_size: int, scheduling_strategy, num_cpus: float):
        return ray.remote(TPWorkerActor).options(
            max_concurrency=MAX_CONCURRENT_CALLS,
            num_cpus=num_cpus,
            num_gpus=1 if self.device == "cuda" else 0,
            scheduling_strategy=scheduling_strategy,
        ).remote(rank, tp_size, self.device, self.dtype, self.config.seed,
                 self.config.rank_threads() if self.device == "cpu" else None, self.config.binds_cores())

    def _new_stage_rank(self, stage: int, rank: int, tp_size: int):
        """Rank `rank` of pipeline stage `stage`, in its bundle of the group's placement group."""
        strategy = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=self._bundle_index(stage, rank))
        return self._new_rank(rank, tp_size, strategy, self.config.cpus_per_rank)

    def _load(self, worker, stage: int, store_dir: str | None):
        """The call that loads a rank of `stage` from the checkpoint (and, with store_dir, writes its shard there)."""
        cfg = self.config
        return worker.load.remote(self.model_path, cfg.attention_backend, cfg.pack_weights, store_dir, cfg.quantization,
                                  cfg.resolved_block_size(), cfg.expert_parallel, self.stages[stage])

    def _start_spare(self, stage: int):
        # On the stage's node, reserving nothing while it waits: it computes on a dead rank's bundle (spares.py).
        node = NodeAffinitySchedulingStrategy(self.node_ids[stage], soft=False)
        spare = self._new_rank(SPARE_RANK, self.tp_size, node, 0)
        return spare, spare.prepare_spare.remote(self.model_path, self.config.attention_backend, self.store_dirs[stage],
                                                 self.tp_size, self.config.expert_parallel, self.stages[stage])

    def start(self, tp_size: int) -> None:
        t0 = time.monotonic()
        timeout = self.config.init_timeout_s
        self._place(tp_size)
        try:
            self.epoch, self.steps_sent = 0, 0
            # A new group (perhaps of another TP degree) measures its own step times.
            cfg = self.config
            self.watchdog = StepWatchdog(cfg.hang_detection_multiple, cfg.hang_detection_floor_s, cfg.step_timeout_s)
            self.workers = [self._new_stage_rank(stage.index, rank, tp_size)
                            for stage in self.stages for rank in range(tp_size)]
            infos = ray.get([w.node_info.remote() for w in self.workers], timeout=timeout)
            self.node_ids = [infos[stage.index * tp_size]["node_id"] for stage in self.stages]
            for i, info in enumerate(infos):
                log.info("TP rank %d/%d of stage %d/%d: node %s (%s, %s) pid %d gpu %s %s", info["rank"], tp_size,
                         i // tp_size, len(self.stages), info["node_id"], info["node_ip"], info["hostname"],
                         info["pid"], ",".join(info["gpu_ids"]) or "-", info["gpu_uuid"] or "")
            if self.device == "cuda" and tp_size > 1:
                for stage in self.stages:
                    # Asked of NVML on the stage's node (this replica may be elsewhere), by each rank's GPU UUID.
                    uuids = [info["gpu_uuid"] for info in infos[stage.index * tp_size : (stage.index + 1) * tp_size]]
                    warning = ray.get(self.workers[stage.index * tp_size].check_nvlink.remote(uuids, cfg.require_nvlink),
                                      timeout=timeout)
                    if warning:
                        log.warning(warning)
                    else:
                        log.info("the %d GPUs of TP group %d are all NVLink-connected", tp_size, stage.index)
            self._connect(tp_size, timeout)
            # Ranks leave their shards and KV caches in shared memory (a GPU rank: host copies, gpu_host_copies),
            # where a replacement finds them. A lone rank has no survivors to keep: it is rebuilt; a pipeline's other
            # stages are survivors, but a GPU rank is only started in a lost one's place beside a survivor of its
            # own stage (TP > 1).
            replaceable = (self.config.num_spare_ranks > 0 and tp_size * len(self.stages) > 1 if self.device == "cpu"
                           else self.config.gpu_host_copies and tp_size > 1)
            stores = [new_store_dir() for _ in self.stages] if replaceable else []
            self.store_dirs = stores if stores and None not in stores else None
            bs = self.config.resolved_block_size()
            loaded = ray.get([self._load(w, i // tp_size, self.store_dirs[i // tp_size] if self.store_dirs else None)
                              for i, w in enumerate(self.workers)], timeout=timeout)
            self.attention_backend = loaded[0]["attention"]
            log.info("attention: %s", loaded[0]["attention_detail"])
            if self.config.cuda_graphs:
                ray.get([w.configure_cuda_graphs.remote(self.config.max_num_seqs, self.max_model_len)
                         for w in self.workers], timeout=timeout)
            profile = profile_seq_lens(self.config, self.max_model_len)
            capacity = min(ray.get([w.max_kv_blocks.remote(bs, self.config.gpu_memory_utilization, profile)
                                    for w in self.workers], timeout=timeout))
            self.num_kv_blocks = choose_num_kv_blocks(self.config, self.max_model_len, capacity)
            ray.get([w.init_kv_cache.remote(self.num_kv_blocks, bs) for w in self.workers], timeout=timeout)
            warm_tokens = warm_up_tokens(self.config)
            kernels_up_to_seqs = 0 if self.rebuilding else self.config.max_num_seqs
            warm = ray.get([w.warm_up.remote(warm_tokens, kernels_up_to_seqs) for w in self.workers], timeout=timeout)
            log.info("TP group warmed up with one %d-token step in %.2fs", warm_tokens, max(warm))
            self.watchdog.observe(warm_tokens, max(warm))  # the first measurement: covers every smaller step too
        except BaseException as err:
            self.shutdown()
            if isinstance(err, GetTimeoutError):
                raise GroupFailure(f"TP group of {tp_size} did not start within {timeout:g}s") from err
            if isinstance(err, (RayActorError, WorkerCrashedError)):  # a rank died while starting: worth a retry
                raise GroupFailure(f"a rank of the TP group of {tp_size} died while starting: {err}") from err
            raise  # anything a rank raised itself (a bad checkpoint, a KV cache too small) is permanent
        # Only now: the group's size says it runs (engine_stats, the supervisor), not while it starts.
        self.tp_size, self.rebuilding = tp_size, True
        if self.store_dirs is not None and self.device == "cpu":  # (a GPU spare would need a GPU of its own)
            self.spares = [SparePool(functools.partial(self._start_spare, stage.index), self.config.num_spare_ranks)
                           for stage in self.stages]
            for pool in self.spares:
                pool.fill()
        log.info("TP group ready: tp=%d, %s, %d KV blocks of %d tokens per rank, %.1fs", tp_size, self.dtype,
                 self.num_kv_blocks, bs, time.monotonic() - t0)

    def _connect(self, tp: int, timeout: float, epoch: int = 0) -> None:
        """Each stage's ranks join their TP communicator (rank 0 of the stage makes the rendezvous), and each rank
        of a stage but the last links to the same rank of the next stage, and the last stage's to the first's.
        Again after a replacement (epoch > 0): every rank then joins new ones, keeping its rank number."""
        rendezvous = ray.get([self.workers[s.index * tp].make_rendezvous.remote(self.config.cpu_collectives)
                              for s in self.stages], timeout=timeout)
        backends = ray.get([w.init_communicator.remote(rendezvous[i // tp], timeout, epoch)
                            for i, w in enumerate(self.workers)], timeout=timeout)
        log.info("%d TP group(s) of %d ranks connected over %s", len(self.stages), tp, backends[0])
        if len(self.stages) == 1:
            return
        senders = self.workers[: -tp]
        links = ray.get([w.make_link_rendezvous.remote() for w in senders], timeout=timeout)
        ray.get([w.connect_link.remote(link, "next", timeout) for w, link in zip(senders, links)]
                + [w.connect_link.remote(link, "prev", timeout) for w, link in zip(self.workers[tp:], links)],
                timeout=timeout)
        # The last stage's ranks send their tokens to the first stage's (step_memory.py).
        first, last, remembered = self.workers[:tp], self.workers[-tp:], self.config.steps_remembered()
        links = ray.get([w.make_link_rendezvous.remote(tcp=True) for w in last], timeout=timeout)
        ray.get([w.connect_link.remote(link, "tokens_out", timeout, remembered) for w, link in zip(last, links)]
                + [w.connect_link.remote(link, "tokens_in", timeout, remembered) for w, link in zip(first, links)],
                timeout=timeout)

    # ---- running -----------------------------------------------------------------

    def _merge(self, results: list[StepResult]) -> StepResult:
        # The last stage samples (any earlier one returns no tokens). Each rank feeds its own samples back in as
        # PREVIOUS_TOKEN (a pipeline's first stage gets them from the same rank of the last), so ranks that disagree
        # would silently compute different sequences: never expected (same logits, same seeds), so it is a bug.
        last = results[-self.tp_size :]
        tokens = last[0].token_ids
        for rank, r in enumerate(last[1:], start=1):
            if r.token_ids != tokens:
                raise RuntimeError(f"TP rank {rank} sampled {r.token_ids} where rank 0 sampled {tokens}")
        # The ranks wait for each other in every collective: the slowest rank's time is the step's.
        leads = [r.lead_seconds for r in results]
        stages = [results[s * self.tp_size : (s + 1) * self.tp_size] for s in range(len(self.stages))]
        step = StepResult(tokens, max(r.collective_seconds for r in results), max(r.step_seconds for r in results),
                          last[0].logprobs, None if None in leads else min(leads),  # the last rank to get it
                          merge_expert_tokens([ranks[0].expert_tokens for ranks in stages], self.moe_layers))
        if len(stages) > 1:
            step.stage_compute_seconds = [max(r.step_seconds - r.stream_wait_seconds for r in ranks) for ranks in stages]
            step.stage_sent_bytes = [sum(r.stream_sent_bytes for r in ranks) for ranks in stages[:-1]]
        return step

    def _send(self, seqs: list[SeqStep]) -> list:
        # Without task events: steps come tens of times a second, and each one's events would cost the caller, the
        # rank and the GCS (which would keep up to 100k of them) for a task table nobody reads.
        number, self.steps_sent = self.steps_sent, self.steps_sent + 1
        return [w.run_step.options(enable_task_events=False).remote(self.epoch, number, seqs) for w in self.workers]

    def execute(self, seqs: list[SeqStep]) -> StepResult:
        num_tokens = sum(len(s.token_ids) for s in seqs)
        refs = self._send(seqs)
        started = time.monotonic()
        pending = list(refs)
        try:
            # Collect results as they come, so a dead rank is noticed at once even
            # while the surviving ranks still wait for it inside a collective.
            while pending:
                done, pending = ray.wait(pending, num_returns=1, timeout=self._wait_s(num_tokens, started))
                if not done:
                    self._check_not_hung(started)
                ray.get(done)
            return self._finish(ray.get(refs), num_tokens)
        except RayError as err:
            raise _worker_failed(err, len(self.stages) == 1) from err

    def submit(self, seqs: list[SeqStep]):
        # The calls go out now; each actor runs its calls in the order they were sent. Every rank's result is read
        # even when nobody awaits it any more (the step was discarded, or another rank failed first): the other
        # ranks' steps then fail too, as expected, and Ray would report those errors as unhandled.
        futures = [asyncio.wrap_future(ref.future()) for ref in self._send(seqs)]
        for future in futures:
            future.add_done_callback(lambda f: f.cancelled() or f.exception())
        return asyncio.ensure_future(self._gather(futures, sum(len(s.token_ids) for s in seqs)))

    async def _gather(self, futures: list[asyncio.Future], num_tokens: int) -> StepResult:
        started = time.monotonic()
        results = asyncio.gather(*futures)
        try:
            while True:
                try:
                    return self._finish(await asyncio.wait_for(asyncio.shield(results), self._wait_s(num_tokens, started)),
                                        num_tokens)
                except asyncio.TimeoutError:
                    await asyncio.to_thread(self._check_not_hung, started)
        except RayError as err:
            raise _worker_failed(err, len(self.stages) == 1) from err
        finally:
            results.cancel()
            results.add_done_callback(lambda f: f.cancelled() or f.exception())

    def _finish(self, results: list[StepResult], num_tokens: int) -> StepResult:
        step = self._merge(results)
        self.watchdog.observe(num_tokens, step.step_seconds)
        return step

    def _wait_s(self, num_tokens: int, started: float) -> float:
        """How long to wait for a step before asking whether a rank hangs (never past step_timeout_s in all)."""
        left = self.config.step_timeout_s - (time.monotonic() - started)
        return max(0.0, min(self.watchdog.limit(num_tokens), left))

    def _check_not_hung(self, started: float) -> None:
        """The step outran the watchdog's limit: GroupFailure if a rank does not answer (hung: SIGSTOP, a stuck
        process) or step_timeout_s has passed; a step whose ranks all answer is slow, not hung, and waited on."""
        waited = time.monotonic() - started
        hung = self.unresponsive_ranks()
        if hung:
            raise GroupFailure(f"TP rank(s) {hung} do not answer after a step ran {waited:.2f}s: hung", tuple(hung),
                               detect_s=time.monotonic() - started)
        if waited >= self.config.step_timeout_s:
            raise GroupFailure(f"a step took longer than step_timeout_s={self.config.step_timeout_s:g}s")
        log.warning("a step has run %.2fs, more than the watchdog's limit, but every rank answers: waiting on", waited)

    def unresponsive_ranks(self, known_lost: tuple[int, ...] = ()) -> list[int]:
        """Ranks that are dead or do not answer a ping within PING_TIMEOUT_S (known_lost: not asked again)."""
        refs = {rank: w.ping.remote() for rank, w in enumerate(self.workers) if rank not in known_lost}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=PING_TIMEOUT_S)
        lost = list(known_lost)
        for rank, ref in refs.items():
            try:
                if ref not in ready:
                    raise GetTimeoutError()
                ray.get(ref)
            except RayError:
                lost.append(rank)
        return sorted(lost)

    # ---- mending ---------------------------------------------------------------------

    def replace_lost_ranks(self, known_lost: tuple[int, ...] = ()) -> dict[str, float]:
        """Replace the ranks that died or hung; the survivors keep their processes, shards and KV caches, and so
        does the group's KV cache as a whole. A warm spare takes a lost rank's place where one is up (CPU); else a
        new rank process is started in the lost rank's bundle (GPU, or a spare that died too). Either takes the
        lost rank's shard and KV cache from the store (CPU: its files, mapped; GPU: its host copies). Returns the
        seconds each phase took. GroupFailure where it cannot (no store, a rank that does not come up): the group
        must be rebuilt."""
        if self.store_dirs is None:
            raise GroupFailure("this group keeps no rank's state outside its process (num_spare_ranks=0 on CPU, "
                               "gpu_host_copies off on GPU, or a lone rank)")
        tp = self.tp_size
        timeout = self.config.init_timeout_s
        clock = PhaseClock()
        phases, phase = clock.seconds, clock.end

        lost = self.unresponsive_ranks(known_lost)
        if not lost:
            raise GroupFailure("every rank answers: there is no rank to replace")
        for rank in lost:
            ray.kill(self.workers[rank], no_restart=True)  # a hung rank must not wake up into the new group
        phase("detect")
        survivors = [w for rank, w in enumerate(self.workers) if rank not in lost]
        cold: list[int] = []  # the lost ranks no spare takes: started in their places
        try:
            ray.get([w.abort.remote() for w in survivors], timeout=timeout)
            phase("abort")
            if self._refill is not None:
                self._refill.cancel()  # a replacement follows the last closely: its spares start now, not later
            if self.spares is not None:
                self._refill_spares(self.spares)
            # A rank is started in a lost one's place only where a rank of its stage survived: a live rank is what
            # says that the stage's node, and the store on it, are alive. Elsewhere (a TP=1 stage, a whole stage
            # lost) only a spare can take the place: one still starting is waited for, a dead one started again.
            kept = {i // tp for i in range(len(self.workers)) if i not in lost}
            for index in lost:  # (an index into self.workers: stage index // tp, rank index % tp)
                stage = index // tp
                pool = self.spares[stage] if self.spares is not None else None
                spare = pool.take(timeout_s=timeout, restart=stage not in kept) if pool is not None else None
                if spare is not None:
                    self.workers[index] = spare
                elif stage in kept:
                    cold.append(index)
                else:
                    raise GroupFailure(f"no spare took rank {index % tp}'s place in stage {stage}, and no rank of "
                                       "the stage survived to vouch for its node")
            phase("spare_join")
            if cold:
                self._start_in_place(cold, timeout)
                phase("start")
            bs = self.config.resolved_block_size()
            taken = ray.get([self._restore(index) if index in cold else self.workers[index].take_over.remote(
                index % tp, tp, self.store_dirs[index // tp], self.num_kv_blocks, bs) for index in lost],
                timeout=timeout)
            phase("shard_load")
            phases["kv_restore"] = max(info["kv_s"] for info in taken)
            phases["shard_load"] -= phases["kv_restore"]
            self.epoch, self.steps_sent = self.epoch + 1, 0
            self._connect(tp, timeout, self.epoch)
            phase("communicator")
        except (GetTimeoutError, RayError, GroupFailure) as err:
            for index in lost:  # a replacement that failed must not answer pings as if it were the lost rank
                ray.kill(self.workers[index], no_restart=True)
            if isinstance(err, GroupFailure):
                raise
            raise GroupFailure(f"replacing rank(s) {lost} failed: {type(err).__name__}: {err}") from err
        if self.spares is not None:
            # The next spare starts a little later: its start-up (imports, ~5 s of CPU here) would slow the
            # replayed steps, the last part of the pause.
            self._refill = threading.Timer(SPARE_REFILL_DELAY_S, self._refill_spares, args=(self.spares,))
            self._refill.start()
        log.warning("TP rank(s) %s replaced (%d by spares, %d started in place; pids %s); survivors kept their "
                    "processes: %s", lost, len(lost) - len(cold), len(cold), [info["pid"] for info in taken],
                    ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in phases.items()))
        return phases

    def _start_in_place(self, indices: list[int], timeout: float) -> None:
        """New rank processes for these lost ranks (indices into self.workers), each in its lost rank's bundle of the
        placement group, with its rank number: the bundle's CPUs or GPU are free once the lost process is gone."""
        tp = self.tp_size
        if not wait_until_gone([self.workers[i] for i in indices], KILLED_RANKS_EXIT_S):
            raise GroupFailure(f"lost rank(s) {indices} still answer {KILLED_RANKS_EXIT_S:g}s after being killed")
        for i in indices:
            self.workers[i] = self._new_stage_rank(i // tp, i % tp, tp)
        ray.get([self.workers[i].node_info.remote() for i in indices], timeout=timeout)  # up: imports done

    def _restore(self, index: int):
        """The call that gives a rank started in place the lost rank's shard and KV cache (worker.restore)."""
        cfg, stage = self.config, index // self.tp_size
        graph_limits = (cfg.max_num_seqs, self.max_model_len) if cfg.cuda_graphs else None
        return self.workers[index].restore.remote(self.model_path, cfg.attention_backend, self.store_dirs[stage],
                                                  self.num_kv_blocks, cfg.resolved_block_size(), cfg.expert_parallel,
                                                  self.stages[stage], graph_limits)

    def rebuild_stage(self, known_lost: tuple[int, ...] = ()) -> dict[str, float]:
        """A pipeline whose lost ranks cannot be replaced (no store: num_spare_ranks 0, or GPU without
        gpu_host_copies; a whole stage lost with its spares): start only their stage again,
        in the stage's bundle of the placement group (Ray places a bundle whose node is gone on another node that
        fits), loaded from the checkpoint; every other stage keeps its processes and weights. The stage's KV cache is
        gone, so the caller recomputes every running request over a fresh one. GroupFailure where it cannot (one
        stage, ranks lost in several stages, a stage that does not come up): the whole group is rebuilt instead."""
        if len(self.stages) == 1 or not self.workers:
            raise GroupFailure("a single TP group: nothing to keep")
        if self._refill is not None:
            self._refill.cancel()  # a spare started now would find the stage's new store still empty
        tp, timeout = self.tp_size, self.config.init_timeout_s
        clock = PhaseClock()
        phases, phase = clock.seconds, clock.end

        lost = self.unresponsive_ranks(known_lost)
        hit = {index // tp for index in lost}
        if len(hit) != 1:
            raise GroupFailure(f"ranks {lost} of stages {sorted(hit)} lost: not one stage")
        (stage,) = hit
        indices = range(stage * tp, (stage + 1) * tp)
        killed = [self.workers[i] for i in indices]
        for worker in killed:  # the stage's survivors too: its TP group is broken, and they are rebuilt with it
            ray.kill(worker, no_restart=True)
        phase("detect")
        survivors = [w for i, w in enumerate(self.workers) if i not in indices]
        try:
            ray.get([w.abort.remote() for w in survivors], timeout=timeout)
            phase("abort")
            # Until Ray has them dead (their GPU memory is then free for the new ranks).
            if not wait_until_gone(killed, KILLED_RANKS_EXIT_S):
                raise GroupFailure(f"stage {stage}'s ranks are not gone after {KILLED_RANKS_EXIT_S:g}s")
            for attempt in range(2):
                self._wait_placed()
                for i in indices:
                    self.workers[i] = self._new_stage_rank(stage, i % tp, tp)
                try:
                    infos = ray.get([self.workers[i].node_info.remote() for i in indices], timeout=timeout)
                    break
                except RayActorError:
                    # Placed on the lost node before Ray declared it dead (that takes its missed heartbeats): again,
                    # where Ray places the stage's bundle now.
                    if attempt:
                        raise
                    log.warning("stage %d's new ranks died with their node: starting them again", stage)
                    for i in indices:
                        ray.kill(self.workers[i], no_restart=True)
            old_node, self.node_ids[stage] = self.node_ids[stage], infos[0]["node_id"]
            phase("start")
            self.epoch, self.steps_sent = self.epoch + 1, 0
            self._connect(tp, timeout, self.epoch)
            phase("communicator")
            bs = self.config.resolved_block_size()
            store = self._renew_store(stage, old_node)
            ray.get([self._load(self.workers[i], stage, store) for i in indices], timeout=timeout)
            if self.spares is not None:
                self._refill_spares(self.spares)
            # Every rank's cache starts empty: the other stages' blocks are stale without the lost stage's.
            ray.get([w.init_kv_cache.remote(self.num_kv_blocks, bs) for w in self.workers], timeout=timeout)
            phase("shard_load")
        except (GetTimeoutError, RayError) as err:
            raise GroupFailure(f"rebuilding stage {stage} failed: {type(err).__name__}: {err}") from err
        log.warning("stage %d of the pipeline rebuilt on node %s; the other stages kept their processes: %s", stage,
                    self.node_ids[stage], ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in phases.items()))
        return phases

    def _renew_store(self, stage: int, old_node: str) -> str | None:
        """A rebuilt stage's ranks keep their shards and caches in a new store (where the group keeps stores): the
        old one holds the lost ranks' files, which a later replacement must not take. The old one is removed (in
        the background: its node may be gone), and the stage's spares, built over it, are replaced by new ones."""
        if self.store_dirs is None:
            return None
        old, self.store_dirs[stage] = self.store_dirs[stage], new_store_dir()
        threading.Thread(target=self._remove_store, args=(old_node, old), name="raytp-remove-store", daemon=True).start()
        with self._refill_lock:
            if self.spares is not None:
                self.spares[stage].shutdown()  # (a new pool is filled once the new ranks have written the store)
                self.spares[stage] = SparePool(functools.partial(self._start_spare, stage), self.config.num_spare_ranks)
        return self.store_dirs[stage]

    def _wait_placed(self) -> None:
        """Wait up to placement_timeout_s for every bundle of the placement group to be placed (Ray places a bundle
        whose node is gone again, on another node that fits, if any); GroupFailure if one is not."""
        deadline = time.monotonic() + self.config.placement_timeout_s
        while (state := ray.util.placement_group_table(self.pg).get("state")) != "CREATED":
            if time.monotonic() > deadline:
                raise GroupFailure(f"the placement group is {state} after placement_timeout_s="
                                   f"{self.config.placement_timeout_s:g}s: a stage's bundle has no node to go to")
            time.sleep(0.1)

    def can_place(self, tp_size: int, wait_s: float = 1.0) -> bool:
        """Whether a group of tp_size could be placed now (probes with a placement group that is removed again)."""
        probe = self._placement_group(tp_size)
        try:
            ray.get(probe.ready(), timeout=wait_s)
            return True
        except GetTimeoutError:
            return False
        finally:
            remove_placement_group(probe)

    def check_health(self) -> None:
        if not self.workers:
            raise GroupFailure("the TP group is not running")
        t0 = time.monotonic()
        lost = self.unresponsive_ranks()
        if lost:
            raise GroupFailure(f"TP rank(s) {lost} do not answer a ping: dead or hung", tuple(lost),
                               detect_s=time.monotonic() - t0)

    def worker_pids(self) -> list[int]:
        return [info["pid"] for info in ray.get([w.node_info.remote() for w in self.workers], timeout=10)]

    def spares_ready(self, timeout_s: float) -> int:
        """Wait up to timeout_s for the group's spares to be up (a spare comes up ~5-10 s after its group);
        how many are."""
        return sum(pool.wait_ready(timeout_s) for pool in self.spares) if self.spares is not None else 0

    def _refill_spares(self, pools: list[SparePool]) -> None:
        with self._refill_lock:
            if pools is self.spares:  # not shut down or rebuilt meanwhile
                for pool in pools:
                    pool.fill()

    def shutdown(self) -> None:
        if self._refill is not None:
            self._refill.cancel()
        # ray.kill ends a rank at once, even one blocked in a collective with a dead peer, and runs no Python
        # teardown (so no ncclCommDestroy, which would wait for that peer).
        killed, self.workers = self.workers, []
        for w in killed:
            ray.kill(w, no_restart=True)
        if self.device == "cuda" and not wait_until_gone(killed, KILLED_RANKS_EXIT_S):
            # A group placed on the same GPUs now would size its KV cache around the memory they still hold.
            log.warning("killed TP ranks still answer after %gs: the next group may find their GPUs' memory taken",
                        KILLED_RANKS_EXIT_S)
        with self._refill_lock:
            for pool in self.spares or []:
                pool.shutdown()
            self.spares = None
        for node_id, store_dir in zip(self.node_ids, self.store_dirs or []):
            self._remove_store(node_id, store_dir)
        self.store_dirs = None
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None
        self.tp_size = 0

    @staticmethod
    def _remove_store(node_id: str, store_dir: str) -> None:
        """A stage's shards and KV caches go with the group, from its node (this replica may be elsewhere)."""
        if ray.get_runtime_context().get_node_id() == node_id:
            remove_store(store_dir)
            return
        try:
            strategy = NodeAffinitySchedulingStrategy(node_id, soft=False)
            ray.get(_remove_store_on_node.options(scheduling_strategy=strategy).remote(store_dir), timeout=30)
        except (GetTimeoutError, RayError) as err:  # the node is gone, and its memory with it
            log.warning("could not remove %s on node %s: %s", store_dir, node_id, err)


@ray.remote(num_cpus=0)
def _remove_store_on_node(store_dir: str) -> None:
    remove_store(store_dir)


def _worker_failed(err: RayError, one_stage: bool = True) -> GroupFailure:
    cause = getattr(err, "cause", None)
    if isinstance(cause, CollectiveAborted):  # a survivor saw a peer's process exit, or its step was aborted
        # (The rank it names is one of its own TP group's: in a pipeline, of a stage it does not say, so there the
        # ranks are asked instead.)
        exited = () if cause.exited_rank is None or not one_stage else (cause.exited_rank,)
        return GroupFailure(f"a TP worker's step was aborted: {cause}", exited)
    return GroupFailure(f"a TP worker failed: {type(err).__name__}: {err}")
