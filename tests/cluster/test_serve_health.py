"""Serve's health checks and raytp's recovery agree: a fault the engine mends keeps the replica, one it cannot
mend gets the replica replaced, and the replaced replica leaves nothing behind."""
from __future__ import annotations

import concurrent.futures
import glob
import json
import os
import random
import shutil
import signal
import time

import httpx
import pytest
import ray

from raytp.cluster.comm import free_port, process_alive
from raytp.config import EngineConfig

pytestmark = pytest.mark.timeout(300)

# Serve checks every second here (10 s in the shipped configs) and replaces a replica after 3 failed checks in a
# row, so a check that failed while a rank hangs would cost the replica within ~3 s.
FAST_HEALTH_CHECKS = {"health_check_period_s": 1, "health_check_timeout_s": 10}


def _prompts(n: int) -> list[list[int]]:
    rng = random.Random(1)
    return [[rng.randrange(3, 1000) for _ in range(rng.randrange(4, 30))] for _ in range(n)]


def _stream(base: str, model: str, prompt: list[int], max_tokens: int, progress: list) -> dict:
    """One streamed greedy completion: its text, and the error event that ended it, if one did."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True}
    text, error = "", None
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    error = chunk["error"]
                    continue
                text += "".join(c["text"] for c in chunk["choices"])
                progress.append(1)
    return {"text": text, "error": error}


def _deploy(app: str, engine_args: dict):
    """Run the raytp app with fast health checks; (base URL, deployment handle)."""
    from ray import serve
    from ray.serve.context import _get_global_client

    from raytp.serve.app import build_deployment

    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    serve.run(build_deployment(EngineConfig.parse(engine_args), **FAST_HEALTH_CHECKS), name=app, route_prefix="/")
    return f"http://127.0.0.1:{_get_global_client().http_config.port}", serve.get_deployment_handle("RaytpServer", app_name=app)


def _stats(handle) -> dict:
    return handle.engine_stats.remote().result(timeout_s=30)


def _wait_for(what: str, condition, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_a_hung_rank_is_mended_and_serve_keeps_the_replica(ray_cluster):
    """SIGSTOP of one rank under 16 streams, twice: the health check (every second) is the first to see the rank
    that does not answer (the watchdog is set to wait 20 s), reports the replica healthy while the engine replaces
    the rank with a spare, and every stream finishes with the tokens of a run without faults, on the same replica."""
    from ray import serve

    app = "raytp-health-hang"
    base, handle = _deploy(app, {"model": "tiny", "tensor_parallel_size": 2, "device": "cpu", "max_model_len": 256,
                                 "step_timeout_s": 60, "hang_detection_floor_s": 20})
    prompts = _prompts(16)
    stopped: list[int] = []
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
            reference = list(pool.map(lambda p: _stream(base, "tiny", p, 60, []), prompts))
            assert all(r["error"] is None for r in reference)
            first = _stats(handle)
            for round_ in (1, 2):
                _wait_for("a warm spare", lambda: _stats(handle)["spares_ready"] == 1, 120)
                progress: list = []
                running = [pool.submit(_stream, base, "tiny", p, 60, progress) for p in prompts]
                _wait_for("tokens on every stream", lambda: len(progress) >= 32, 60)
                victim = _stats(handle)["worker_pids"][round_ % 2]
                os.kill(victim, signal.SIGSTOP)
                stopped.append(victim)
                results = [f.result(timeout=120) for f in running]
                assert results == reference, f"round {round_}: streams differ from the fault-free run"
                stats = _stats(handle)
                assert stats["pid"] == first["pid"], "Serve replaced the replica that was mending its group"
                assert stats["recoveries"] == {"replace": round_}, stats["recoveries"]
                assert stats["health_checks"].get("recovering", 0) >= round_, stats["health_checks"]
                assert "failed" not in stats["health_checks"], stats["health_checks"]
                assert victim not in stats["worker_pids"]
                _wait_for("the hung rank's process to be ended", lambda: not process_alive(victim), 30)
    finally:
        for pid in stopped:
            if process_alive(pid):
                os.kill(pid, signal.SIGCONT)
        serve.delete(app)


def test_a_fault_it_cannot_mend_gets_the_replica_replaced_and_nothing_left_behind(ray_cluster, tmp_path):
    """A rank dies and the checkpoint is gone when the group is rebuilt (no spares here): the streams end with a
    clear error, the health check turns unhealthy, Serve replaces the replica, the new replica serves, and the old
    one's ranks, placement group and shared memory are gone."""
    from ray import serve
    from ray.util import placement_group_table

    from raytp.tiny import ensure_tiny_checkpoint

    def placement_groups() -> set[str]:
        return {pg_id for pg_id, pg in placement_group_table().items() if pg["state"] == "CREATED"}

    def shared_memory() -> set[str]:
        return set(glob.glob("/dev/shm/raytp-tp-*")) | set(glob.glob("/dev/shm/raytp-group-*"))

    checkpoint = str(tmp_path / "model")
    shutil.copytree(ensure_tiny_checkpoint(), checkpoint)
    pgs_before, shm_before = placement_groups(), shared_memory()
    app = "raytp-health-permanent"
    base, handle = _deploy(app, {"model": checkpoint, "tensor_parallel_size": 2, "device": "cpu",
                                 "max_model_len": 256, "num_spare_ranks": 0})
    try:
        old = _stats(handle)
        old_pgs = placement_groups() - pgs_before
        assert len(old_pgs) == 1
        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            progress: list = []
            running = [pool.submit(_stream, base, old["model"], p, 200, progress) for p in _prompts(4)]
            _wait_for("tokens on every stream", lambda: len(progress) >= 8, 60)
            os.rename(checkpoint, checkpoint + ".away")  # the rebuild will not find it: a permanent error
            os.kill(old["worker_pids"][1], signal.SIGKILL)
            results = [f.result(timeout=120) for f in running]
        for r in results:
            assert r["error"] is not None and "cannot be rebuilt" in r["error"]["message"], r["error"]
        os.rename(checkpoint + ".away", checkpoint)  # for the replica Serve starts next

        def replaced() -> bool:
            try:
                stats = _stats(handle)
            except Exception:  # noqa: BLE001 - the old replica going away mid-call
                return False
            return stats["pid"] != old["pid"] and stats["ready"]

        _wait_for("Serve to replace the failed replica", replaced, 120)
        answer = httpx.post(f"{base}/v1/completions", json={"model": old["model"], "prompt": [5, 6, 7], "max_tokens": 4},
                            timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["completion_tokens"] == 4
        _wait_for("the old ranks to exit", lambda: not any(process_alive(pid) for pid in old["worker_pids"]), 30)
        _wait_for("the old placement group to go", lambda: not old_pgs & placement_groups(), 30)
        assert len(placement_groups() - pgs_before) == 1  # the new replica's
        assert shared_memory() - shm_before == set()
    finally:
        if os.path.exists(checkpoint + ".away"):
            os.rename(checkpoint + ".away", checkpoint)
        serve.delete(app)
