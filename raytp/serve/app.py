"""The Ray Serve application: one `RaytpServer` replica = one engine = one TP group.

`build_app(args)` is the `import_path` target of the Serve config files
(`raytp.serve.app:build_app`); `args` is the app config, validated as an
`EngineConfig` (a bad value raises ConfigError naming the field and value).
`user_config: {tensor_parallel_size: N}` reshards a live replica.

The replica actor itself reserves no CPU by default: the TP ranks are
separate actors in the replica's own placement group, and the replica
mostly waits on them.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any

from ray import serve
from ray.serve import Application

from raytp.config import ConfigError, EngineConfig
from raytp.metrics import EngineMetrics
from raytp.serve.api import build_api

log = logging.getLogger("ray.serve")

DEPLOYMENT_NAME = "RaytpServer"
DEFAULT_APP_NAME = "raytp"
# Deployment options; a Serve config's `deployments:` entry for RaytpServer overrides any of them.
DEPLOYMENT_OPTIONS: dict[str, Any] = {
    "ray_actor_options": {"num_cpus": 0},
    "max_ongoing_requests": 256,
    "graceful_shutdown_timeout_s": 30,
    "graceful_shutdown_wait_loop_s": 1,
    # Serve replaces a replica after 3 failed checks in a row (a constant of Serve's, not a deployment option) and
    # counts a check that outlasts health_check_timeout_s as failed. raytp keeps the two policies from fighting by
    # what check_health reports, not by long periods: it fails only for what the engine cannot recover (a permanent
    # error, or not ready for longer than a rebuild may take: _recovery_grace_s); a dead or hung rank is reported
    # healthy-but-recovering while the engine mends it (a replacement takes ~0.1-1 s on CPU, a rebuild as long as
    # loading the model). The check itself waits at most ~1 s on the ranks' pings, so 30 s of timeout leave room
    # for a busy replica, and 10 s x 3 detects a replica that is truly gone within ~30 s.
    "health_check_period_s": 10,
    "health_check_timeout_s": 30,
}


class ReplicaMetrics(EngineMetrics):
    """EngineMetrics (exported through Ray) that also keeps this replica's totals for engine_stats()."""

    def __init__(self, model_name: str):
        super().__init__(model_name)
        self.admitted = 0
        self.finished: dict[str, int] = {}
        self.health_check_results: dict[str, int] = {}

    def on_admitted(self, prompt_tokens: int) -> None:
        super().on_admitted(prompt_tokens)
        self.admitted += 1

    def on_finished(self, reason: str, e2e: float) -> None:
        super().on_finished(reason, e2e)
        self.finished[reason] = self.finished.get(reason, 0) + 1

    def on_health_check(self, result: str) -> None:
        super().on_health_check(result)
        self.health_check_results[result] = self.health_check_results.get(result, 0) + 1


def _replica_engine():
    """The engine of the replica this request runs in (None while its constructor runs)."""
    return getattr(serve.get_replica_context().servable_object, "engine", None)


fastapi_app = build_api(_replica_engine)


