"""deployments/tiny-cpu.yaml deployed for real (as `serve deploy` does), and bad app configs.

The YAML goes through Serve's own schema and controller: the controller
imports `raytp.serve.app:build_app`, calls it with the YAML's `args` and
applies the `deployments:` overrides. Only `http_options` is replaced by a
free local port, so the test never takes the documented port 8000.
"""
from __future__ import annotations

import pathlib
import time

import httpx
import openai
import pytest
import yaml

from raytp.cluster.comm import free_port
from raytp.config import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY_CPU = ROOT / "deployments" / "tiny-cpu.yaml"

pytestmark = pytest.mark.timeout(240)


def _wait_running(app_name: str, timeout: float = 150.0) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout
    while True:
        app = serve.status().applications.get(app_name)
        status = app.status if app else None
        if status == "RUNNING":
            return
        if status == "DEPLOY_FAILED" or time.monotonic() > deadline:
            pytest.fail(f"application {app_name!r} is {status}: {app.message if app else 'not found'}")
        time.sleep(0.5)


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def deployed(ray_cluster):
    """tiny-cpu.yaml deployed through Serve's controller; yields (schema, base_url)."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    assert TINY_CPU.is_file(), f"{TINY_CPU} is missing"
    schema = ServeDeploySchema.model_validate(yaml.safe_load(TINY_CPU.read_text()))
    # Keep everything but the HTTP port (8000 may be in use on this machine).
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()}, proxy_location=schema.proxy_location)
    client = _get_global_client()
    client.deploy_apps(schema)
    (app,) = schema.applications
    _wait_running(app.name)
    yield schema, f"http://127.0.0.1:{client.http_config.port}{app.route_prefix.rstrip('/')}"
    serve.shutdown()


def test_tiny_cpu_yaml_is_the_agreed_app(deployed):
    schema, _ = deployed
    (app,) = schema.applications
    assert app.import_path == "raytp.serve.app:build_app"
    assert app.args["model"] == "tiny" and app.args["tensor_parallel_size"] == 2 and app.args["device"] == "cpu"
    (dep,) = app.deployments
    assert dep.name == "RaytpServer"
    assert dep.ray_actor_options.num_cpus == 0


def test_tiny_cpu_yaml_serves_completions(deployed):
    from ray import serve

    schema, base_url = deployed
    (app,) = schema.applications
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    res = client.completions.create(model="tiny", prompt="Hello world", max_tokens=8, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert res.choices[0].finish_reason == "length" and res.usage.completion_tokens == 8
    assert res.choices[0].text
    assert httpx.get(base_url + "/health", timeout=30).status_code == 200
    stats = serve.get_deployment_handle("RaytpServer", app_name=app.name).engine_stats.remote().result(timeout_s=30)
    assert stats["tp_size"] == 2 and stats["ready"]


def test_user_config_reshards_the_live_replica(deployed):
    """user_config {tensor_parallel_size: 1} reaches RaytpServer.reconfigure; the same replica serves at TP=1."""
    from ray import serve
    from ray.serve.context import _get_global_client

    schema, base_url = deployed
    (app,) = schema.applications
    handle = serve.get_deployment_handle("RaytpServer", app_name=app.name)
    before = handle.engine_stats.remote().result(timeout_s=30)
    resized = schema.model_copy(deep=True)
    resized.applications[0].deployments[0].user_config = {"tensor_parallel_size": 1}
    _get_global_client().deploy_apps(resized)

    def at_tp1():
        s = handle.engine_stats.remote().result(timeout_s=30)
        return s if s["tp_size"] == 1 and s["ready"] else None

    after = _wait_for(at_tp1, 120, "the replica to reshard to tensor_parallel_size=1")
    assert after["admitted"] >= before["admitted"]  # the same replica (its counters carried on)
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=60)
    res = client.completions.create(model="tiny", prompt="Hello world", max_tokens=6, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert res.usage.completion_tokens == 6


@pytest.mark.parametrize(
    "override,field,value",
    [
        ({"tensor_parallel_size": 0}, "tensor_parallel_size", "0"),
        ({"device": "tpu"}, "device", "'tpu'"),
        ({"max_num_seqs": -3}, "max_num_seqs", "-3"),
        ({"no_such_option": 1}, "no_such_option", "1"),
        # Checked against the model (tiny: 4 layers) when it is here, as with `serve run`.
        ({"pipeline_parallel_size": 5}, "pipeline_parallel_size", "5"),
        ({"pipeline_parallel_size": 2, "pipeline_partition": [1, 2]}, "pipeline_partition", "[1, 2]"),
        ({"pipeline_parallel_size": 2, "pipeline_partition": [1, 1, 2]}, "pipeline_partition", "[1, 1, 2]"),
    ],
)
def test_bad_app_config_names_field_and_value(override, field, value):
    from raytp.serve.app import build_app

    args = {**yaml.safe_load(TINY_CPU.read_text())["applications"][0]["args"], **override}
    with pytest.raises(ConfigError) as info:
        build_app(args)
    assert f"{field}={value}" in str(info.value)
