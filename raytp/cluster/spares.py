"""Warm spare ranks: processes that have started and prepared everything, waiting to take a dead rank's place.

Starting a rank's process costs seconds (Ray starts a worker, Python imports
torch and raytp, the CPU ops load), and it would all fall inside the pause of
every running request. A spare pays for it while the group serves, and
builds every rank's model over the group's shard store in advance. A CPU spare
reserves no CPU while it waits (it sleeps, on the group's node); once it takes
a rank's place it computes on the CPU that the dead rank's bundle still holds
in the group's placement group, so the group never needs more than it placed.
"""
from __future__ import annotations

import logging
from typing import Callable

import ray

log = logging.getLogger(__name__)

PING_TIMEOUT_S = 2.0  # a spare that is up answers a ping at once: its Ray calls have threads of their own


class SparePool:
    def __init__(self, start_spare: Callable[[], tuple["ray.actor.ActorHandle", "ray.ObjectRef"]], size: int):
        """start_spare() creates one spare actor (on the group's node) and returns it with the call that says it
        is ready; the pool keeps `size` of them."""
        self._start_spare, self.size = start_spare, size
        self._spares: list[tuple[ray.actor.ActorHandle, ray.ObjectRef]] = []  # (spare, the call that says it is ready)

    @property
    def handles(self) -> list["ray.actor.ActorHandle"]:
        """The pool's spares, up or starting."""
        return [spare for spare, _ in self._spares]

    def fill(self) -> None:
        """Start spares until the pool has `size` (returns at once: they come up in the background)."""
        while len(self._spares) < self.size:
            self._spares.append(self._start_spare())
            log.info("starting a spare TP rank (%d of %d)", len(self._spares), self.size)

    def take(self, timeout_s: float, restart: bool = False) -> ray.actor.ActorHandle | None:
        """A spare that is up (waiting up to timeout_s for one still starting), or None. A spare that died or did not
        come up is dropped; where none is left, `restart` starts a new one and waits for it, once (the caller that
        can start a rank in the lost one's place itself, at the same cost, passes False). The pool is filled again
        after the replacement."""
        for attempt in range(2):
            while self._spares:
                spare, ready = self._spares.pop(0)
                try:
                    pid = ray.get(ready, timeout=timeout_s)
                    # Up once is not up now: a spare can die too (with its node: then the ping would wait until Ray
                    # declares the node dead). A live one answers in milliseconds.
                    ray.get(spare.ping.remote(), timeout=min(timeout_s, PING_TIMEOUT_S))
                    log.info("spare TP rank pid %d takes over", pid)
                    return spare
                except Exception as err:  # noqa: BLE001 - a spare that is not up is of no use: the next one
                    log.warning("a spare TP rank is not up (%s): dropped", type(err).__name__)
                    ray.kill(spare, no_restart=True)
            if not restart or attempt:
                return None
            self.fill()
        return None

    def wait_ready(self, timeout_s: float) -> int:
        """Wait up to timeout_s for the spares starting now; how many are up."""
        refs = [ready for _, ready in self._spares]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s) if refs else ([], [])
        return len(done)

    def shutdown(self) -> None:
        for spare, _ in self._spares:
            ray.kill(spare, no_restart=True)
        self._spares = []
