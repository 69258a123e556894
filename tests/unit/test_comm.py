"""Communicators: gloo collectives across spawned ranks, SingleRank, and the rendezvous timeout."""
import time

import pytest
import torch

from raytp.cluster.comm import GlooCommunicator, GlooRendezvous, SingleRank, free_port
from tests.helpers import RankPool


def contribution(rank: int) -> torch.Tensor:
    return torch.arange(8.0) * (rank + 1)


def all_collectives(comm):
    """Every collective once, on rank-dependent inputs; returns what this rank saw."""
    r, out = comm.rank, {}
    x = contribution(r)
    y = comm.all_reduce(x)
    out["all_reduce"] = y.tolist()
    out["all_reduce_in_place"] = y.data_ptr() == x.data_ptr()
    out["gather_last"] = comm.all_gather(contribution(r).view(2, 4), dim=-1).tolist()
    out["gather_first"] = comm.all_gather(contribution(r).view(2, 4), dim=0).tolist()
    out["gather_1d"] = comm.all_gather(contribution(r)).tolist()
    for src in (0, 1):
        out[f"broadcast_{src}"] = comm.broadcast(contribution(r), src=src).tolist()
    tokens = torch.tensor([10 * r + 7], dtype=torch.int64)
    out["broadcast_int64"] = comm.broadcast(tokens, src=comm.world_size - 1).tolist()
    comm.barrier()
    out["after_barrier"] = True
    return out


@pytest.fixture(scope="module")
def pools():
    """Gloo groups of 2 and 3 spawned ranks, started together so that they boot side by side."""
    made = {world: RankPool(world) for world in (2, 3)}
    yield made
    for pool in made.values():
        pool.stop()
    for pool in made.values():
        pool.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [2, 3])
def test_gloo_collectives(world, pools):
    results = pools[world].run(all_collectives)
    parts = [contribution(r) for r in range(world)]
    total = sum(parts)
    assert len(results) == world
    for rank, got in enumerate(results):
        assert got["all_reduce"] == (torch.arange(8.0) * world * (world + 1) / 2).tolist() == total.tolist(), rank
        assert got["all_reduce_in_place"]
        assert got["gather_last"] == torch.cat([p.view(2, 4) for p in parts], dim=-1).tolist()
        assert got["gather_first"] == torch.cat([p.view(2, 4) for p in parts], dim=0).tolist()
        assert got["gather_1d"] == torch.cat(parts).tolist()
        assert got["broadcast_0"] == parts[0].tolist()
        assert got["broadcast_1"] == parts[1].tolist()
        assert got["broadcast_int64"] == [10 * (world - 1) + 7]
        assert got["after_barrier"]


def test_single_rank_is_identity():
    comm = SingleRank()
    assert (comm.rank, comm.world_size) == (0, 1)
    x = contribution(0).view(2, 4)
    for y in (comm.all_reduce(x), comm.all_gather(x), comm.all_gather(x, dim=0), comm.broadcast(x, src=0)):
        assert y is x
    assert x.tolist() == contribution(0).view(2, 4).tolist()
    comm.barrier()


def lonely_rank(rank: int, timeout_s: float, results) -> None:
    """Join a world of 2 as `rank` while the peer never comes; report what happened and when."""
    start = time.monotonic()
    try:
        GlooCommunicator(GlooRendezvous("127.0.0.1", free_port()), rank, 2, timeout_s=timeout_s)
        results.put((rank, "joined", "", time.monotonic() - start))
    except Exception as err:  # noqa: BLE001 - the test asserts on what it was
        results.put((rank, type(err).__name__, str(err), time.monotonic() - start))


@pytest.mark.timeout(120)
def test_missing_peer_times_out():
    """Rank 0 waiting for a rank 1 that never starts, and rank 1 for a rank 0 that never hosts the store, raise within the timeout."""
    import queue

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    # Two separate worlds of 2, each with one rank missing (run side by side to save time).
    procs = [ctx.Process(target=lonely_rank, args=(rank, 2.0, results), daemon=True) for rank in (0, 1)]
    for proc in procs:
        proc.start()
    try:
        outcomes = sorted(results.get(timeout=30) for _ in procs)
    except queue.Empty:
        pytest.fail("a rank alone in a world of 2 neither joined nor failed within 30 s")
    finally:
        for proc in procs:
            proc.join(timeout=1)
            if proc.is_alive():
                proc.terminate()
    assert [o[0] for o in outcomes] == [0, 1]
    for rank, kind, message, elapsed in outcomes:
        print(f"rank {rank}: {kind} after {elapsed:.1f}s: {message.splitlines()[0] if message else ''}")
        assert kind != "joined", f"rank {rank} joined a group whose peer never started"
        assert elapsed < 10, f"rank {rank} failed only after {elapsed:.1f}s with timeout_s=2"
