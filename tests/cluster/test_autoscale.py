"""Replicas scale with load (each replica one TP group), and shutting down drains running requests."""
from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import pytest

from raytp.cluster.comm import free_port

pytestmark = pytest.mark.timeout(300)

APP = "raytp-autoscale-test"


def stream_completion(base: str, max_tokens: int, prompt: list[int]) -> int:
    """A greedy streaming completion; returns the number of tokens generated (from the usage chunk)."""
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    usage = None
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                usage = chunk.get("usage") or usage
    return usage["completion_tokens"]


def running_replicas() -> int:
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None:
        return 0
    dep = app.deployments["RaytpServer"]
    return dep.replica_states.get("RUNNING", 0)


@pytest.fixture(scope="module")
def base(ray_cluster):
    from ray import serve
    from ray.serve.context import _get_global_client

    from raytp.config import EngineConfig
    from raytp.serve.app import build_deployment

    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    url = f"http://127.0.0.1:{_get_global_client().http_config.port}"
    config = EngineConfig.parse({"model": "tiny", "tensor_parallel_size": 1, "device": "cpu", "max_model_len": 512})
    autoscaling = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2, "upscale_delay_s": 0.5,
                   "downscale_delay_s": 600, "metrics_interval_s": 0.5, "look_back_period_s": 1}
    serve.run(build_deployment(config, autoscaling_config=autoscaling, graceful_shutdown_timeout_s=60),
              name=APP, route_prefix="/")
    yield url
    if APP in serve.status().applications:
        serve.delete(APP)


def admitted_by_replica(handle) -> dict[int, int]:
    """pid -> requests admitted, of each replica the handle reached (it picks one at random per call)."""
    pids = {}
    for _ in range(40):
        stats = handle.engine_stats.remote().result(timeout_s=30)
        pids[stats["pid"]] = stats["admitted"]
        if len(pids) == 2:
            break
    return pids


def test_second_replica_starts_under_load_and_both_serve(base):
    from ray import serve

    assert running_replicas() == 1
    handle = serve.get_deployment_handle("RaytpServer", app_name=APP)
    first_pid = handle.engine_stats.remote().result(timeout_s=30)["pid"]
    deadline = time.monotonic() + 120
    with concurrent.futures.ThreadPoolExecutor(max_workers=12) as pool:
        # Keep 12 long streams going until Serve has a second replica running.
        futures = [pool.submit(stream_completion, base, 400, [5 + i, 6, 7]) for i in range(12)]
        while running_replicas() < 2:
            assert time.monotonic() < deadline, "no second replica under load"
            time.sleep(0.5)
        # New requests now go to both replicas: at once through Serve's proxy, through HAProxy once its health checks
        # have passed the new one (~0.5 s after it is added).
        more, pids = [], {}
        while not (len(pids) == 2 and all(pids.values())):
            assert time.monotonic() < deadline, f"the second replica got no requests: {pids}"
            wave = [pool.submit(stream_completion, base, 8, [9, i + 3]) for i in range(12)]
            more += wave
            concurrent.futures.wait(wave, timeout=180)
            pids = admitted_by_replica(handle)
        results = [f.result(timeout=180) for f in futures + more]
    assert results[:12] == [400] * 12
    assert results[12:] == [8] * len(more)
    assert first_pid in pids


def test_shutdown_drains_running_requests(base):
    from ray import serve

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        running = pool.submit(stream_completion, base, 200, [11, 12, 13])
        time.sleep(1.0)  # the stream is running
        serve.delete(APP, _blocking=False)
        generated = running.result(timeout=120)
    assert generated == 200
