"""Core claims of CPU ranks: lowest free first, one claim per process, a dead process's cores free again."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

from raytp.cluster import cpu_binding


@pytest.fixture
def node(tmp_path, monkeypatch):
    """A 4-core node and an empty claims file."""
    monkeypatch.setattr(cpu_binding, "_node_cores", lambda: [0, 1, 2, 3])
    return str(tmp_path / "claims.json")


def claim_in_child(path: str, count: int) -> tuple[subprocess.Popen, list[int]]:
    """Another process claims `count` cores and stays alive until killed."""
    code = ("import sys, raytp.cluster.cpu_binding as b; b._node_cores = lambda: [0, 1, 2, 3]; "
            f"print(b.claim_cores({count}, {path!r}), flush=True); sys.stdin.read()")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return child, json.loads(child.stdout.readline())


def test_claims_take_the_lowest_free_cores(node):
    child, theirs = claim_in_child(node, 2)
    try:
        assert theirs == [0, 1]
        assert cpu_binding.claim_cores(1, node) == [2]
        assert cpu_binding.claim_cores(1, node) == [2]  # claiming again replaces this process's own claim
        assert cpu_binding.claim_cores(3, node) is None  # only 2 and 3 are free for this process
        with open(node) as f:
            claims = json.load(f)
        assert claims == {str(child.pid): [0, 1]}  # a refused claim leaves none behind
    finally:
        child.kill()
        child.wait()


def test_a_dead_process_frees_its_cores(node):
    child, theirs = claim_in_child(node, 3)
    assert theirs == [0, 1, 2]
    assert cpu_binding.claim_cores(2, node) is None
    child.kill()
    child.wait()
    assert cpu_binding.claim_cores(2, node) == [0, 1]


def test_keep_off_rank_cores_moves_to_the_rest(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_binding, "_node_cores", lambda: [0, 1, 2, 3])
    monkeypatch.setattr(os, "sched_setaffinity", lambda pid, cores: calls.append(list(cores)))
    assert cpu_binding.keep_off_rank_cores(1) == [1, 2, 3]
    assert cpu_binding.keep_off_rank_cores(4) is None  # no core left over: nothing moves
    assert calls == [[1, 2, 3]]


def _nice_after_binding(group_cores: int) -> int:
    """The nice value of a fresh thread after bind_rank(1, group_cores) on the 4-core node."""
    seen = []

    def bind():
        cpu_binding.bind_rank(1, group_cores)
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    thread = threading.Thread(target=bind)
    thread.start()
    thread.join()
    return seen[0]


def test_a_rank_whose_group_leaves_cores_over_runs_at_a_higher_priority(monkeypatch):
    monkeypatch.setattr(cpu_binding, "_node_cores", lambda: [0, 1, 2, 3])
    monkeypatch.setattr(cpu_binding, "claim_cores", lambda count: [0])
    monkeypatch.setattr(os, "sched_setaffinity", lambda pid, cores: None)
    normal = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    # The group takes every core: the engine and Serve run on its cores, and must not wait on it.
    assert _nice_after_binding(4) == normal
    if os.geteuid() != 0:
        pytest.skip("raising a thread's priority needs root or CAP_SYS_NICE")
    assert _nice_after_binding(2) == cpu_binding.RANK_NICE
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == normal  # only the rank's thread
