"""ShmCommunicator: same-node CPU ranks exchange tensors through shared memory (gloo for the rest)."""
from __future__ import annotations

import os
import time

import pytest
import torch
import torch.multiprocessing as mp

from raytp.cluster.comm import ShmCommunicator, create_shm_rendezvous

pytestmark = pytest.mark.timeout(120)


def _rank_main(rank, world, rendezvous, out_dir):
    torch.set_num_threads(1)
    comm = ShmCommunicator(rendezvous, rank, world, timeout_s=20)
    results = {}
    x = torch.arange(8.0) * (rank + 1)
    results["all_reduce"] = comm.all_reduce(x.clone())
    results["gather_last"] = comm.all_gather(torch.arange(4.0).view(2, 2) * (rank + 1), dim=-1)
    results["gather_first"] = comm.all_gather(torch.arange(4.0).view(2, 2) * (rank + 1), dim=0)
    results["bf16"] = comm.all_reduce((torch.arange(8.0) * (rank + 1)).to(torch.bfloat16))
    # Larger than a slot: falls back to gloo, same answer.
    big = torch.full((rendezvous.slot_bytes // 4 + 10,), float(rank + 1))
    results["big"] = comm.all_reduce(big)[:3]
    # Many collectives in a row exercise the slot reuse across sequence parity.
    g = torch.Generator().manual_seed(rank)
    acc = torch.zeros(64)
    for _ in range(200):
        acc += comm.all_reduce(torch.randn(64, generator=g))
    results["many"] = acc
    results["broadcast"] = comm.broadcast(torch.arange(4.0) * (rank + 1), src=world - 1)
    comm.barrier()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    comm.close()


@pytest.mark.parametrize("world", [2, 3])
def test_collectives_match_known_values(tmp_path, world):
    rendezvous = create_shm_rendezvous("127.0.0.1", world, slot_bytes=64 * 1024)
    mp.start_processes(_rank_main, args=(world, rendezvous, str(tmp_path)), nprocs=world, start_method="spawn")
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    s = sum(r + 1 for r in range(world))
    base = torch.arange(4.0).view(2, 2)
    for r in range(world):
        assert torch.equal(res[r]["all_reduce"], torch.arange(8.0) * s)
        assert torch.equal(res[r]["gather_last"], torch.cat([base * (k + 1) for k in range(world)], dim=-1))
        assert torch.equal(res[r]["gather_first"], torch.cat([base * (k + 1) for k in range(world)], dim=0))
        assert torch.equal(res[r]["bf16"].float(), torch.arange(8.0) * s)
        assert torch.equal(res[r]["big"], torch.full((3,), float(s)))
        assert torch.equal(res[r]["broadcast"], torch.arange(4.0) * world)
        # Every rank sums in rank order: bit-identical results everywhere.
        assert torch.equal(res[r]["many"], res[0]["many"])
    # The segment's name is gone once every rank has mapped it.
    assert not os.path.exists(rendezvous.path)


def _lonely_rank(rendezvous, out):
    try:
        ShmCommunicator(rendezvous, 0, 2, timeout_s=2)
        out.put("connected")
    except Exception as err:  # the peer never joins the gloo rendezvous
        out.put(type(err).__name__)


def test_missing_peer_fails_within_timeout():
    rendezvous = create_shm_rendezvous("127.0.0.1", 2, slot_bytes=4096)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    p = ctx.Process(target=_lonely_rank, args=(rendezvous, out))
    t0 = time.monotonic()
    p.start()
    result = out.get(timeout=60)
    p.join(10)
    os.unlink(rendezvous.path)
    assert result != "connected"
    assert time.monotonic() - t0 < 30


def _rank_that_loses_a_peer(rank, world, first, second, out_dir):
    """Ranks 0..world-2 survive; rank world-1 leaves after one collective. Rank 0 aborts from another thread once
    the survivors are stuck; then the survivors and a newcomer (the parent starts it) meet in `second`."""
    import threading

    from raytp.cluster.comm import CollectiveAborted

    torch.set_num_threads(1)
    comm = ShmCommunicator(first, rank, world, timeout_s=30)
    comm.all_reduce(torch.ones(4))
    if rank == world - 1:
        comm.close()
        return  # "dies": never reaches the next collective
    if rank == 0:
        threading.Timer(0.5, comm.abort).start()
    t0 = time.monotonic()
    outcome = {}
    for attempt in ("stuck", "later"):
        try:
            comm.all_reduce(torch.ones(4))
            outcome[attempt] = "completed"
        except CollectiveAborted:
            outcome[attempt] = "aborted"
    outcome["released_after_s"] = time.monotonic() - t0
    comm.close()
    outcome["rejoined"] = _join_and_sum(second, rank, world)
    torch.save(outcome, os.path.join(out_dir, f"rank{rank}.pt"))


def _join_and_sum(rendezvous, rank, world):
    comm = ShmCommunicator(rendezvous, rank, world, timeout_s=30)
    total = comm.all_reduce(torch.full((4,), float(rank + 1)))
    comm.close()
    return total


def _newcomer(rank, world, rendezvous, out_dir):
    torch.set_num_threads(1)
    torch.save({"rejoined": _join_and_sum(rendezvous, rank, world)}, os.path.join(out_dir, f"new{rank}.pt"))


def test_abort_releases_every_survivor_and_they_join_a_new_communicator(tmp_path):
    world = 3
    first = create_shm_rendezvous("127.0.0.1", world, slot_bytes=4096)
    second = create_shm_rendezvous("127.0.0.1", world, slot_bytes=4096)
    ctx = mp.get_context("spawn")
    ranks = [ctx.Process(target=_rank_that_loses_a_peer, args=(r, world, first, second, str(tmp_path)))
             for r in range(world)]
    for p in ranks:
        p.start()
    ranks[-1].join(60)  # the leaver is gone: its index is free for the newcomer
    newcomer = ctx.Process(target=_newcomer, args=(world - 1, world, second, str(tmp_path)))
    newcomer.start()
    for p in ranks[:-1] + [newcomer]:
        p.join(60)
        assert p.exitcode == 0
    expected = torch.full((4,), float(sum(range(1, world + 1))))
    for r in range(world - 1):
        out = torch.load(tmp_path / f"rank{r}.pt")
        # Rank 1 never called abort: the abort word in the shared segment released it too.
        assert out["stuck"] == "aborted" and out["later"] == "aborted"
        assert out["released_after_s"] < 5
        assert torch.equal(out["rejoined"], expected)
    assert torch.equal(torch.load(tmp_path / f"new{world - 1}.pt")["rejoined"], expected)


def test_a_new_segment_sweeps_those_whose_creator_exited(tmp_path):
    """A segment is unlinked once every rank mapped it; one whose creator (its pid in the name) exited was left by
    a group that failed while connecting, and the next group's rank 0 removes it. Others are kept."""
    import subprocess
    import sys

    from raytp.cluster.comm import SEGMENT_PREFIX, create_shm_rendezvous

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: its pid names no process
    orphan = tmp_path / f"{SEGMENT_PREFIX}{proc.pid}-abc"
    live = tmp_path / f"{SEGMENT_PREFIX}{os.getpid()}-def"  # being connected by this (live) process
    other = tmp_path / "unrelated"
    for f in (orphan, live, other):
        f.write_bytes(b"\0" * 64)
    rendezvous = create_shm_rendezvous("127.0.0.1", 2, slot_bytes=4096, root=str(tmp_path))
    created = os.path.basename(rendezvous.path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, created])
    assert created.startswith(f"{SEGMENT_PREFIX}{os.getpid()}-")
