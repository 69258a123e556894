"""dashboards/raytp.json: a Grafana dashboard whose queries are valid PromQL
and name only metrics raytp (DESIGN's families) and Ray Serve export."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import schema_checks as sc  # noqa: E402

DASH = json.loads(sc.DASHBOARD.read_text())
PANELS = [p for p in sc.dashboard_panels(DASH) if p["type"] != "row"]
VARS = {v["name"]: v for v in DASH["templating"]["list"]}
DS_VAR = {"type": "prometheus", "uid": "${datasource}"}


def test_dashboard_header():
    assert DASH["schemaVersion"] >= 39
    assert "__inputs" not in DASH and "__requires" not in DASH
    assert DASH["uid"] and DASH["title"]


def test_template_variables():
    ds = VARS["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    model = VARS["model_name"]
    assert model["type"] == "query" and model["datasource"] == DS_VAR
    assert dict(sc.dashboard_variable_selectors(DASH))["model_name"] == "ray_raytp_num_requests_running"
    assert model["definition"] == "label_values(ray_raytp_num_requests_running, model_name)"
    for v in VARS.values():
        if v.get("includeAll"):
            assert v.get("allValue") == ".*", f"{v['name']}: All must be a regex for =~"


def test_panel_ids_and_layout():
    ids = [p["id"] for p in sc.dashboard_panels(DASH)]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for p in sc.dashboard_panels(DASH):
        g = p["gridPos"]
        assert set(g) == {"h", "w", "x", "y"} and 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
    # no two panels overlap
    cells = {}
    for p in sc.dashboard_panels(DASH):
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]


def test_panels_use_the_datasource_variable():
    assert PANELS
    for p in PANELS:
        assert p["type"] == "timeseries", p["title"]
        assert p["datasource"] == DS_VAR, p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t.get("datasource", DS_VAR) == DS_VAR, p["title"]


def test_required_panels_present():
    exprs = "\n".join(e for _, e in sc.dashboard_exprs(DASH))
    for q in ("0.5", "0.9", "0.99"):
        for h in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds"):
            assert f"histogram_quantile({q}, sum by (le, model_name) (rate(ray_raytp_{h}_bucket" in exprs
    for q in ("0.5", "0.99"):
        for h in ("request_queue_time_seconds", "allreduce_seconds"):
            assert f"histogram_quantile({q}, sum by (le, model_name) (rate(ray_raytp_{h}_bucket" in exprs
    assert "histogram_quantile(0.5, sum by (le, model_name) (rate(ray_raytp_step_seconds_bucket" in exprs
    used = sc.dashboard_metric_names(DASH)
    assert sc.exported_raytp_names() & used >= {
        "ray_raytp_prompt_tokens_total", "ray_raytp_generation_tokens_total",
        "ray_raytp_num_requests_running", "ray_raytp_num_requests_waiting", "ray_raytp_kv_cache_usage_perc",
        "ray_raytp_tensor_parallel_size", "ray_raytp_tp_group_restarts_total",
        "ray_raytp_recovery_seconds_bucket", "ray_raytp_recoveries_total", "ray_raytp_recomputed_tokens_total",
        "ray_raytp_attention_backend",
    }
    assert {"ray_serve_deployment_replica_healthy", "ray_serve_num_http_requests_total",
            "ray_serve_num_http_error_requests_total"} <= used
    assert "increase(ray_raytp_tp_group_restarts_total" in exprs
    # Recoveries (next to the restarts): time by phase, count by kind, recomputed tokens.
    assert "histogram_quantile(0.5, sum by (le, model_name, phase) (" in exprs
    assert "increase(ray_raytp_recovery_seconds_bucket" in exprs
    assert "sum by (model_name, kind) (" in exprs and "increase(ray_raytp_recoveries_total" in exprs
    assert "increase(ray_raytp_recomputed_tokens_total" in exprs
    # Pipeline stages: step time and idle fraction by stage, bytes between stages.
    assert "histogram_quantile(0.99, sum by (le, model_name, stage) (rate(ray_raytp_stage_compute_seconds_bucket" in exprs
    assert "1 - avg by (model_name, stage) (rate(ray_raytp_stage_busy_seconds_total" in exprs
    assert "sum by (model_name, stage) (rate(ray_raytp_stage_sent_bytes_total" in exprs


def test_raytp_queries_filter_by_model_and_use_rate_interval():
    for title, expr in sc.dashboard_exprs(DASH):
        if "ray_raytp_" in expr:
            for sel in re.findall(r"ray_raytp_\w+(\{[^}]*\})?", expr):
                assert 'model_name=~"$model_name"' in sel, f"{title}: unfiltered selector in {expr}"
        for rng in re.findall(r"\[([^\]]*)\]", expr):
            assert rng == "$__rate_interval", f"{title}: use $__rate_interval, not [{rng}]"
        # a multi-value variable only works with a regex matcher
        assert not re.search(r'[^=!]=\s*"\$', expr), f"{title}: use =~ with a variable: {expr}"


def test_metric_names_are_known():
    names = sc.dashboard_metric_names(DASH)
    raytp = {n for n in names if n.startswith("ray_raytp_")}
    other = names - raytp
    for n in raytp:
        base = n[len("ray_"):]
        if base in sc.RAYTP_GAUGES:
            continue
        if base.endswith("_total"):
            assert base[: -len("_total")] in sc.RAYTP_COUNTERS, n
        elif base.endswith("_bucket") or base.endswith("_count"):
            assert base.rsplit("_", 1)[0] in sc.RAYTP_HISTOGRAMS, n
        else:
            pytest.fail(f"{n}: not a DESIGN metric family with the suffix Ray exports it under "
                        "(histogram _bucket/_count; _sum is an estimate; counter _total; gauge bare)")
    assert other <= sc.SERVE_METRICS, other - sc.SERVE_METRICS


@pytest.mark.parametrize(
    "expr, names",
    [
        ('histogram_quantile(0.99, sum by (le, model_name) (rate(a_bucket{x=~"y|z"}[5m])))', {"a_bucket"}),
        ("sum(rate(a_total[1m])) / on(app) group_left(x) sum without (b) (c) > bool 0", {"a_total", "c"}),
        ("a unless a offset 10m or max_over_time(b[1h:5m]) and vector(1)", {"a", "b"}),
        ('label_replace(up{job="x by (y)"}, "d", "$1", "e", "(.*)")', {"up"}),
        ("count(x) by (le) * 1e3", {"x"}),
    ],
)
def test_metric_name_extractor(expr, names):
    assert sc.promql_metric_names(expr) == names


def test_grafana_variable_substitution():
    out = sc.grafana_expr_to_promql('rate(x{m=~"$model_name", a=~"${application}"}[$__rate_interval])')
    assert out == 'rate(x{m=~".*", a=~".*"}[1m])'


@pytest.mark.skipif(sc.promtool() is None, reason="promtool not on PATH (Debian/Ubuntu: apt-get install prometheus)")
def test_every_expr_is_valid_promql(tmp_path):
    """promtool has no 'parse expression' command: check every query as a recording rule."""
    exprs = [e for _, e in sc.dashboard_exprs(DASH)] + [s for _, s in sc.dashboard_variable_selectors(DASH)]
    rules = [{"record": f"raytp:dashboard_expr_{i}", "expr": sc.grafana_expr_to_promql(e)}
             for i, e in enumerate(exprs)]
    result = sc.promtool_check_rules([{"name": "dashboard", "rules": rules}], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout

    # and the check really rejects a broken expression
    bad = sc.promtool_check_rules([{"name": "bad", "rules": [{"record": "x:y", "expr": "sum(rate(a[1m])"}]}],
                                  tmp_path)
    assert bad.returncode != 0


def _expr_of(metric: str) -> str:
    (expr,) = [e for _, e in sc.dashboard_exprs(DASH) if metric in e]
    return sc.grafana_expr_to_promql(expr)


# Recoveries are rare, and Ray exports a counter (and a histogram's buckets) only from its first record: the first
# recovery of a replica makes new series at 1, and increase() of a new series is 0. The panels must show it anyway.
# Series values: `a+bxN` starts at a and adds b, N times; `_` is no sample. One sample per 15 s; $__rate_interval
# is 1m. Model m (replica w1): a spare replaces a rank at 5m (shard_load 0.75 s) and at 10m (0.25 s). Model q
# (replica w2): a rebuild at 10m (start 3 s) that recomputes 40 tokens.
def _buckets(model: str, worker: str, phase: str, values: dict[str, str]) -> list[dict]:
    return [{"series": f'ray_raytp_recovery_seconds_bucket{{model_name="{model}", phase="{phase}", le="{le}", '
                       f'WorkerId="{worker}"}}', "values": v} for le, v in values.items()]


RECOVERY_SERIES = [
    {"series": 'ray_raytp_tp_group_restarts_total{model_name="m", WorkerId="w1"}', "values": "_x20 1x19 2x20"},
    {"series": 'ray_raytp_tp_group_restarts_total{model_name="q", WorkerId="w2"}', "values": "_x40 1x19"},
    {"series": 'ray_raytp_recoveries_total{model_name="m", kind="replace", WorkerId="w1"}',
     "values": "_x20 1x19 2x20"},
    {"series": 'ray_raytp_recoveries_total{model_name="q", kind="rebuild", WorkerId="w2"}', "values": "_x40 1x19"},
    {"series": 'ray_raytp_recomputed_tokens_total{model_name="q", WorkerId="w2"}', "values": "_x40 40x19"},
    *_buckets("m", "w1", "shard_load", {"0.5": "_x20 0x19 1x20", "1.0": "_x20 1x19 2x20",
                                         "5.0": "_x20 1x19 2x20", "+Inf": "_x20 1x19 2x20"}),
    *_buckets("q", "w2", "start", {"0.5": "_x40 0x19", "1.0": "_x40 0x19", "5.0": "_x40 1x19", "+Inf": "_x40 1x19"}),
]
RECOVERY_EXPECTED = {  # metric -> eval time -> [(labels, value)]
    "ray_raytp_tp_group_restarts_total": {
        "4m": [], "5m30s": [('{model_name="m"}', 1)], "7m": [('{model_name="m"}', 0)],
        "10m30s": [('{model_name="m"}', 1), ('{model_name="q"}', 1)]},
    "ray_raytp_recoveries_total": {
        "4m": [], "5m30s": [('{model_name="m", kind="replace"}', 1)], "7m": [('{model_name="m", kind="replace"}', 0)],
        "10m30s": [('{model_name="m", kind="replace"}', 1), ('{model_name="q", kind="rebuild"}', 1)]},
    "ray_raytp_recomputed_tokens_total": {"5m30s": [], "10m30s": [('{model_name="q"}', 40)]},
    "ray_raytp_recovery_seconds_bucket": {  # bucket interpolation: the middle of the one observation's bucket
        "4m": [], "5m30s": [('{model_name="m", phase="shard_load"}', 0.75)], "7m": [],
        "10m30s": [('{model_name="m", phase="shard_load"}', 0.25), ('{model_name="q", phase="start"}', 3.0)]},
}


@pytest.mark.skipif(sc.promtool() is None, reason="promtool not on PATH (Debian/Ubuntu: apt-get install prometheus)")
def test_recovery_panels_show_a_single_recovery(tmp_path):
    cases = [{"expr": _expr_of(metric), "eval_time": t,
              "exp_samples": [{"labels": labels, "value": value} for labels, value in samples]}
             for metric, by_time in RECOVERY_EXPECTED.items() for t, samples in by_time.items()]
    tests = tmp_path / "tests.yaml"
    tests.write_text(yaml.safe_dump({"rule_files": [], "evaluation_interval": "15s", "tests": [
        {"interval": "15s", "input_series": RECOVERY_SERIES, "promql_expr_test": cases}]}, sort_keys=False))
    result = subprocess.run([sc.promtool(), "test", "rules", str(tests)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
