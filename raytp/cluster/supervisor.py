"""The elastic policy: build the TP group, rebuild it when it fails, degrade, grow back, resize.

The supervisor owns the executor (the group) and decides when and at which
TP degree it is (re)built; the engine calls it at step boundaries and never
the other way round. What it does when a step fails, cheapest first:

- **replace**: the ranks that died or hang are replaced (by warm spares, or
  by new rank processes started in their places) that take over their shards
  and KV caches; the survivors keep theirs, and the engine replays only the
  steps that were in flight;
- **rebuild**: where that cannot be done (nothing kept outside the ranks:
  num_spare_ranks 0 on CPU, gpu_host_copies off on GPU; a replacement that
  fails), the group is built again and every running request is recomputed: in
  a pipeline only the stage that lost ranks, where it can, the other stages
  keeping their processes and weights; else from nothing; a group failure and a placement timeout are transient and
  retried with backoff, at a smaller degree (**degrade**) if the old one no
  longer fits (down to min_tensor_parallel_size);
- anything else (a bad checkpoint, a refused topology, a KV cache too small
  for one sequence) is permanent: it fails at once, with its message, instead
  of being retried forever.

A request that brings the group down every time must not keep it down: past
max_recoveries failures within recovery_window_s, the requests that were in
every one of those failed steps are failed alone (note_failure).
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Callable

from raytp.config import EngineConfig
from raytp.cluster.executor import Executor, GroupFailure, PlacementError
from raytp.model.llama import ModelArgs, check_tp_degree, valid_tp_degrees

log = logging.getLogger(__name__)

TRANSIENT = (GroupFailure, PlacementError)


class PipelineUnplaceable(RuntimeError):
    """A pipeline's stages do not fit the cluster even at min_tensor_parallel_size: permanent, not retried."""


