"""Elastic TP: a dead or hung worker, a live resize and a degraded group lose no request and change no token."""
from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import pytest
import ray

from raytp.config import EngineConfig
from raytp.engine.engine import AsyncEngine
from raytp.sampling import SamplingParams

pytestmark = pytest.mark.timeout(240)

NUM_STREAMS = 16
MAX_TOKENS = 40


def _prompts(n: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(3, 1000) for _ in range(rng.randrange(4, 40))] for _ in range(n)]


def _greedy() -> SamplingParams:
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


async def _stream(engine: AsyncEngine, rid: str, prompt: list[int], params: SamplingParams, seen: dict) -> list[int]:
    """Collect a stream's tokens from its deltas (so a repeated or missing token would show)."""
    tokens: list[int] = []
    async for out in engine.generate(prompt, params, rid):
        tokens.extend(out.delta_token_ids)
        seen.setdefault(rid, []).extend([time.monotonic()] * len(out.delta_token_ids))  # each token's arrival
    assert tokens == out.outputs[0].token_ids
    return tokens


async def _run_all(engine: AsyncEngine, tag: str, during=None, params=None) -> tuple[list[list[int]], dict]:
    """Run NUM_STREAMS concurrent streams; `during(seen)` runs alongside once every stream has some tokens."""
    seen: dict = {}
    prompts = _prompts(NUM_STREAMS)
    tasks = [asyncio.create_task(_stream(engine, f"{tag}-{i}", p, params or _greedy(), seen)) for i, p in enumerate(prompts)]
    extra = None
    if during is not None:
        while len(seen) < NUM_STREAMS or min(len(times) for times in seen.values()) < 5:
            await asyncio.sleep(0.01)
        extra = await during(seen)
    results = await asyncio.gather(*tasks)
    return results, {"during": extra, "seen": seen}


def _engine(**overrides) -> AsyncEngine:
    cfg = dict(model="tiny", tensor_parallel_size=2, device="cpu", max_model_len=256, step_timeout_s=20.0)
    cfg.update(overrides)
    return AsyncEngine(EngineConfig.parse(cfg))


def _with_engine(body, **overrides):
    """Start an engine (TP=2 unless overridden), return `await body(engine)`, shut the engine down."""

    async def main():
        engine = _engine(**overrides)
        await engine.start()
        if engine.core.config.num_spare_ranks:  # the spare comes up a few seconds after the group
            assert await asyncio.to_thread(engine.core.executor.spares_ready, 120) == engine.core.config.num_spare_ranks
        try:
            return await body(engine)
        finally:
            await engine.shutdown()

    return asyncio.run(main())


LONGER = SamplingParams(max_tokens=3 * MAX_TOKENS, temperature=0.0, ignore_eos=True)  # room for two faults


@pytest.fixture(scope="module")
def long_reference(ray_cluster):
    """Tokens of the streams in a run without faults (TP=2), 3 * MAX_TOKENS each."""

    async def run(engine):
        return (await _run_all(engine, "ref", params=LONGER))[0]

    return _with_engine(run, num_spare_ranks=0)


@pytest.fixture(scope="module")
def reference(long_reference):
    """The same streams cut at MAX_TOKENS (greedy: a shorter stream is the longer one's start)."""
    return [tokens[:MAX_TOKENS] for tokens in long_reference]


async def _first_token_after(seen: dict, t0: float, counts: dict) -> float:
    """Seconds from t0 until some stream gets a token past what it had at t0."""
    while True:
        for rid, times in seen.items():
            if len(times) > counts[rid] and times[-1] > t0:
                return times[-1] - t0
        await asyncio.sleep(0.005)


def _pause_after(seen: dict, t0: float) -> float:
    """The pause the streams saw: the longest gap between two tokens of a stream that ends after t0."""
    return max(b - a for times in seen.values() for a, b in zip(times, times[1:]) if b > t0)


def _kill_and_resume(engine: AsyncEngine, rank: int, sig=signal.SIGKILL):
    """A `during` for _run_all: signal one rank once some stream has a token after the mended group's first step;
    returns (when it was signalled, the pids before)."""

    async def during(seen):
        pids = await asyncio.to_thread(engine.core.executor.worker_pids)
        counts = {rid: len(times) for rid, times in seen.items()}
        t0 = time.monotonic()
        os.kill(pids[rank], sig)
        await _first_token_after(seen, t0 + 0.05, counts)  # (a token already on its way may arrive at once)
        return t0, pids

    return during


