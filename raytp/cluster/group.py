"""TPGroup: one tensor-parallel group on Ray.

A STRICT_PACK placement group with one bundle per rank puts every rank on one
node; one TPWorkerActor per bundle; rank 0 makes the rendezvous (gloo
address or NCCL unique id) and it reaches the other ranks as an argument of
their init call. Every wait has a timeout: nothing here hangs.
"""
from __future__ import annotations

import asyncio
import logging
import time

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError, WorkerCrashedError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from raytp.config import EngineConfig
from raytp.cluster.executor import (Executor, GroupFailure, PlacementError, choose_num_kv_blocks, profile_seq_lens,
                            warm_up_tokens)
from raytp.engine.step import SeqStep, StepResult
from raytp.cluster.worker_actor import MAX_CONCURRENT_CALLS, TPWorkerActor

log = logging.getLogger(__name__)


def _largest_node(resource: str) -> tuple[float, float]:
    """(most of `resource` on one alive node, free in the whole cluster)."""
    totals = [n["Resources"].get(resource, 0.0) for n in ray.nodes() if n.get("Alive")]
    return max(totals, default=0.0), ray.available_resources().get(resource, 0.0)


def _bundle(device: str, cpus: int) -> dict[str, float]:
    return {"GPU": 1, "CPU": cpus} if device == "cuda" else {"CPU": cpus}


