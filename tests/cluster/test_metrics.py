"""Metrics as users see them: the node's metrics port, the dashboard's queries, and a real Prometheus.

One Serve app (tiny, TP=2 on CPU) under its own served model name, so the
session's other apps do not add to its counters. It serves known traffic and
is resized once (a restart), then the test reads Ray's metrics port.
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from raytp.cluster.comm import free_port
from tests.schema_checks import dashboard_exprs, dashboard_metric_names

pytestmark = pytest.mark.timeout(300)

MODEL = "tiny-metrics"
APP = "raytp-metrics-test"
# (prompt length in tokens, max_tokens); prompts are 10, 11, ...: the 20-token one finds the first 16-token block
# of the 17-token one in the prefix cache.
REQUESTS = [(5, 7), (9, 4), (3, 12), (17, 6), (20, 3)]
# Dashboard metrics that exist only once some TP group has recovered (a rank replaced or the group rebuilt).
RECOVERY_ONLY = {"ray_raytp_recovery_seconds_bucket", "ray_raytp_recoveries_total", "ray_raytp_recomputed_tokens_total"}
MOE_ONLY = {"ray_raytp_expert_tokens_per_step_bucket"}  # recorded for mixture-of-experts models only (tests/unit/test_moe.py)
# Recorded for pipelines only (tests/cluster/test_pipeline.py).
PIPELINE_ONLY = {"ray_raytp_stage_compute_seconds_bucket", "ray_raytp_stage_busy_seconds_total",
                 "ray_raytp_stage_sent_bytes_total"}


def scrape(port: int) -> dict[str, list]:
    """metric name -> [(labels, value)] from Ray's metrics port (names as exported, e.g. ..._total, ..._bucket)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def total(samples: dict, name: str, **labels) -> float:
    return sum(v for lab, v in samples.get(name, []) if all(lab.get(k) == w for k, w in labels.items()))


def complete(base: str, prompt_len: int, max_tokens: int, stream: bool = False) -> dict:
    body = {"model": MODEL, "prompt": list(range(10, 10 + prompt_len)), "max_tokens": max_tokens,
            "temperature": 0.0, "ignore_eos": True, "stream": stream}
    if not stream:
        r = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["usage"]
    body["stream_options"] = {"include_usage": True}
    usage = None
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                usage = json.loads(line[6:]).get("usage") or usage
    return usage


