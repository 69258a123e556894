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
