"""Strict checks for the config artifacts (Serve configs, KubeRay manifests, dashboard).

Ray Serve's schema models and Kubernetes' CRD pruning both *ignore* keys they
do not know, so a misspelled key (``num_replica``, ``rayStartParam``) would
silently do nothing. The walkers here report such keys. Imported by
tests/unit/test_deployments.py, test_k8s.py and test_dashboard.py (and later by
cluster tests that compare the dashboard's metric names with a real scrape).
"""
from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import types
import typing
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
KUBERAY_SCHEMAS = SHARED / "schemas" / "kuberay"
DEPLOYMENTS = REPO / "deployments"
K8S = REPO / "k8s"
DASHBOARD = REPO / "dashboards" / "raytp.json"

# ---------------------------------------------------------------------------
# The app config contract: the keys `args` of `raytp.serve.app:build_app` may
# carry (raytp.config.EngineConfig's fields). test_deployments cross-checks it.
APP_CONFIG_KEYS = frozenset(
    {
        "model",
        "served_model_name",
        "tensor_parallel_size",
        "pipeline_parallel_size",
        "pipeline_partition",
        "pipeline_placement",
        "pipeline_steps_in_flight",
        "min_tensor_parallel_size",
        "num_spare_ranks",
        "gpu_host_copies",
        "hang_detection_multiple",
        "hang_detection_floor_s",
        "max_recoveries",
        "recovery_window_s",
        "device",
        "dtype",
        "quantization",
        "max_num_seqs",
        "max_model_len",
        "max_num_batched_tokens",
        "enable_prefix_caching",
        "block_size",
        "num_kv_blocks",
        "gpu_memory_utilization",
        "seed",
        "placement_timeout_s",
        "step_timeout_s",
        "init_timeout_s",
        "require_nvlink",
        "cpu_collectives",
        "cpus_per_rank",
        "attention_backend",
        "cuda_graphs",
        "expert_parallel",
        "pack_weights",
        "cpu_binding",
        "api_key",
        "max_queued_requests",
        "cors_allow_origins",
    }
)
# What `user_config` may carry (reconfigure of a live replica).
USER_CONFIG_KEYS = frozenset({"tensor_parallel_size"})
DEPLOYMENT_NAME = "RaytpServer"

# ---------------------------------------------------------------------------
# Metric families (DESIGN.md "Public contract"), recorded with Ray's metrics
# API and exported by each node's metrics agent with the `ray_` prefix.
# Ray 2.60 exports through OpenTelemetry's Prometheus exporter: counters get
# `_total` (verified on a scrape), histograms `_bucket`/`_count`/`_sum`
# (`_sum` estimated from bucket midpoints: don't use it), gauges as named.
RAYTP_HISTOGRAMS = frozenset(
    {
        "raytp_time_to_first_token_seconds",
        "raytp_inter_token_latency_seconds",
        "raytp_e2e_request_latency_seconds",
        "raytp_request_queue_time_seconds",
        "raytp_allreduce_seconds",
        "raytp_step_seconds",
        "raytp_recovery_seconds",
        "raytp_expert_tokens_per_step",
        "raytp_stage_compute_seconds",
    }
)
RAYTP_GAUGES = frozenset(
    {
        "raytp_num_requests_running",
        "raytp_num_requests_waiting",
        "raytp_kv_cache_usage_perc",
        "raytp_tensor_parallel_size",
        "raytp_attention_backend",
    }
)
RAYTP_COUNTERS = frozenset(
    {
        "raytp_prompt_tokens",
        "raytp_generation_tokens",
        "raytp_request_success",
        "raytp_tp_group_restarts",
        "raytp_prefix_cache_queries",
        "raytp_prefix_cache_hits",
        "raytp_recoveries",
        "raytp_recomputed_tokens",
        "raytp_stage_busy_seconds",
        "raytp_stage_sent_bytes",
    }
)
# Ray Serve's own metrics as a Ray 2.60 metrics port exports them (names taken
# from a scrape of a running Serve app; the source builds some with f-strings,
# e.g. f"serve_num_{protocol}_requests", so grep does not find them).
SERVE_METRICS = frozenset(
    {
        "ray_serve_num_http_requests_total",  # labels: application, route, method, status_code
        "ray_serve_num_http_error_requests_total",  # application, route, method, error_code (4xx and 5xx)
        "ray_serve_num_deployment_http_error_requests_total",  # + deployment
        "ray_serve_http_request_latency_ms_bucket",  # application, route, method, status_code
        "ray_serve_deployment_replica_healthy",  # application, deployment, replica
        "ray_serve_autoscaling_target_replicas",  # application, deployment
        "ray_serve_deployment_request_counter_total",  # application, deployment, replica, route
        "ray_serve_deployment_error_counter_total",  # + exception_type
        "ray_serve_deployment_processing_latency_ms_bucket",
        "ray_serve_replica_processing_queries",
        "ray_serve_num_ongoing_http_requests",
        "ray_serve_deployment_replica_starts_total",
    }
)


