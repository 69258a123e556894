"""The CPU ranks' shared-memory stores: folders left by a group whose processes all exited are swept; a quantized
shard round-trips."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from raytp.cluster.comm import SingleRank
from raytp.cluster.rank_store import STORE_PREFIX, load_shard, mark_user, save_shard, sweep_stale_stores
from raytp.model import cpu_ops
from raytp.model.layers import PackableLinear
from raytp.model.llama import LlamaModel
from raytp.model.loader import load_model, read_model_args
from tests.helpers import write_llama


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


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_a_quantized_shard_round_trips_through_the_store(tmp_path, quantization):
    """A spare maps a quantized rank's shard: its linears compute with the quantized weights and scales the rank
    packed (not quantized again from the stored weights), so its logits are the rank's own."""
    if cpu_ops.linear_op(quantization) is None:
        pytest.skip(f"the {quantization} kernel needs AVX512-VNNI and AVX512-BF16")
    path = write_llama(tmp_path, hidden_size=64, intermediate_size=128)
    rank = load_model(path, SingleRank(), progress=False, quantization=quantization)
    kernels = {m.kernel for m in rank.modules() if isinstance(m, PackableLinear)}
    assert kernels == {quantization}
    save_shard(rank, str(tmp_path / "store" / "rank0.shard.safetensors"))

    spare = LlamaModel(read_model_args(path), SingleRank(), torch.float32)
    load_shard(spare, str(tmp_path / "store" / "rank0.shard.safetensors"))
    assert {m.kernel for m in spare.modules() if isinstance(m, PackableLinear)} == {quantization}
    hidden = torch.randn(3, 64)
    assert torch.equal(spare.compute_logits(hidden), rank.compute_logits(hidden))
