"""CPU ranks on cores of their own.

A CPU rank runs its torch threads flat out; when the Serve proxy, the replica
and Ray's daemons may run on the same cores, the scheduler keeps preempting it
(measured on a 2-core machine: a burst of 32 over HTTP at TP=1 went from
353-419 to 490-528 output tok/s once the rank, and nothing else, had a core). So:

- each rank claims `cpus_per_rank` cores on its node, lowest free first, and
  pins its compute thread to them (`bind_rank`). Claims live in one small
  file per node, under a lock, keyed by process id: a dead rank's cores are
  free again, so a rebuilt group claims them anew;
- `raytp serve`, when it starts Ray itself, moves itself (and so every Ray
  process it starts: the proxy, the replica, the daemons) onto the cores the
  ranks will not use, if the node has any (`keep_off_rank_cores`).

Where cores cannot be claimed (more ranks than cores, an affinity call that
fails), the rank logs why and runs unpinned, as before.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import tempfile

log = logging.getLogger(__name__)

_CLAIMS = os.path.join(tempfile.gettempdir(), "raytp-cpu-claims.json")


def _node_cores() -> list[int]:
    """Cores this node lets us use (the container's set, not this process's current mask)."""
    try:
        return sorted(os.sched_getaffinity(1))
    except OSError:
        return list(range(os.cpu_count() or 1))


def _alive(pid: int) -> bool:
    """Whether `pid` still runs (a killed rank that is not reaped yet is a zombie: not alive)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def claim_cores(count: int, claims_path: str = _CLAIMS) -> list[int] | None:
    """Claim `count` free cores of this node for this process (lowest first), or None if too few are free."""
    with open(claims_path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        try:
            claims = {int(pid): cores for pid, cores in json.loads(f.read() or "{}").items()}
        except ValueError:
            claims = {}
        claims = {pid: cores for pid, cores in claims.items() if pid != os.getpid() and _alive(pid)}
        taken = {c for cores in claims.values() for c in cores}
        free = [c for c in _node_cores() if c not in taken]
        mine = free[:count] if len(free) >= count else None
        if mine is not None:
            claims[os.getpid()] = mine
        f.seek(0)
        f.truncate()
        f.write(json.dumps({str(pid): cores for pid, cores in claims.items()}))
    return mine


def bind_rank(num_threads: int) -> list[int] | None:
    """Pin the calling thread (and the torch threads it starts later) to `num_threads` cores of its own."""
    try:
        cores = claim_cores(num_threads)
        if cores is None:
            log.warning("fewer than %d free cores on this node: the rank runs unpinned", num_threads)
            return None
        os.sched_setaffinity(0, cores)
    except OSError as err:
        log.warning("could not pin the rank to cores of its own (%s): it runs unpinned", err)
        return None
    log.info("rank pinned to cores %s", cores)
    return cores


def keep_off_rank_cores(rank_cores: int) -> list[int] | None:
    """Move this process (and what it starts from now on) to the cores past the first `rank_cores`, if any."""
    cores = _node_cores()
    rest = cores[rank_cores:]
    if not rest:
        return None
    try:
        os.sched_setaffinity(0, rest)
    except OSError as err:
        log.warning("could not move off the ranks' cores (%s)", err)
        return None
    return rest