def test_killed_worker_is_replaced_and_the_survivor_keeps_everything(ray_cluster, reference):
    """A killed rank is replaced by a spare: the survivor keeps its process, shard and KV cache, the spare maps the
    dead rank's, no computed token is thrown away, and every stream ends as without the fault."""

    async def run(engine):
        results, info = await _run_all(engine, "kill", during=_kill_and_resume(engine, 1))
        t0, before = info["during"]
        resume_s = _pause_after(info["seen"], t0)
        after = await asyncio.to_thread(engine.core.executor.worker_pids)
        return results, resume_s, before, after, engine.core.supervisor.recoveries, engine.core.recomputed_tokens

    results, resume_s, before, after, recoveries, recomputed = _with_engine(run)
    print(f"kill: the streams paused {resume_s:.2f}s")
    assert results == reference
    assert recoveries == {"replace": 1}
    assert after[0] == before[0] and after[1] != before[1]  # the survivor's process is the same one
    assert recomputed == 0


def test_a_mixture_of_experts_keeps_every_token_through_a_killed_rank_and_a_resize(ray_cluster, tmp_path):
    """Mixtral with whole experts per rank (expert_parallel): SIGKILL of rank 1 under 16 streams; the spare takes its
    experts, shard and KV cache from the store (nothing recomputed). Then, the streams still running, a live resize
    to TP=1 (that one rank then holds all 8 experts, resharded from the checkpoint). Every stream ends
    token-identical to a run without the fault and the resize."""
    from tests.helpers import write_mixtral

    model = write_mixtral(tmp_path, seed=13, vocab_size=1024, initializer_range=0.1)
    moe = dict(model=model, expert_parallel=True)

    async def fault_free(engine):
        return (await _run_all(engine, "moe-ref", params=LONGER))[0]

    async def killed_then_resized(engine):
        after_kill = {}

        async def kill_then_resize(seen):
            await _kill_and_resume(engine, 1)(seen)
            after_kill.update(recoveries=dict(engine.core.supervisor.recoveries),
                              recomputed=engine.core.recomputed_tokens)
            await engine.resize(1)
            await _until(lambda: engine.tp_size == 1 and engine.ready)
            after_kill["unfinished"] = len(engine.core.requests)  # the streams the resized group took over

        results, _ = await _run_all(engine, "moe-kill", during=kill_then_resize, params=LONGER)
        return results, after_kill, engine.tp_size

    reference = _with_engine(fault_free, num_spare_ranks=0, **moe)
    results, after_kill, tp_size = _with_engine(killed_then_resized, **moe)
    assert results == reference
    assert after_kill["recoveries"] == {"replace": 1} and after_kill["recomputed"] == 0
    assert tp_size == 1 and after_kill["unfinished"] > 0  # resized under load


def test_without_spares_a_killed_worker_rebuilds_the_group(ray_cluster, reference):
    async def run(engine):
        results, _ = await _run_all(engine, "rebuild", during=_kill_and_resume(engine, 1))
        return results, engine.core.supervisor.recoveries, engine.core.recomputed_tokens, engine.tp_size

    results, recoveries, recomputed, tp = _with_engine(run, num_spare_ranks=0)
    assert results == reference
    assert recoveries == {"rebuild": 1}
    assert recomputed > 0  # every running stream was prefilled again
    assert tp == 2


def test_rank_0_then_rank_1_killed_while_the_next_spare_starts(ray_cluster, long_reference):
    """Two kills in a row: rank 0 (which makes the rendezvous), then, as soon as the group is mended, rank 1, whose
    spare is still starting; the group waits for it and every stream still ends as without the faults."""

    async def run(engine):
        async def twice(seen):
            first = await _kill_and_resume(engine, 0)(seen)
            second = await _kill_and_resume(engine, 1)(seen)
            return first, second

        results, _ = await _run_all(engine, "twice", during=twice, params=LONGER)
        return results, engine.core.supervisor.recoveries, engine.core.recomputed_tokens

    results, recoveries, recomputed = _with_engine(run)
    assert results == long_reference
    assert recoveries == {"replace": 2}
    assert recomputed == 0


def test_hung_worker_is_caught_from_step_times_and_replaced(ray_cluster, reference):
    """SIGSTOP of a rank with the step timeout at its default (60 s): the watchdog's limit comes from the measured
    step times, the stopped rank does not answer a ping and is replaced; streams resume within 3 s."""

    async def run(engine):
        results, info = await _run_all(engine, "hang", during=_kill_and_resume(engine, 1, signal.SIGSTOP))
        return results, _pause_after(info["seen"], info["during"][0]), engine.core.supervisor.recoveries

    results, resume_s, recoveries = _with_engine(run, step_timeout_s=60.0)
    print(f"SIGSTOP: the streams paused {resume_s:.2f}s")
    assert results == reference
    assert recoveries == {"replace": 1}
    assert resume_s < 3.0