@serve.deployment(name=DEPLOYMENT_NAME, **DEPLOYMENT_OPTIONS)
@serve.ingress(fastapi_app)
class RaytpServer:
    """Owns one AsyncEngine; HTTP comes in through `fastapi_app`.

    `executor_factory` lets tests swap the Ray TP group for another executor.
    """

    async def __init__(self, engine_config: dict, executor_factory=None):
        from raytp.engine.engine import AsyncEngine, ray_executor

        self.config = EngineConfig.parse(engine_config)
        self.engine = None
        self._not_ready_since: float | None = None
        self.metrics = metrics = ReplicaMetrics(self.config.model_name())
        engine = AsyncEngine(self.config, executor_factory or ray_executor, metrics=metrics)
        t0 = time.monotonic()
        await engine.start()
        self.engine = engine
        stages = getattr(engine.core.executor, "stages", [None])
        pipeline = (f", pipeline_parallel_size={len(stages)} (layers per stage: "
                    f"{[stage.num_layers for stage in stages]})" if len(stages) > 1 else "")
        log.info("raytp replica ready: model %s, tensor_parallel_size=%d%s, %s, max_model_len=%d (%.1fs)",
                 engine.model_name, engine.tp_size, pipeline, engine.core.executor.dtype, engine.max_model_len,
                 time.monotonic() - t0)

    async def reconfigure(self, user_config: dict | None) -> None:
        """Serve's user_config: {"tensor_parallel_size": N} reshards this replica at the next step."""
        user_config = dict(user_config or {})
        unknown = sorted(set(user_config) - {"tensor_parallel_size"})
        if unknown:
            raise ConfigError(f"invalid user_config: unknown key(s) {unknown}; only tensor_parallel_size may change")
        if "tensor_parallel_size" not in user_config:
            return
        tp = user_config["tensor_parallel_size"]
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
            raise ConfigError(f"invalid user_config: tensor_parallel_size={tp!r}: must be an integer >= 1")
        log.info("user_config: resizing to tensor_parallel_size=%d (now %d)", tp, self.engine.tp_size)
        await self.engine.resize(tp)

    # A rebuild (worker failure or resize) may take as long as placing the group and loading the weights;
    # only a replica that stays not-ready longer than that is reported unhealthy (and replaced by Serve).
    def _recovery_grace_s(self) -> float:
        return self.config.placement_timeout_s + self.config.init_timeout_s + 30.0

    async def check_health(self) -> None:
        """Serve's health check: raises (so Serve replaces the replica) only when the engine cannot recover."""
        try:
            recovering = await self._recovering()
        except Exception:
            self.metrics.on_health_check("failed")
            raise
        self.metrics.on_health_check("recovering" if recovering else "ok")

    async def _recovering(self) -> bool:
        """Whether the engine is mending a fault (healthy for Serve); raises for a fault it cannot mend."""
        from raytp.engine.engine import EngineNotReady

        if self.engine is None:
            raise RuntimeError("the engine was not built")
        if self.engine.failed:
            raise RuntimeError(self.engine.failed)  # permanent: Serve replaces the replica
        if not self.engine.ready:
            # Starting or rebuilding: give the engine its own recovery time before Serve steps in.
            self._not_ready_since = self._not_ready_since or time.monotonic()
            waited = time.monotonic() - self._not_ready_since
            if waited > self._recovery_grace_s():
                raise RuntimeError(f"the TP group has not been ready for {waited:.0f}s")
            log.warning("health check: the TP group is recovering (%.0fs so far); reported healthy", waited)
            return True
        self._not_ready_since = None
        try:
            await self.engine.check_health()
        except EngineNotReady as err:
            # A dead or hung rank: the engine mends the group (replace, else rebuild) while requests wait. Serve
            # must not replace the replica meanwhile (that would fail every request it holds), so this counts
            # toward the recovery grace above, not as a failure.
            if self.engine.failed:
                raise RuntimeError(f"the TP group is unhealthy: {err}") from err
            log.warning("health check: %s; reported healthy while the engine mends it", err)
            self._not_ready_since = time.monotonic()
            return True
        return False

    async def engine_stats(self) -> dict:
        """Counters for tests and operators (call through a deployment handle)."""
        core = self.engine.core
        sched = core.scheduler
        finished = dict(self.metrics.finished)
        return {
            # Requests admitted, finished (by reason) and aborted (client went away) since the replica started.
            "admitted": self.metrics.admitted,
            "finished": finished,
            "aborted": self.metrics.admitted - sum(finished.values()) - len(core.requests),
            "model": self.engine.model_name,
            "pid": os.getpid(),
            "worker_pids": self.engine.core.executor.worker_pids(),
            "spares_ready": self.engine.core.executor.spares_ready(0),
            "recoveries": dict(self.engine.core.supervisor.recoveries),
            "health_checks": dict(self.metrics.health_check_results),
            "ready": self.engine.ready,
            "tp_size": self.engine.tp_size,
            "dtype": self.engine.core.executor.dtype,
            "attention_backend": self.engine.core.executor.attention_backend,
            "num_requests": len(core.requests),
            "num_running": len(sched.running),
            "num_waiting": len(sched.waiting),
            "free_blocks": sched.blocks.num_free,
            "total_blocks": sched.blocks.num_blocks,
        }

    async def __del__(self):
        # Serve calls this on graceful shutdown: release the workers and the placement group.
        engine = getattr(self, "engine", None)
        if engine is not None:
            self.engine = None
            await engine.shutdown()


def build_deployment(config: EngineConfig, **options: Any) -> Application:
    """The application for `config`; `options` override DEPLOYMENT_OPTIONS (e.g. num_replicas)."""
    deployment = RaytpServer.options(**options) if options else RaytpServer
    return deployment.bind(config.model_dump())


def build_app(args: dict) -> Application:
    """Serve's app builder (`import_path: raytp.serve.app:build_app`): `args` are EngineConfig fields. A model that
    is here (`serve run`, or a controller on the model's node) is checked against them now (its shapes against the
    TP degree, its layers against the pipeline), so that a bad value is one clear error instead of replicas that
    fail to start."""
    from raytp.engine.model_check import check_model

    config = EngineConfig.parse(dict(args or {}))
    try:
        check_model(config, remote_ok=True)
    except ValueError as err:
        raise ConfigError(f"invalid raytp config: {err}") from None
    return build_deployment(config)