def exported_raytp_names() -> frozenset[str]:
    """Every series name the raytp families can appear under on a scrape."""
    names = set()
    for h in RAYTP_HISTOGRAMS:
        names |= {f"ray_{h}_bucket", f"ray_{h}_count", f"ray_{h}_sum"}
    names |= {f"ray_{g}" for g in RAYTP_GAUGES}
    names |= {f"ray_{c}_total" for c in RAYTP_COUNTERS}
    return frozenset(names)


# ---------------------------------------------------------------------------
# Serve config: pydantic validation plus a walk for keys the schema ignores.

# Fields whose content is free-form on purpose (ours or Ray's).
_FREE_FORM_FIELDS = {"args", "user_config", "runtime_env", "resources"}


def _model_in(annotation: Any):
    """The pydantic model a field's annotation holds (through Optional/Union/List/Dict), or None."""
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return ("model", annotation)
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _model_in(args[0])
    if origin in (typing.Union, types.UnionType):
        for a in args:
            found = _model_in(a)
            if found:
                return found
        return None
    if origin in (list, tuple, set, frozenset) and args:
        found = _model_in(args[0])
        return ("list", found) if found else None
    if origin is dict and len(args) == 2:
        found = _model_in(args[1])
        return ("dict", found) if found else None
    return None


def unknown_model_keys(data: Any, model: type, path: str = "") -> list[str]:
    """Dotted paths of keys in `data` that pydantic `model` (recursively) has no field for."""
    found: list[str] = []
    if not isinstance(data, dict):
        return found
    fields = model.model_fields
    by_name = {}
    for name, f in fields.items():
        by_name[name] = f
        if f.alias:
            by_name[f.alias] = f
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        field = by_name.get(key)
        if field is None:
            found.append(where)
            continue
        if key in _FREE_FORM_FIELDS:
            continue
        found += _walk_annotation(value, _model_in(field.annotation), where)
    return found


def _walk_annotation(value: Any, shape, where: str) -> list[str]:
    if shape is None:
        return []
    kind, inner = shape
    if kind == "model":
        return unknown_model_keys(value, inner, where)
    if kind == "list" and isinstance(value, list):
        out = []
        for i, item in enumerate(value):
            out += _walk_annotation(item, inner, f"{where}[{i}]")
        return out
    if kind == "dict" and isinstance(value, dict):
        out = []
        for k, item in value.items():
            out += _walk_annotation(item, inner, f"{where}.{k}")
        return out
    return []


def check_serve_config(data: dict, where: str = "serve config"):
    """Validate a Serve config (ServeDeploySchema) strictly; return the parsed schema.

    Raises AssertionError naming the unknown keys, args keys outside the app
    config contract, or a `args` that raytp's EngineConfig rejects.
    """
    from ray.serve.schema import ServeDeploySchema

    from raytp.config import EngineConfig

    parsed = ServeDeploySchema.model_validate(data)
    unknown = unknown_model_keys(data, ServeDeploySchema)
    assert not unknown, f"{where}: keys Ray Serve would silently ignore: {unknown}"
    for app in data["applications"]:
        args = app.get("args") or {}
        bad = sorted(set(args) - APP_CONFIG_KEYS)
        assert not bad, f"{where}: app {app.get('name')!r} args keys not in the app config: {bad}"
        EngineConfig.parse(args)  # raises ConfigError naming field and value
        for dep in app.get("deployments", []):
            assert dep["name"] == DEPLOYMENT_NAME, f"{where}: unknown deployment {dep['name']!r}"
            bad = sorted(set(dep.get("user_config") or {}) - USER_CONFIG_KEYS)
            assert not bad, f"{where}: user_config keys raytp does not reconfigure: {bad}"
    return parsed


# ---------------------------------------------------------------------------
# Kubernetes: CRD schemas, jsonschema validation and a pruning check.

# ObjectMeta fields a manifest may set (the API server validates metadata
# itself; the CRD schema just says `type: object`).
OBJECT_META_FIELDS = frozenset(
    {"name", "namespace", "labels", "annotations", "generateName", "finalizers", "ownerReferences"}
)


@functools.lru_cache(maxsize=None)
def crd_schema(kind: str, version: str) -> dict:
    """openAPIV3Schema of ray.io `kind` at `version` from ../shared/schemas/kuberay (cached: do not mutate)."""
    path = KUBERAY_SCHEMAS / f"ray.io_{kind.lower()}s.yaml"
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are ~1 MB each
    crd = yaml.load(path.read_text(), Loader=loader)
    assert crd["spec"]["names"]["kind"] == kind
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            assert v.get("served", False), f"{kind} {version} is not served"
            return v["schema"]["openAPIV3Schema"]
    raise AssertionError(f"{path.name} has no version {version}")


