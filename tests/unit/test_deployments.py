"""deployments/: every Serve config validates against Ray Serve's schema, uses
no key Serve would silently ignore, and passes only app-config keys in `args`."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import schema_checks as sc  # noqa: E402

FILES = sorted(sc.DEPLOYMENTS.glob("*.yaml"))


def load(name: str) -> dict:
    return yaml.safe_load((sc.DEPLOYMENTS / name).read_text())


def test_expected_files_exist():
    assert {p.name for p in FILES} >= {"tiny-cpu.yaml", "llama3-8b-tp2.yaml", "llama3-70b-tp8.yaml"}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_serve_config_is_valid_and_strict(path):
    data = yaml.safe_load(path.read_text())
    parsed = sc.check_serve_config(data, where=path.name)
    assert [a.name for a in parsed.applications] == ["raytp"]
    app = parsed.applications[0]
    assert app.import_path == "raytp.serve.app:build_app"
    assert app.route_prefix == "/"
    assert [d.name for d in app.deployments] == [sc.DEPLOYMENT_NAME]
    dep = data["applications"][0]["deployments"][0]
    # The replica's placement group carries the GPUs; the actor itself must not ask for one.
    assert not dep.get("ray_actor_options", {}).get("num_gpus"), "RaytpServer must not reserve a GPU"
    assert dep["ray_actor_options"]["num_cpus"] <= 1


def test_app_config_contract_matches_engine_config():
    from raytp.config import EngineConfig

    assert sc.APP_CONFIG_KEYS == set(EngineConfig.model_fields), (
        "deployments' args contract and raytp.config.EngineConfig disagree: "
        f"only in contract {sorted(sc.APP_CONFIG_KEYS - set(EngineConfig.model_fields))}, "
        f"only in EngineConfig {sorted(set(EngineConfig.model_fields) - sc.APP_CONFIG_KEYS)}"
    )


def test_tiny_cpu_fits_a_two_core_laptop():
    data = load("tiny-cpu.yaml")
    assert data["http_options"] == {"host": "127.0.0.1", "port": 8000}
    app = data["applications"][0]
    assert app["args"] == {"model": "tiny", "tensor_parallel_size": 2, "device": "cpu"}
    dep = app["deployments"][0]
    assert dep["num_replicas"] == 1 and dep["ray_actor_options"] == {"num_cpus": 0}
    # 2 ranks x {"CPU": 1} + the replica's own CPUs
    assert app["args"]["tensor_parallel_size"] * 1 + dep["ray_actor_options"]["num_cpus"] <= 2


@pytest.mark.parametrize(
    "name, tp, max_replicas",
    [("llama3-8b-tp2.yaml", 2, 4), ("llama3-70b-tp8.yaml", 8, 2)],
)
def test_gpu_configs(name, tp, max_replicas):
    app = load(name)["applications"][0]
    args, dep = app["args"], app["deployments"][0]
    assert args["device"] == "cuda" and args["dtype"] == "bfloat16"
    assert args["tensor_parallel_size"] == tp
    assert args["model"].startswith("/models/")
    assert 1 <= args.get("min_tensor_parallel_size", 1) <= tp
    auto = dep["autoscaling_config"]
    assert "num_replicas" not in dep
    assert auto["min_replicas"] == 1 and auto["max_replicas"] == max_replicas
    # Serve caps a replica at max_ongoing_requests; the autoscaling target must be reachable,
    # and the engine's batch should be able to fill.
    assert auto["target_ongoing_requests"] < dep["max_ongoing_requests"]
    assert dep["max_ongoing_requests"] >= args["max_num_seqs"]
    if args.get("max_queued_requests") is not None:  # the replica's 429 must be reachable past Serve's router
        assert dep["max_ongoing_requests"] > args["max_num_seqs"] + args["max_queued_requests"]
    assert dep["graceful_shutdown_timeout_s"] > 0


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d: d["applications"][0]["deployments"][0].__setitem__("num_replica", 2),
         "applications[0].deployments[0].num_replica"),
        (lambda d: d["applications"][0]["deployments"][0]["ray_actor_options"].__setitem__("num_cpu", 1),
         "ray_actor_options.num_cpu"),
        (lambda d: d["applications"][0]["deployments"][0].update(
            num_replicas="auto", autoscaling_config={"min_replicas": 1, "max_replica": 2}),
         "autoscaling_config.max_replica"),
        (lambda d: d["http_options"].__setitem__("prot", 8000), "http_options.prot"),
        (lambda d: d.__setitem__("proxy_locations", "EveryNode"), "proxy_locations"),
        (lambda d: d["applications"][0].__setitem__("route-prefix", "/"), "applications[0].route-prefix"),
    ],
    ids=["deployment", "ray_actor_options", "autoscaling_config", "http_options", "top", "application"],
)
def test_unknown_key_checker_catches_typos(mutate, expected):
    from ray.serve.schema import ServeDeploySchema

    data = copy.deepcopy(load("tiny-cpu.yaml"))
    mutate(data)
    ServeDeploySchema.model_validate(data)  # Ray accepts it (and would ignore the key) ...
    unknown = sc.unknown_model_keys(data, ServeDeploySchema)  # ... the checker does not
    assert len(unknown) == 1 and unknown[0].endswith(expected), unknown
    with pytest.raises(AssertionError, match="silently ignore"):
        sc.check_serve_config(data)


def test_free_form_fields_are_not_walked():
    from ray.serve.schema import ServeDeploySchema

    data = copy.deepcopy(load("tiny-cpu.yaml"))
    data["applications"][0]["deployments"][0]["user_config"] = {"tensor_parallel_size": 1}
    data["applications"][0]["runtime_env"] = {"env_vars": {"X": "1"}}
    assert sc.unknown_model_keys(data, ServeDeploySchema) == []
    sc.check_serve_config(data)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("args", {"model": "tiny", "tensor_parallel_sizes": 2}, "tensor_parallel_sizes"),
        ("args", {"model": "tiny", "device": "tpu"}, "device"),
        ("user_config", {"max_num_seqs": 4}, "max_num_seqs"),
    ],
)
def test_args_and_user_config_are_checked(field, value, match):
    from raytp.config import ConfigError

    data = copy.deepcopy(load("tiny-cpu.yaml"))
    if field == "args":
        data["applications"][0]["args"] = value
    else:
        data["applications"][0]["deployments"][0]["user_config"] = value
    with pytest.raises((AssertionError, ConfigError), match=match):
        sc.check_serve_config(data)