def deploy(user_config: dict | None = None) -> None:
    """`serve deploy` of a config for this app; a changed user_config alone updates the live replica in place."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    deployment = {"name": "RaytpServer",
                  "autoscaling_config": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 8}}
    if user_config:
        deployment["user_config"] = user_config
    schema = ServeDeploySchema.model_validate({"applications": [{
        "name": APP, "route_prefix": "/", "import_path": "raytp.serve.app:build_app",
        "args": {"model": "tiny", "served_model_name": MODEL, "tensor_parallel_size": 2, "device": "cpu",
                 "max_model_len": 128, "num_spare_ranks": 0},  # no rank is killed here: no spare needed
        "deployments": [deployment],
    }]})
    _get_global_client().deploy_apps(schema)
    deadline = time.monotonic() + 120
    while True:
        app = serve.status().applications.get(APP)
        if app is not None and app.status == "RUNNING":
            return
        assert time.monotonic() < deadline, f"app not running: {app}"
        time.sleep(0.3)


@pytest.fixture(scope="module")
def served(ray_cluster):
    from ray import serve
    from ray.serve.context import _get_global_client

    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    base = f"http://127.0.0.1:{_get_global_client().http_config.port}"
    deploy()
    usages = [complete(base, p, m, stream=i % 2 == 1) for i, (p, m) in enumerate(REQUESTS)]
    # One client error, so Serve's error counter (an error-rate panel) exists too.
    assert httpx.post(f"{base}/v1/completions", json={"model": "nope", "prompt": "x"}, timeout=30).status_code == 404
    # A live resize (same replica, new user_config) counts as a group restart and changes the TP-size gauge.
    handle = serve.get_deployment_handle("RaytpServer", app_name=APP)
    replica_pid = handle.engine_stats.remote().result(timeout_s=30)["pid"]
    deploy({"tensor_parallel_size": 1})
    deadline = time.monotonic() + 60
    while (stats := handle.engine_stats.remote().result(timeout_s=30))["tp_size"] != 1:
        assert time.monotonic() < deadline, "resize to TP=1 did not happen"
        time.sleep(0.2)
    assert stats["pid"] == replica_pid, "the replica was replaced instead of resized in place"
    usages.append(complete(base, 4, 5))
    yield base, usages
    serve.delete(APP)


def test_scrape_has_every_family_with_the_right_values(ray_cluster, served):
    base, usages = served
    gen = sum(u["completion_tokens"] for u in usages)
    prompt = sum(u["prompt_tokens"] for u in usages)
    # Ray exports on an interval: wait until the counters have caught up.
    deadline = time.monotonic() + 30
    while True:
        m = scrape(ray_cluster.metrics_export_port)
        if total(m, "ray_raytp_generation_tokens_total", model_name=MODEL) == gen or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert total(m, "ray_raytp_generation_tokens_total", model_name=MODEL) == gen
    assert total(m, "ray_raytp_prompt_tokens_total", model_name=MODEL) == prompt
    assert total(m, "ray_raytp_prefix_cache_queries_total", model_name=MODEL) == prompt
    assert total(m, "ray_raytp_prefix_cache_hits_total", model_name=MODEL) == 16
    assert total(m, "ray_raytp_request_success_total", model_name=MODEL, finished_reason="length") == len(usages)
    assert total(m, "ray_raytp_tp_group_restarts_total", model_name=MODEL) == 1
    # That restart was a resize, not a recovery (tests/cluster/test_elastic.py kills ranks): no recovery is counted,
    # and with no request running when it came, no token was recomputed.
    assert total(m, "ray_raytp_recoveries_total", model_name=MODEL) == 0
    assert total(m, "ray_raytp_recovery_seconds_count", model_name=MODEL) == 0
    assert total(m, "ray_raytp_recomputed_tokens_total", model_name=MODEL) == 0
    assert total(m, "ray_raytp_tensor_parallel_size", model_name=MODEL) == 1
    assert total(m, "ray_raytp_attention_backend", model_name=MODEL, backend="cpu") == 1  # the compiled op, not the fallback
    assert total(m, "ray_raytp_num_requests_running", model_name=MODEL) == 0
    n = len(usages)
    for hist in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert total(m, f"ray_raytp_{hist}_count", model_name=MODEL) == n, hist
        buckets = [(lab, v) for lab, v in m[f"ray_raytp_{hist}_bucket"] if lab.get("model_name") == MODEL]
        assert max(v for lab, v in buckets if lab["le"] == "+Inf") == n
    # One inter-token gap per token after the first.
    assert total(m, "ray_raytp_inter_token_latency_seconds_count", model_name=MODEL) == gen - n
    steps = total(m, "ray_raytp_allreduce_seconds_count", model_name=MODEL)
    assert steps > 0
    # One step-time observation per step, next to its all-reduce time; steps take time.
    assert total(m, "ray_raytp_step_seconds_count", model_name=MODEL) == steps
    assert total(m, "ray_raytp_step_seconds_sum", model_name=MODEL) > 0
    kv = [v for lab, v in m["ray_raytp_kv_cache_usage_perc"] if lab.get("model_name") == MODEL]
    assert kv and all(0.0 <= v <= 1.0 for v in kv)
    # Every metric the dashboard queries exists in this scrape, but the recovery families and the experts' load: Ray
    # exports a series only from its first record, and this module recovers nothing and serves a dense model.
    missing = dashboard_metric_names() - set(m) - RECOVERY_ONLY - MOE_ONLY - PIPELINE_ONLY
    assert not missing, f"dashboard queries metrics the server does not export: {sorted(missing)}"


def _fill(expr: str) -> str:
    """A dashboard expression with Grafana's variables filled in for this test."""
    return (expr.replace("$__rate_interval", "30s").replace('"$model_name"', f'"{MODEL}"')
            .replace('"$application"', f'"{APP}"'))


def _query(prom: str, expr: str) -> list:
    url = f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    body = json.loads(urllib.request.urlopen(url, timeout=10).read())
    assert body["status"] == "success", body
    return body["data"]["result"]


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs Debian's prometheus package (.ci/run installs it)")
def test_real_prometheus_answers_the_dashboard_queries(ray_cluster, served, tmp_path):
    base, _ = served
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: ray\n    static_configs: [{{targets: ['127.0.0.1:{ray_cluster.metrics_export_port}']}}]\n"
    )
    prom = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        exprs = dict((title, e) for title, e in dashboard_exprs() if "0.99" in e and "time_to_first_token" in e)
        ttft_p99 = _fill(next(iter(exprs.values())))
        tokens_s = _fill(next(e for t, e in dashboard_exprs() if "generation_tokens_total" in e))
        hit_rate = _fill(next(e for t, e in dashboard_exprs() if "prefix_cache_hits_total" in e))
        # Wait for Prometheus to scrape, then keep traffic flowing so rates over the window are non-zero.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if _query(url, 'up{job="ray"}') and _query(url, 'up{job="ray"}')[0]["value"][1] == "1":
                    break
            except OSError:
                pass
            time.sleep(0.5)
        results: dict = {}
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            complete(base, 8, 8)
            results = {"ttft_p99": _query(url, ttft_p99), "tokens_s": _query(url, tokens_s)}
            values = [float(r["value"][1]) for rs in results.values() for r in rs]
            if all(results.values()) and all(math.isfinite(v) and v > 0 for v in values):
                break
            time.sleep(0.5)
        assert results["ttft_p99"] and results["tokens_s"], results
        assert results["ttft_p99"][0]["metric"]["model_name"] == MODEL
        assert 0 < float(results["ttft_p99"][0]["value"][1]) < 60
        assert float(results["tokens_s"][0]["value"][1]) > 0
        # No hits in this window (8-token prompts): the hit rate reads 0, not "no data".
        rate = _query(url, hit_rate)
        assert rate and rate[0]["metric"]["model_name"] == MODEL and 0 <= float(rate[0]["value"][1]) <= 1, rate
    finally:
        prom.terminate()
        prom.wait(10)
