"""A torn-down group on GPUs waits until its killed ranks are gone (their GPU memory with them) before the next
group is placed on the same GPUs: the wait itself, on CPU actors."""
import time

import pytest
import ray

from raytp.cluster.group import wait_until_gone

pytestmark = pytest.mark.timeout(60)


@ray.remote(num_cpus=0)
class Rank:
    def ping(self) -> int:
        return 0


def test_wait_until_gone_returns_once_killed_actors_are_dead_and_not_while_one_lives(ray_cluster):
    killed, alive = [Rank.remote() for _ in range(2)], Rank.remote()
    ray.get([a.ping.remote() for a in (*killed, alive)])
    for actor in killed:
        ray.kill(actor, no_restart=True)
    t0 = time.monotonic()
    assert wait_until_gone(killed, 10.0)
    assert time.monotonic() - t0 < 5.0
    t0 = time.monotonic()
    assert not wait_until_gone([alive], 0.5)
    assert 0.5 <= time.monotonic() - t0 < 3.0
    ray.kill(alive)