def test_a_rank_hung_while_idle_is_found_by_the_health_check_and_replaced(ray_cluster, reference):
    """No step runs, so no watchdog sees a SIGSTOPped rank: the health check does, says the group is recovering
    (not failed: Serve must not replace the replica), and the loop replaces the rank; then streams run as before."""
    from raytp.engine.engine import EngineNotReady

    async def run(engine):
        pids = await asyncio.to_thread(engine.core.executor.worker_pids)
        os.kill(pids[1], signal.SIGSTOP)
        with pytest.raises(EngineNotReady, match="recovering"):
            await engine.check_health()
        deadline = time.monotonic() + 30
        while not engine.core.supervisor.recoveries and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await engine.check_health()  # healthy again
        results, _ = await _run_all(engine, "after-idle-hang")
        return results, engine.core.supervisor.recoveries, engine.failed

    results, recoveries, failed = _with_engine(run)
    assert recoveries == {"replace": 1} and failed is None
    assert results == reference


async def _until(condition, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def _pid_of_a_new_rank(executor, old_workers: list) -> int:
    """The process id of the last rank of a group that is starting (its actors, none of old_workers, exist)."""
    deadline = time.monotonic() + 60
    while True:
        workers = list(executor.workers)
        if workers and not set(map(id, workers)) & set(map(id, old_workers)):
            return ray.get(workers[-1].node_info.remote(), timeout=60)["pid"]
        assert time.monotonic() < deadline, "no new group started"
        time.sleep(0.005)


def test_live_resize_2_1_2_with_a_kill_during_each_keeps_outputs(ray_cluster, long_reference):
    """Streams run on while the group is resized 2 -> 1 -> 2 (each resize rebuilds it: weights resharded, every
    request re-prefilled). Into the first, a rank of the old group is killed and the resize asked while the engine
    mends the group (the spare replaces the rank, then the resize goes on); into the second, a rank of the new
    group is killed while that group starts (the start fails and is tried again). Every stream ends as without the
    faults and resizes."""

    async def run(engine):
        sizes = []

        async def resize_with_kills(seen):
            pids = await asyncio.to_thread(engine.core.executor.worker_pids)
            os.kill(pids[1], signal.SIGKILL)
            # The resize is asked once the engine has seen the loss (asked at once, it might start from a step
            # boundary where nothing was running, and tear the group down before any step found the dead rank).
            await _until(lambda: not engine.ready or engine.core.supervisor.recoveries, timeout_s=30)
            await engine.resize(1)
            await _until(lambda: engine.tp_size == 1 and engine.ready)
            sizes.append(engine.tp_size)
            print(f"kill + resize 2 -> 1: group rebuilt in {engine.core.supervisor.last_recovery_s:.2f}s")
            old = list(engine.core.executor.workers)
            await engine.resize(2)
            os.kill(await asyncio.to_thread(_pid_of_a_new_rank, engine.core.executor, old), signal.SIGKILL)
            t0 = time.monotonic()
            await _until(lambda: engine.tp_size == 2 and engine.ready)
            sizes.append(engine.tp_size)
            print(f"resize 1 -> 2, a rank killed while the group starts: back {time.monotonic() - t0:.2f}s after "
                  f"the kill (the last start took {engine.core.supervisor.last_recovery_s:.2f}s)")

        results, _ = await _run_all(engine, "resize", during=resize_with_kills, params=LONGER)
        return results, sizes, engine.core.supervisor.restarts, engine.core.supervisor.recoveries

    results, sizes, restarts, recoveries = _with_engine(run)
    assert sizes == [1, 2]
    assert results == long_reference
    assert recoveries == {"replace": 1}  # the second kill hit a group still starting: no recovery of a running one
    assert restarts == 3  # the replacement and the two resizes


@ray.remote(num_cpus=1)
class _CpuHolder:
    def ping(self):
        return True


def test_degraded_group_comes_back_smaller_then_grows(ray_cluster, reference):
    # The session cluster has 4 CPUs; holding 3 leaves room for a TP=1 group only.
    holders = [_CpuHolder.remote() for _ in range(ray_cluster.num_cpus - 1)]
    ray.get([h.ping.remote() for h in holders])

    async def main():
        engine = _engine(placement_timeout_s=2.0, num_spare_ranks=0)
        await engine.start()
        first_tp = engine.tp_size
        engine.core.supervisor.grow_check_interval_s = 0.5
        results, _ = await _run_all(engine, "degraded")
        for h in holders[:1]:
            ray.kill(h)
        deadline = time.monotonic() + 60
        while engine.tp_size != 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        grown_tp = engine.tp_size
        after, _ = await _run_all(engine, "grown")
        await engine.shutdown()
        return first_tp, results, grown_tp, after

    try:
        first_tp, results, grown_tp, after = asyncio.run(main())
    finally:
        for h in holders:
            ray.kill(h)
    assert first_tp == 1
    assert results == reference  # TP=1 computes the same greedy tokens
    assert grown_tp == 2
    assert after == reference


def test_served_replica_answers_503_while_recovering_and_streams_carry_on(ray_cluster):
    """Over HTTP: kill a TP worker of a served TP=2 replica; /health and new requests get 503 until the group is
    back, while the streams that were running finish with the tokens of a fault-free run."""
    import concurrent.futures
    import json

    import httpx
    from ray import serve
    from ray.serve.context import _get_global_client

    from raytp.cluster.comm import free_port
    from raytp.serve.app import build_app

    app = "raytp-elastic-http"
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    base = f"http://127.0.0.1:{_get_global_client().http_config.port}"
    # Without a spare the group is rebuilt: long enough to see the 503s (a replacement takes ~0.1 s).
    serve.run(build_app({"model": "tiny", "tensor_parallel_size": 2, "device": "cpu", "max_model_len": 256,
                         "num_spare_ranks": 0}),
              name=app, route_prefix="/")
    handle = serve.get_deployment_handle("RaytpServer", app_name=app)

    def stream(prompt: list[int], progress: list) -> str:
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 60, "temperature": 0.0, "ignore_eos": True,
                "stream": True}
        text = ""
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    assert "error" not in chunk, chunk
                    text += "".join(c["text"] for c in chunk["choices"])
                    progress.append(1)
        return text

    prompts = _prompts(4)
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            reference = list(pool.map(lambda p: stream(p, []), prompts))
            progress: list = []
            running = [pool.submit(stream, p, progress) for p in prompts]
            while len(progress) < 8:
                time.sleep(0.01)
            pids = handle.engine_stats.remote().result(timeout_s=30)["worker_pids"]
            os.kill(pids[1], signal.SIGKILL)
            statuses = []
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                health = httpx.get(f"{base}/health", timeout=10)
                statuses.append(health.status_code)
                if health.status_code == 503:
                    new = httpx.post(f"{base}/v1/completions", json={"model": "tiny", "prompt": [5, 6], "max_tokens": 2},
                                     timeout=30)
                    if new.status_code == 503:
                        assert new.json()["error"]["code"] == "engine_not_ready"
                if 503 in statuses and health.status_code == 200:
                    break
                time.sleep(0.02)
            results = [f.result(timeout=120) for f in running]
        assert 503 in statuses and statuses[-1] == 200, statuses[-5:]
        assert results == reference
        assert handle.engine_stats.remote().result(timeout_s=30)["tp_size"] == 2
    finally:
        serve.delete(app)


