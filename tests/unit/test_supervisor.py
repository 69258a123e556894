"""The supervisor's retry policy, with one real rank in this process: transient failures are retried,
permanent ones (here: the checkpoint is gone when the group is rebuilt) fail fast with their message."""
import asyncio
import os

import pytest

from raytp.config import EngineConfig
from raytp.engine.engine import AsyncEngine, EngineNotReady
from raytp.cluster.executor import GroupFailure, LocalExecutor
from raytp.model.loader import CheckpointError
from raytp.sampling import SamplingParams
from tests.helpers import write_llama

pytestmark = pytest.mark.timeout(120)


class FlakyStartExecutor(LocalExecutor):
    """A LocalExecutor whose next `fail_starts` starts fail as a dead rank would (GroupFailure)."""

    fail_starts = 0

    def start(self, tp_size):
        if FlakyStartExecutor.fail_starts:
            FlakyStartExecutor.fail_starts -= 1
            raise GroupFailure("a rank died while starting")
        super().start(tp_size)


def make_engine(path: str) -> AsyncEngine:
    config = EngineConfig(model=path, device="cpu", tensor_parallel_size=1, max_model_len=64)
    return AsyncEngine(config, lambda c, p, n: FlakyStartExecutor(c, p, n))


def test_transient_start_failures_are_retried(tmp_path, monkeypatch):
    monkeypatch.setattr(asyncio, "sleep", _no_wait(asyncio.sleep))  # skip the backoff, not the retries
    path = write_llama(tmp_path)

    async def go():
        engine = make_engine(path)
        await engine.start()
        FlakyStartExecutor.fail_starts = 2
        took = await engine.core.supervisor.rebuild_until_done("test")
        await engine.shutdown()
        return took, engine.core.supervisor.restarts

    took, restarts = asyncio.run(go())
    assert restarts == 1 and took >= 0 and FlakyStartExecutor.fail_starts == 0


def test_permanent_rebuild_error_fails_fast(tmp_path):
    path = write_llama(tmp_path)

    async def go():
        engine = make_engine(path)
        await engine.start()
        params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
        stream = engine.generate([5, 6, 7], params, "r1")
        first = await stream.__anext__()
        os.remove(os.path.join(path, "model.safetensors"))  # the rebuild cannot load the weights any more
        engine.core.supervisor.pending_resize = 1  # a rebuild at the same size, as after a group failure
        with pytest.raises(RuntimeError, match="cannot be rebuilt: CheckpointError"):
            async for _ in stream:
                pass
        with pytest.raises(EngineNotReady, match="model.safetensors"):
            await engine.check_health()
        failed, ready = engine.failed, engine.ready
        await engine.shutdown()
        return first, failed, ready

    first, failed, ready = asyncio.run(go())
    assert len(first.outputs[0].token_ids) >= 1
    assert not ready and "has no model.safetensors" in failed


def _no_wait(real_sleep):
    async def sleep(delay, *args, **kwargs):
        return await real_sleep(0, *args, **kwargs)

    return sleep


def test_checkpoint_error_is_not_transient():
    from raytp.cluster.supervisor import TRANSIENT

    assert not issubclass(CheckpointError, TRANSIENT) and issubclass(GroupFailure, TRANSIENT)
