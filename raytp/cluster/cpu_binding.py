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
  ranks will not use, if the node has any (`keep_off_rank_cores`);
- where the node has cores left over for everything else, a rank's compute
  thread also runs at a higher priority (nice RANK_NICE) if it may (root or
  CAP_SYS_NICE): processes that raytp does not start (a client, a sidecar)
  are not kept off its cores, and the kernel's load balancer put a load
  generator on the rank's core half the time (a shared-prefix run over HTTP
  went from 10.3 to 11.0 requests/s with it, means of 2 alternating rounds;
  Ray starts its workers, ranks included, at nice 15). With no core left over, the
  engine and Serve share the ranks' cores, and must not wait on them.

Where cores cannot be claimed (more ranks than cores, an affinity call that
fails), the rank logs why and runs unpinned, as before.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import tempfile
import threading

from raytp.cluster.comm import process_alive

log = logging.getLogger(__name__)

_CLAIMS = os.path.join(tempfile.gettempdir(), "raytp-cpu-claims.json")


def _node_cores() -> list[int]:
    """Cores this node lets us use (the container's set, not this process's current mask)."""
    try:
        return sorted(os.sched_getaffinity(1))
    except OSError:
        return list(range(os.cpu_count() or 1))


def claim_cores(count: int, claims_path: str = _CLAIMS) -> list[int] | None:
    """Claim `count` free cores of this node for this process (lowest first), or None if too few are free."""
    with open(claims_path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        try:
            claims = {int(pid): cores for pid, cores in json.loads(f.read() or "{}").items()}
        except ValueError:
            claims = {}
        claims = {pid: cores for pid, cores in claims.items() if pid != os.getpid() and process_alive(pid)}
        taken = {c for cores in claims.values() for c in cores}
        free = [c for c in _node_cores() if c not in taken]
        mine = free[:count] if len(free) >= count else None
        if mine is not None:
            claims[os.getpid()] = mine
        f.seek(0)
        f.truncate()
        f.write(json.dumps({str(pid): cores for pid, cores in claims.items()}))
    return mine


# The compute thread's nice value where it gets priority: CFS then gives it ~9x the share of a normal process on
# its core, and the load balancer moves other work away from that core.
RANK_NICE = -10


def bind_rank(num_threads: int, group_cores: int) -> list[int] | None:
    """Pin the calling thread (and the torch threads it starts later) to `num_threads` cores of its own, and raise
    its priority if its group (`group_cores` cores in all) leaves the node cores for the rest."""
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
    if len(_node_cores()) > group_cores:
        prioritise_this_thread()
    return cores


def prioritise_this_thread() -> None:
    """Run the calling thread (and the threads it starts later) at nice RANK_NICE, where permitted."""
    try:
        # Linux keeps a nice value per thread: this thread's id, not the process's.
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), RANK_NICE)
    except OSError as err:
        log.info("the rank keeps its priority: raising it needs root or CAP_SYS_NICE (%s)", err)


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