class Supervisor:
    def __init__(self, config: EngineConfig, args: ModelArgs, executor: Executor,
                 on_new_group: Callable[[int], None], metrics=None):
        """on_new_group(num_kv_blocks) is called after every (re)build: the engine takes the new, empty KV cache."""
        self.config, self.args, self.executor = config, args, executor
        self.on_new_group, self.metrics = on_new_group, metrics
        self.target_tp = config.tensor_parallel_size
        self.restarts = 0  # recoveries and resizes
        self.recoveries: collections.Counter[str] = collections.Counter()  # by kind: replace, rebuild, degrade
        self._failures: list[tuple[float, frozenset[str]]] = []  # (when, requests in the failed step) in the window
        self.last_recovery_s: float | None = None
        self.pending_resize: int | None = None
        self.grow_check_interval_s = 10.0
        self._next_grow_check = 0.0
        self._grow_probe: asyncio.Task | None = None
        self._grow_ready = False

    @property
    def tp_size(self) -> int:
        return self.executor.tp_size

    def start(self) -> None:
        """Build the group at the target TP degree, or the largest smaller one that fits (degraded mode)."""
        sizes = [t for t in valid_tp_degrees(self.args, self.target_tp, self.config.expert_parallel) if t >= self.config.min_tensor_parallel_size]
        for tp in sorted(sizes, reverse=True):
            try:
                self.executor.start(tp)
                break
            except PlacementError as err:
                if tp == min(sizes):
                    if self.config.pipeline_parallel_size > 1:
                        # A pipeline that no longer fits (a lost node and no spare one) is not waited for: a clear
                        # error, and Serve replaces the replica where the cluster has room.
                        raise PipelineUnplaceable(f"the pipeline cannot be placed: {err}") from None
                    raise
                log.warning("%s; trying a smaller TP degree", err)
        if self.executor.tp_size != self.target_tp:
            log.warning("running degraded at tensor_parallel_size=%d (target %d)", self.executor.tp_size, self.target_tp)
        self.on_new_group(self.executor.num_kv_blocks)

    def note_failure(self, request_ids: set[str]) -> set[str]:
        """A step with these requests in it failed. Past max_recoveries failures in recovery_window_s: the requests
        that were in every one of them (the engine fails those alone), else none. Failures with no request in
        common are not a request's doing (chaos, a flaky node): the group goes on being mended."""
        now = time.monotonic()
        self._failures = [(t, ids) for t, ids in self._failures if now - t <= self.config.recovery_window_s]
        self._failures.append((now, frozenset(request_ids)))
        if len(self._failures) <= self.config.max_recoveries:
            return set()
        culprits = frozenset.intersection(*(ids for _, ids in self._failures))
        log.error("%d recoveries within %gs; requests in every failed step: %s", len(self._failures),
                  self.config.recovery_window_s, sorted(culprits) or "none")
        if culprits:
            self._failures = []
        return set(culprits)

    def replace(self, failure: GroupFailure) -> bool:
        """Mend the group by replacing its lost ranks (runs off the event loop); False where that cannot be done
        and the group must be rebuilt (the KV cache is then lost)."""
        t0 = time.monotonic()
        log.warning("replacing the lost TP rank(s) (%s)", failure)
        phases = self._mend(self.executor.replace_lost_ranks, failure, "replacing ranks", "rebuilding it")
        if phases is None:
            return False
        self._recovered("replace", phases, t0)
        return True

    def rebuild_stage(self, failure: GroupFailure) -> bool:
        """A pipeline that could not replace its lost ranks: rebuild only their stage (runs off the event loop, with
        the running requests preempted: every KV cache starts empty); False where the whole group must be rebuilt."""
        t0 = time.monotonic()
        phases = self._mend(self.executor.rebuild_stage, failure, "rebuilding one stage", "rebuilding it all")
        if phases is None:
            return False
        self.on_new_group(self.executor.num_kv_blocks)
        self._recovered("rebuild", phases, t0)
        return True

    @staticmethod
    def _mend(mend: Callable[[tuple[int, ...]], dict[str, float]], failure: GroupFailure, how: str,
              instead: str) -> dict[str, float] | None:
        """Run one of the executor's ways of mending the group on the ranks the failure lost: the seconds each phase
        took, the failure's detection included; None (logged) where it cannot, and `instead` is done."""
        try:
            phases = mend(failure.lost_ranks)
        except GroupFailure as err:
            log.warning("the group cannot be mended by %s (%s): %s", how, err, instead)
            return None
        phases["detect"] += failure.detect_s
        return phases

    def rebuild(self, reason: str, recovery: bool = True) -> float:
        """Tear the group down and build it again at target_tp (nothing may be running). Returns seconds taken."""
        t0 = time.monotonic()
        log.warning("rebuilding the TP group (%s)", reason)
        self.executor.shutdown()
        torn_down = time.monotonic()
        self.start()
        degraded = self.executor.tp_size < self.target_tp
        phases = {"teardown": torn_down - t0, "start": time.monotonic() - torn_down}
        self._recovered(("degrade" if degraded else "rebuild") if recovery else None, phases, t0)
        log.warning("TP group rebuilt at tensor_parallel_size=%d in %.1fs", self.executor.tp_size, self.last_recovery_s)
        return self.last_recovery_s

    def _recovered(self, kind: str | None, phases: dict[str, float], t0: float) -> None:
        """Count a recovery of this kind (None: a resize or a grow-back) and record its phases."""
        self.restarts += 1
        self.last_recovery_s = time.monotonic() - t0
        if kind is not None:
            self.recoveries[kind] += 1
        if self.metrics:
            self.metrics.on_group(self.executor.tp_size, restarted=True, attention_backend=self.executor.attention_backend)
            if kind is not None:
                self.metrics.on_recovery(kind, phases)

    async def rebuild_until_done(self, reason: str, recovery: bool = True) -> float:
        """rebuild() off the event loop, retried with backoff while it fails transiently; a permanent error raises."""
        attempt = 0
        while True:
            try:
                return await asyncio.to_thread(self.rebuild, reason, recovery)
            except TRANSIENT as err:
                attempt += 1
                log.error("rebuilding the TP group failed (attempt %d): %s; retrying", attempt, err)
                await asyncio.sleep(min(30.0, 2.0**attempt))

    # ---- resize and grow back (decided at step boundaries) ---------------------------

    def request_resize(self, tp_size: int) -> bool:
        """Ask for a reshard to tp_size at the next step boundary; False if there is nothing to do."""
        check_tp_degree(self.args, tp_size, self.config.expert_parallel)
        if tp_size == self.target_tp and tp_size == self.tp_size:
            return False
        self.pending_resize = tp_size
        return True

    def wanted_rebuild(self) -> str | None:
        """Why the group should be rebuilt at the next step boundary (a resize, or room to grow back), if at all.

        Degraded (smaller than the target), it probes in the background, every
        grow_check_interval_s, whether the missing ranks fit now. Runs on the event loop.
        """
        if self.pending_resize is not None:
            return f"resize to tensor_parallel_size={self.pending_resize}"
        probe = self._grow_probe
        if probe is not None and probe.done():
            self._grow_probe = None
            self._grow_ready = not probe.cancelled() and probe.exception() is None and probe.result()
        if self._grow_ready:
            return f"resources are back: growing to tensor_parallel_size={self.target_tp}"
        missing = self.target_tp - self.tp_size
        if probe is None and missing > 0 and time.monotonic() >= self._next_grow_check:
            self._next_grow_check = time.monotonic() + self.grow_check_interval_s
            # The current group keeps its own resources until the rebuild, so probe for the missing ranks only.
            self._grow_probe = asyncio.create_task(asyncio.to_thread(self.executor.can_place, missing))
        return None

    def take_rebuild(self) -> None:
        """The wanted rebuild is about to happen: a pending resize becomes the target."""
        if self.pending_resize is not None:
            self.target_tp, self.pending_resize = self.pending_resize, None
        self._grow_ready = False

    def shutdown(self) -> None:
        self.executor.shutdown()