def test_groups_leave_no_shared_memory_behind(ray_cluster):
    """TP=1 makes no segment; TP=2 unlinks its segment once both ranks have it mapped, and removes its ranks'
    stores with the group, rebuilds included."""
    import glob

    def segments() -> set[str]:
        # The communicators' segments, and the ranks' shard and KV stores (raytp-group-*).
        return set(glob.glob("/dev/shm/raytp-tp-*")) | set(glob.glob("/dev/shm/raytp-group-*"))

    before = segments()

    async def main():
        for tp in (1, 2):
            engine = _engine(tensor_parallel_size=tp)
            await engine.start()
            await engine.resize(1 if tp == 2 else 2)
            while engine.core.supervisor.restarts < 1 or not engine.ready:
                await asyncio.sleep(0.05)
            await engine.shutdown()

    asyncio.run(main())
    assert segments() - before == set()


def test_unseeded_sampling_keeps_the_ranks_in_step(ray_cluster):
    # Every rank samples and feeds its own token back in (the engine schedules ahead); with
    # temperature, top-k and top-p and no seed the ranks still agree on every token (TPGroup checks
    # each step), so every stream runs to its length without a restart or an error.
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, top_k=50, top_p=0.9, ignore_eos=True)

    async def run(engine):
        results, _ = await _run_all(engine, "sampled", params=params)
        return results, engine.core.supervisor.restarts

    results, restarts = _with_engine(run, num_spare_ranks=0)
    assert restarts == 0
    assert [len(r) for r in results] == [MAX_TOKENS] * NUM_STREAMS
    assert len({tuple(r) for r in results}) == NUM_STREAMS  # sampled, not one greedy answer
