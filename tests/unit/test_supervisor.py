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


class PoisonedExecutor(LocalExecutor):
    """A LocalExecutor whose group fails, as when a rank dies, in every step that carries request "poison"; the
    failed rank is replaced (the KV cache survives, as with a spare on CPU)."""

    failures = 0

    def execute(self, seqs):
        if any(s.request_id == "poison" for s in seqs):
            PoisonedExecutor.failures += 1
            raise GroupFailure("a rank died in a step with the poisoned request")
        return super().execute(seqs)

    def replace_lost_ranks(self, known_lost=()):
        return {"detect": 0.0}


def test_requests_in_every_failed_step_are_failed_past_the_cap_and_the_rest_served(tmp_path):
    """A request that brings the group down in every step it is in: past max_recoveries failures, the requests that
    were in every failed step get an error (here the poisoned one and one that ran beside it from the start: while
    the poisoned request runs, no step succeeds); a request that came after the first failure is served, with the
    tokens of a run without faults, and the engine goes on serving. Every failure was a replacement: nothing was
    recomputed."""
    path = write_llama(tmp_path)
    config = EngineConfig(model=path, device="cpu", tensor_parallel_size=1, max_model_len=64, max_recoveries=2)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

    async def collect(engine, rid, prompt):
        tokens = []
        async for out in engine.generate(prompt, params, rid):
            tokens.extend(out.delta_token_ids)
        return tokens

    async def go():
        engine = AsyncEngine(config, lambda c, p, n: PoisonedExecutor(c, p, n))
        await engine.start()
        expected = await collect(engine, "reference", [9, 10, 11, 12])
        failures_before = PoisonedExecutor.failures  # (a class count: other tests' executors add to it)
        poisoned = asyncio.create_task(collect(engine, "poison", [3, 4]))
        beside = asyncio.create_task(collect(engine, "beside", [5, 6, 7]))
        while PoisonedExecutor.failures < failures_before + 1:
            await asyncio.sleep(0.001)
        late = await collect(engine, "late", [9, 10, 11, 12])
        errors = await asyncio.gather(poisoned, beside, return_exceptions=True)
        after = await collect(engine, "after", [9, 10, 11, 12])
        stats = engine.core.supervisor.recoveries, engine.core.recomputed_tokens, engine.failed
        await engine.shutdown()
        return expected, late, after, errors, stats

    expected, late, after, errors, (recoveries, recomputed, failed) = asyncio.run(go())
    assert late == expected and after == expected
    assert [str(e).split(" was ")[0] for e in errors] == ["request poison", "request beside"]
    assert all("in every one of the 3 steps that brought the TP group down" in str(e) for e in errors)
    assert recoveries == {"replace": 3} and recomputed == 0 and failed is None  # the third one mends too


def test_the_offline_engine_ends_the_requests_in_every_failed_step_past_the_cap(tmp_path):
    """The same cap in the synchronous engine (the offline LLM API steps it): the poisoned request and the one beside
    it end with finish_reason "abort" after the 3rd failure in a row, instead of the group being mended forever; a
    request added after them gets the tokens of a run without faults."""
    from raytp.engine.engine import EngineCore

    path = write_llama(tmp_path)
    config = EngineConfig(model=path, device="cpu", tensor_parallel_size=1, max_model_len=64, max_recoveries=2)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    failures_before = PoisonedExecutor.failures
    core = EngineCore(config, lambda c, p, n: PoisonedExecutor(c, p, n))
    core.start()

    def run(requests: dict[str, list[int]]) -> dict:
        for rid, prompt in requests.items():
            core.add_request(rid, prompt, params)
        finals = {}
        while core.has_work():
            finals.update({o.request_id: o.outputs[0] for o in core.step() if o.finished})
        return finals

    try:
        expected = run({"reference": [9, 10, 11, 12]})["reference"].token_ids
        ended = run({"poison": [3, 4], "beside": [5, 6, 7]})
        after = run({"after": [9, 10, 11, 12]})["after"]
    finally:
        core.shutdown()
    assert {rid: out.finish_reason for rid, out in ended.items()} == {"poison": "abort", "beside": "abort"}
    assert PoisonedExecutor.failures - failures_before == 3
    assert after.token_ids == expected and after.finish_reason == "length"
    assert core.supervisor.recoveries == {"replace": 3} and core.recomputed_tokens == 0


def test_failures_with_no_request_in_common_keep_being_mended(tmp_path):
    """Past the cap, only requests common to every failed step are singled out; independent faults (a flaky node,
    chaos testing) leave nobody to blame, and the group goes on being mended."""
    from raytp.cluster.supervisor import Supervisor
    from raytp.model.loader import read_model_args

    path = write_llama(tmp_path)
    config = EngineConfig(model=path, device="cpu", max_recoveries=2)
    supervisor = Supervisor(config, read_model_args(path), LocalExecutor(config, path, 64), lambda blocks: None)
    assert [supervisor.note_failure(ids) for ids in ({"a", "x"}, {"b", "x"}, {"c", "x"})] == [set(), set(), {"x"}]
    assert [supervisor.note_failure(ids) for ids in ({"a"}, {"b"}, {"c"}, {"d"})] == [set(), set(), set(), set()]
