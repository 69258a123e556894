"""One local Ray cluster per test session (CPU only), shared by every test that asks for it."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import pytest

from raytp.ingress import choose_ingress

# Where Ray is not installed (the lent GPU machine, which runs tests/gpu in-process) no test needs it; a test that
# asks for the cluster is skipped there.
HAS_RAY = importlib.util.find_spec("ray") is not None

# The session's cluster fronts Serve with the ingress `raytp serve` starts by default (HAProxy handing connections to
# the replicas' own HTTP servers), so the Serve tests go the way users' requests go. Set here, before any test module
# imports ray.serve, whose constants read the environment once.
if HAS_RAY:
    choose_ingress("haproxy")


@dataclass(frozen=True)
class RayCluster:
    num_cpus: int
    metrics_export_port: int


@pytest.fixture(scope="session")
def ray_cluster():
    if not HAS_RAY:
        pytest.skip("Ray is not installed here")
    import ray

    from raytp.cluster.comm import free_port

    # Logical CPUs, not cores: room for a TP=2 group, Serve's actors and a second replica.
    num_cpus = 4
    port = free_port()
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        _metrics_export_port=port,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
        # Export metrics every second (default 10 s) so metric tests see them quickly. A node whose raylet is gone
        # is declared dead after ~3 s of refused health checks (default ~15 s), so that a removed node's stage moves
        # sooner (test_pipeline.py); a raylet that is slow to answer still has the default 10 s per check.
        _system_config={"metrics_report_interval_ms": 1000, "health_check_period_ms": 1000,
                        "health_check_failure_threshold": 3},
        log_to_driver=False,
    )
    yield RayCluster(num_cpus, port)
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()
