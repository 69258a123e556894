"""TPWorkerActor: a TPWorker as a Ray actor whose steps run on a thread of their own
(processes named `ray::TPWorkerActor`).

A Ray actor with one thread takes its next call only after it has returned
the current one: it pickles the result, then receives and unpickles the next
step's arguments, all on the rank's core while the rank computes nothing. In
an HTTP burst on a 2-core machine the rank was 90.6% busy (idle a median 1.4
ms between steps, a mean 2.7), and whenever the rank's core went idle the
kernel could put another process there (the load generator, the proxy),
which then shared the core with the next step: the burst's steps summed
1.38x their time in a process that had the core to itself.

So Ray's calls run on a few threads of their own, off the rank's cores: the
call that brings step N+1 (sent ahead by the engine, see pacing.py) is
received and unpickled while step N runs, and hands the step to the step
thread, pinned to the rank's cores, which goes from one step straight to the
next. Calls on a threaded actor may start out of order, so each step carries
its number and the step thread runs them by number. Each result says how
early its step arrived (`StepResult.lead_seconds`), so that the engine learns
how far ahead to send steps (pacing.py).

When a peer dies, the Ray threads stay free for the calls that mend the
group while the step thread may be stuck in a collective: `abort` releases it
(and the queued steps fail), `init_communicator(..., epoch)` waits until the
step thread is idle and connects the rank to the new communicator; steps
are then numbered from 0 again under the new epoch, and a step of an older
epoch is refused. A spare (rank < 0) waits with its imports done and no
step thread until `take_over` gives it a dead rank's index.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future

import torch

from raytp.cluster.comm import CollectiveAborted
from raytp.cluster.cpu_binding import bind_rank
from raytp.engine.step import SeqStep, StepResult
from raytp.cluster.worker import TPWorker

# Ray calls one rank may run at once: the running step's, the next step's, and a health check or two.
MAX_CONCURRENT_CALLS = 4
SPARE_RANK = -1  # the rank a spare is created with


class TPWorkerActor(TPWorker):
    def __init__(self, rank: int, world_size: int, device: str, dtype: str, seed: int = 0,
                 num_threads: int | None = None, bind_cores: bool = False):
        super().__init__(rank, world_size, device, dtype, seed, num_threads)
        self._queue_changed = threading.Condition()
        # step number -> (its rows, its result, when it arrived)
        self._queued: dict[int, tuple[list[SeqStep], Future, float]] = {}
        self._next_step = 0
        self._epoch = 0  # communicators joined so far - 1: steps of another epoch are refused
        self._running = False  # the step thread is inside a step
        self._bind_cores = bind_cores
        if rank != SPARE_RANK:
            self._start_step_thread()

    def _start_step_thread(self) -> None:
        threading.Thread(target=self._run_steps, name="raytp-steps", daemon=True).start()

    def run_step(self, epoch: int, number: int, seqs: list[SeqStep]) -> StepResult:
        """Run step `number` (0, 1, ... since the rank joined this epoch's communicator) once every earlier step
        has run; its result."""
        result: Future = Future()
        with self._queue_changed:
            if epoch != self._epoch:
                raise CollectiveAborted(f"rank {self.rank}: step {number} of epoch {epoch} arrived in epoch {self._epoch}")
            self._queued[number] = (seqs, result, time.perf_counter())
            self._queue_changed.notify()
        return result.result()

    def prepare_spare(self, model_path: str, attention_backend: str, store_dir: str, world_size: int,
                      expert_parallel: bool = False, stage=None) -> int:
        """Once a spare is up: do now what taking a rank's place would otherwise do inside the pause (build every
        rank's model from the store); its process id."""
        super().prepare_spare(model_path, attention_backend, store_dir, world_size, expert_parallel, stage)
        return os.getpid()

    def take_over(self, *args, **kwargs) -> dict:
        info = super().take_over(*args, **kwargs)
        self._start_step_thread()
        return info

    def abort(self) -> None:
        """A peer died or hung: release the running step from its collective, fail the steps queued behind it."""
        self.abort_communicator()
        self._fail_queued("the group lost a rank")

    def init_communicator(self, rendezvous, timeout_s: float = 60.0, epoch: int = 0) -> str:
        if epoch:  # rejoining: the aborted step must be out of the way, and numbering starts again
            deadline = time.monotonic() + timeout_s
            with self._queue_changed:
                while self._running:
                    if not self._queue_changed.wait(timeout=max(0.0, deadline - time.monotonic())):
                        raise TimeoutError(f"rank {self.rank}: its step did not end within {timeout_s:g}s of the abort")
                self._epoch, self._next_step = epoch, 0
            self._fail_queued("the group was mended")
        return super().init_communicator(rendezvous, timeout_s, epoch)

    def _fail_queued(self, why: str) -> None:
        with self._queue_changed:
            for _, result, _ in self._queued.values():
                result.set_exception(CollectiveAborted(f"rank {self.rank}: {why}"))
            self._queued.clear()

    def _run_steps(self) -> None:
        if self.device == "cuda":
            torch.cuda.set_device(self.cuda_index)  # the current device is per thread
        elif self.num_threads and self._bind_cores:
            # This thread computes the steps (and starts torch's threads, which inherit the binding); the thread
            # count TPWorker set is the process's.
            bind_rank(self.num_threads, group_cores=self.world_size * self.num_threads)
        previous_end = time.perf_counter()
        while True:
            with self._queue_changed:
                while self._next_step not in self._queued:
                    self._queue_changed.wait()
                seqs, result, arrived = self._queued.pop(self._next_step)
                self._next_step += 1
                self._running = True
            try:
                step = self.execute(seqs)
                step.lead_seconds = previous_end - arrived  # < 0: this rank waited that long for the step
                result.set_result(step)
            except BaseException as err:  # the Ray call that brought the step raises it
                result.set_exception(err)
            previous_end = time.perf_counter()
            with self._queue_changed:
                self._running = False
                self._queue_changed.notify_all()
