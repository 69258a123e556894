"""The CPU ranks' shared-memory stores: folders left by a group whose processes all exited are swept."""
from __future__ import annotations

import os
import subprocess
import sys

from raytp.cluster.rank_store import STORE_PREFIX, mark_user, sweep_stale_stores


def _exited_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid no longer names a process
    return proc.pid


def test_sweep_removes_only_folders_whose_every_user_exited(tmp_path):
    dead, alive, mixed, creating, other = (tmp_path / n for n in
                                           (STORE_PREFIX + "dead", STORE_PREFIX + "alive", STORE_PREFIX + "mixed",
                                            STORE_PREFIX + "creating", "not-raytp"))
    for folder in (dead, mixed, creating, other):
        folder.mkdir()
    (dead / f"{_exited_pid()}.pid").touch()
    (dead / "rank0.kv").write_bytes(b"\0" * 64)
    mark_user(str(alive))  # this test's process: alive
    (mixed / f"{_exited_pid()}.pid").touch()
    (mixed / f"{os.getpid()}.pid").touch()
    (other / f"{_exited_pid()}.pid").touch()

    removed = sweep_stale_stores(str(tmp_path))

    assert removed == [str(dead)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (alive, mixed, creating, other))
    assert sweep_stale_stores(str(tmp_path / "missing")) == []