class TPGroup(Executor):
    def __init__(self, config: EngineConfig, model_path: str, max_model_len: int):
        self.config, self.model_path, self.max_model_len = config, model_path, max_model_len
        self.device, self.dtype = config.resolved_device(), config.resolved_dtype()
        self.pg = None
        self.workers: list = []
        self.tp_size, self.num_kv_blocks = 0, 0
        self.steps_sent = 0  # steps sent to the current workers: the next one's number
        self.rebuilding = False  # started before: requests may be waiting for this start

    # ---- building ----------------------------------------------------------------

    def _place(self, tp_size: int) -> None:
        bundles = [_bundle(self.device, self.config.cpus_per_rank) for _ in range(tp_size)]
        self.pg = placement_group(bundles, strategy="STRICT_PACK")
        try:
            ray.get(self.pg.ready(), timeout=self.config.placement_timeout_s)
        except GetTimeoutError:
            remove_placement_group(self.pg)
            self.pg = None
            resource = "GPU" if self.device == "cuda" else "CPU"
            per_rank = 1 if self.device == "cuda" else self.config.cpus_per_rank
            largest, free = _largest_node(resource)
            raise PlacementError(
                f"tensor_parallel_size={tp_size} needs {tp_size * per_rank} {resource}s on one node "
                f"({per_rank} per rank); "
                f"the largest node has {largest:g} {resource}s in total and the cluster has {free:g} free "
                f"(waited {self.config.placement_timeout_s:g}s)"
            ) from None

    def start(self, tp_size: int) -> None:
        t0 = time.monotonic()
        timeout = self.config.init_timeout_s
        self._place(tp_size)
        try:
            actor = ray.remote(TPWorkerActor)
            self.steps_sent = 0
            self.workers = [
                actor.options(
                    max_concurrency=MAX_CONCURRENT_CALLS,
                    num_cpus=self.config.cpus_per_rank,
                    num_gpus=1 if self.device == "cuda" else 0,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=rank),
                ).remote(rank, tp_size, self.device, self.dtype, self.config.seed,
                         self.config.cpus_per_rank if self.device == "cpu" else None, self.config.cpu_binding)
                for rank in range(tp_size)
            ]
            infos = ray.get([w.node_info.remote() for w in self.workers], timeout=timeout)
            for info in infos:
                log.info("TP rank %d/%d: node %s (%s) pid %d gpu %s %s", info["rank"], tp_size, info["node_ip"],
                         info["hostname"], info["pid"], ",".join(info["gpu_ids"]) or "-", info["gpu_uuid"] or "")
            if self.device == "cuda" and tp_size > 1:
                # Asked of NVML on the ranks' node (this replica may be elsewhere), by each rank's GPU UUID.
                uuids = [info["gpu_uuid"] for info in infos]
                warning = ray.get(self.workers[0].check_nvlink.remote(uuids, self.config.require_nvlink), timeout=timeout)
                if warning:
                    log.warning(warning)
                else:
                    log.info("the %d GPUs of the TP group are all NVLink-connected", tp_size)
            rendezvous = ray.get(self.workers[0].make_rendezvous.remote(self.config.cpu_collectives), timeout=timeout)
            backends = ray.get([w.init_communicator.remote(rendezvous, timeout) for w in self.workers], timeout=timeout)
            log.info("TP group of %d ranks connected over %s", tp_size, backends[0])
            ray.get([w.load.remote(self.model_path, self.config.attention_backend, self.config.pack_weights) for w in self.workers],
                    timeout=timeout)
            bs = self.config.block_size
            profile = profile_seq_lens(self.config, self.max_model_len)
            capacity = min(ray.get([w.max_kv_blocks.remote(bs, self.config.gpu_memory_utilization, profile)
                                    for w in self.workers], timeout=timeout))
            self.num_kv_blocks = choose_num_kv_blocks(self.config, self.max_model_len, capacity)
            ray.get([w.init_kv_cache.remote(self.num_kv_blocks, bs) for w in self.workers], timeout=timeout)
            warm_tokens = warm_up_tokens(self.config)
            kernels_up_to_seqs = 0 if self.rebuilding else self.config.max_num_seqs
            warm = ray.get([w.warm_up.remote(warm_tokens, kernels_up_to_seqs) for w in self.workers], timeout=timeout)
            log.info("TP group warmed up with one %d-token step in %.2fs", warm_tokens, max(warm))
        except BaseException as err:
            self.shutdown()
            if isinstance(err, GetTimeoutError):
                raise GroupFailure(f"TP group of {tp_size} did not start within {timeout:g}s") from err
            if isinstance(err, (RayActorError, WorkerCrashedError)):  # a rank died while starting: worth a retry
                raise GroupFailure(f"a rank of the TP group of {tp_size} died while starting: {err}") from err
            raise  # anything a rank raised itself (a bad checkpoint, a KV cache too small) is permanent
        self.tp_size, self.rebuilding = tp_size, True
        log.info("TP group ready: tp=%d, %d KV blocks of %d tokens per rank, %.1fs", tp_size, self.num_kv_blocks, bs,
                 time.monotonic() - t0)

    # ---- running -----------------------------------------------------------------

    @staticmethod
    def _merge(results: list[StepResult]) -> StepResult:
        # Each rank feeds its own samples back in as PREVIOUS_TOKEN, so ranks that disagree would
        # silently compute different sequences: never expected (same logits, same seeds), so it is a bug.
        tokens = results[0].token_ids
        for rank, r in enumerate(results[1:], start=1):
            if r.token_ids != tokens:
                raise RuntimeError(f"TP rank {rank} sampled {r.token_ids} where rank 0 sampled {tokens}")
        # The ranks wait for each other in every collective: the slowest rank's time is the step's.
        leads = [r.lead_seconds for r in results]
        return StepResult(tokens, max(r.collective_seconds for r in results), max(r.step_seconds for r in results),
                          results[0].logprobs, None if None in leads else min(leads))  # the last rank to get it

    def _send(self, seqs: list[SeqStep]) -> list:
        # Without task events: steps come tens of times a second, and each one's events would cost the caller, the
        # rank and the GCS (which would keep up to 100k of them) for a task table nobody reads.
        number, self.steps_sent = self.steps_sent, self.steps_sent + 1
        return [w.run_step.options(enable_task_events=False).remote(number, seqs) for w in self.workers]

    def execute(self, seqs: list[SeqStep]) -> StepResult:
        refs = self._send(seqs)
        deadline = time.monotonic() + self.config.step_timeout_s
        pending = list(refs)
        try:
            # Collect results as they come, so a dead rank is noticed at once even
            # while the surviving ranks still wait for it inside a collective.
            while pending:
                done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
                if not done:
                    raise self._too_slow()
                ray.get(done)
            return self._merge(ray.get(refs))
        except RayError as err:
            raise _worker_failed(err) from err

    def submit(self, seqs: list[SeqStep]):
        # The calls go out now; each actor runs its calls in the order they were sent.
        refs = self._send(seqs)
        return asyncio.ensure_future(self._gather(refs))

    async def _gather(self, refs) -> StepResult:
        try:
            results = await asyncio.wait_for(asyncio.gather(*refs), timeout=self.config.step_timeout_s)
            return self._merge(results)
        except asyncio.TimeoutError:
            raise self._too_slow() from None
        except RayError as err:
            raise _worker_failed(err) from err

    def _too_slow(self) -> GroupFailure:
        return GroupFailure(f"a step took longer than step_timeout_s={self.config.step_timeout_s:g}s")

    def can_place(self, tp_size: int, wait_s: float = 1.0) -> bool:
        """Whether a group of tp_size could be placed now (probes with a placement group that is removed again)."""
        probe = placement_group([_bundle(self.device, self.config.cpus_per_rank) for _ in range(tp_size)], strategy="STRICT_PACK")
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
        try:
            ray.get([w.ping.remote() for w in self.workers], timeout=10)
        except (GetTimeoutError, RayError) as err:
            raise GroupFailure(f"a TP worker does not answer: {type(err).__name__}") from err

    def worker_pids(self) -> list[int]:
        return [info["pid"] for info in ray.get([w.node_info.remote() for w in self.workers], timeout=10)]

    def shutdown(self) -> None:
        # ray.kill ends a rank at once, even one blocked in a collective with a dead peer, and runs no Python
        # teardown (so no ncclCommDestroy, which would wait for that peer).
        for w in self.workers:
            ray.kill(w, no_restart=True)
        self.workers = []
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None
        self.tp_size = 0


def _worker_failed(err: RayError) -> GroupFailure:
    return GroupFailure(f"a TP worker failed: {type(err).__name__}: {err}")