def unknown_k8s_fields(obj: Any, schema: dict, path: str = "") -> list[str]:
    """Fields the API server would prune: keys not in `properties` where no
    `additionalProperties` allows them (structural-schema pruning, which is
    silent). Embedded `metadata` objects are checked against ObjectMeta."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found: list[str] = []
    if isinstance(obj, dict):
        props = schema.get("properties")
        addl = schema.get("additionalProperties")
        if props is None and addl is None:
            if path.endswith("metadata") or path == "":
                allowed = OBJECT_META_FIELDS
                return [f"{path}.{k}" for k in obj if k not in allowed]
            if obj:
                return [f"{path} (object without a schema: all of it would be pruned)"]
            return []
        for key, value in obj.items():
            where = f"{path}.{key}"
            if props is not None and key in props:
                found += unknown_k8s_fields(value, props[key], where)
            elif isinstance(addl, dict):
                found += unknown_k8s_fields(value, addl, where)
            elif addl is True:
                continue
            else:
                found.append(where)
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(obj):
            found += unknown_k8s_fields(item, schema["items"], f"{path}[{i}]")
    return found


def validate_kuberay(manifest: dict) -> list[str]:
    """All problems of a ray.io manifest against its CRD: jsonschema errors and pruned fields."""
    import jsonschema

    group, _, version = manifest["apiVersion"].partition("/")
    assert group == "ray.io", manifest["apiVersion"]
    schema = crd_schema(manifest["kind"], version)
    validator = jsonschema.Draft7Validator(schema)
    problems = [
        f"{'.'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}"
        for e in validator.iter_errors(manifest)
    ]
    meta = manifest.get("metadata") or {}
    problems += [f"unknown metadata field {k}" for k in meta if k not in OBJECT_META_FIELDS]
    spec = manifest.get("spec", {})
    problems += [
        f"unknown field (pruned by the API server): spec{p}"
        for p in unknown_k8s_fields(spec, schema["properties"]["spec"], "")
    ]
    return problems


def load_yaml_documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


# ---------------------------------------------------------------------------
# Prometheus: promtool, and a PromQL metric-name extractor.


def promtool() -> str | None:
    return shutil.which("promtool")


def promtool_check_rules(groups: list[dict], tmp_dir: Path) -> subprocess.CompletedProcess:
    """Run `promtool check rules` on `groups` written as a plain Prometheus rules file."""
    path = Path(tmp_dir) / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return subprocess.run(
        [promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )


_PROMQL_KEYWORDS = frozenset(
    {
        "by", "without", "on", "ignoring", "group_left", "group_right", "offset",
        "bool", "and", "or", "unless", "atan2", "inf", "nan", "start", "end",
    }
)
_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_TOKEN = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*|[0-9][A-Za-z0-9_.]*|\S")


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (not functions, keywords, labels or durations)."""
    s = _STRING.sub('""', expr)
    s = re.sub(r"\{[^}]*\}", "{}", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", "[]", s)  # range / subquery durations
    s = _GROUPING.sub(" ", s)  # label lists of by/without/on/ignoring/group_*
    names: set[str] = set()
    tokens = [m.group(0) for m in _TOKEN.finditer(s)]
    for i, tok in enumerate(tokens):
        if not (tok[0].isalpha() or tok[0] in "_:"):
            continue
        nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
        if nxt == "(" or tok in _PROMQL_KEYWORDS:
            continue
        names.add(tok)
    return names


# Grafana variables -> values that keep an expression valid PromQL.
_GRAFANA_VARS = {
    "__rate_interval": "1m",
    "__interval": "1m",
    "__range": "1h",
}


def grafana_expr_to_promql(expr: str) -> str:
    """Replace Grafana's $vars in `expr`: intervals by durations, the rest by `.*`."""

    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        return _GRAFANA_VARS.get(name, ".*")

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", sub, expr)


def dashboard_panels(dashboard: dict | None = None) -> list[dict]:
    """Every panel of the dashboard, rows' nested panels included."""
    if dashboard is None:
        dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for p in dashboard.get("panels", []):
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def dashboard_exprs(dashboard: dict | None = None) -> list[tuple[str, str]]:
    """(panel title, expr) for every Prometheus target of the dashboard."""
    return [
        (p.get("title", ""), t["expr"])
        for p in dashboard_panels(dashboard)
        for t in p.get("targets", [])
        if "expr" in t
    ]


def dashboard_variable_selectors(dashboard: dict | None = None) -> list[tuple[str, str]]:
    """(variable name, series selector) of every `label_values(selector, label)` query variable."""
    if dashboard is None:
        dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var.get("query")
        query = query.get("query", "") if isinstance(query, dict) else (query or "")
        m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", query)
        assert m, f"variable {var.get('name')}: not a label_values(selector, label) query: {query!r}"
        out.append((var["name"], m.group(1)))
    return out


def dashboard_metric_names(dashboard: dict | None = None) -> set[str]:
    """Every metric name dashboards/raytp.json queries (panels and variables),
    as a scrape shows it (e.g. `ray_raytp_time_to_first_token_seconds_bucket`)."""
    names: set[str] = set()
    for _, expr in dashboard_exprs(dashboard):
        names |= promql_metric_names(grafana_expr_to_promql(expr))
    for _, selector in dashboard_variable_selectors(dashboard):
        names |= promql_metric_names(grafana_expr_to_promql(selector))
    return names
