"""The metric families of DESIGN.md, recorded through Ray's metrics API.

Ray exports them on every node's metrics port with its `ray_` prefix, next to
Ray Serve's own metrics. Each carries a `model_name` tag.
"""
from __future__ import annotations

# Bucket boundaries (seconds) that fit LLM latencies: milliseconds to minutes.
LATENCY_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                   1.0, 1.5, 2.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0]
TOKEN_LATENCY_BUCKETS = [0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
                         0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 80.0]
EXPERT_TOKEN_BUCKETS = [0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
COLLECTIVE_BUCKETS = [0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0]
# Recovery phases run from milliseconds (a replacement) to minutes (a rebuild). Ray reports a histogram's sum from
# its buckets' midpoints, so the 1-5 s range (a hang's detection, a small model's rebuild) needs steps of its own:
# with 1.0 then 5.0, a 1 s detection read as 3 s.
RECOVERY_BUCKETS = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0,
                    120.0]


class EngineMetrics:
    """Engine-side recorder; one per replica (the engine calls it at each event)."""

    def __init__(self, model_name: str):
        from ray.util.metrics import Counter, Gauge, Histogram

        self.tags = {"model_name": model_name}
        keys = ("model_name",)

        def hist(name, desc, buckets):
            return Histogram(name, description=desc, boundaries=buckets, tag_keys=keys)

        self.ttft = hist("raytp_time_to_first_token_seconds", "Time from arrival to the first generated token.", LATENCY_BUCKETS)
        self.itl = hist("raytp_inter_token_latency_seconds", "Time between consecutive generated tokens of a request.", TOKEN_LATENCY_BUCKETS)
        self.e2e = hist("raytp_e2e_request_latency_seconds", "Time from arrival to the last token.", LATENCY_BUCKETS)
        self.queue = hist("raytp_request_queue_time_seconds", "Time a request waited before its first step.", LATENCY_BUCKETS)
        self.allreduce = hist("raytp_allreduce_seconds", "Time the ranks spent in TP collectives per step.", COLLECTIVE_BUCKETS)
        # Its rate is the fraction of time the TP group computes: near 1 when the engine keeps the ranks busy.
        self.step = hist("raytp_step_seconds", "Time the TP group spent running a step (slowest rank).", LATENCY_BUCKETS)
        # One observation per expert per step: a spread-out distribution (some experts near 0, some far above the
        # mean) is routing imbalance, which under expert_parallel leaves ranks waiting for the busiest one.
        self.expert_tokens = hist("raytp_expert_tokens_per_step", "Mixture-of-experts models: tokens an expert got "
                                  "in a step, averaged over the MoE layers; one observation per expert per step.",
                                  EXPERT_TOKEN_BUCKETS)
        # Pipelines, by stage: the time a stage computed in a step (its slowest rank, less the wait for the stream
        # from the stage before), as a histogram (step time) and a counter, whose rate is the fraction of time the
        # stage computes: 1 minus it is the stage's idle (bubble) fraction. (A histogram's _sum is estimated from
        # its buckets on export: not exact enough for that.)
        stage_keys = keys + ("stage",)
        self.stage_compute = Histogram("raytp_stage_compute_seconds", description="Pipeline stages: seconds a stage "
                                       "computed in a step (slowest rank, less its wait for the stage before it; the first stage's: "
                                       "for the last stage's tokens).",
                                       boundaries=LATENCY_BUCKETS, tag_keys=stage_keys)
        self.stage_busy = Counter("raytp_stage_busy_seconds", description="Pipeline stages: seconds a stage computed "
                                  "(its rate is the stage's busy fraction).", tag_keys=stage_keys)
        self.stage_sent = Counter("raytp_stage_sent_bytes", description="Pipeline stages: bytes of the residual "
                                  "stream a stage's ranks sent to the next stage.", tag_keys=stage_keys)
        self.running = Gauge("raytp_num_requests_running", description="Requests in the running batch.", tag_keys=keys)
        self.waiting = Gauge("raytp_num_requests_waiting", description="Requests waiting to be scheduled.", tag_keys=keys)
        self.kv_usage = Gauge("raytp_kv_cache_usage_perc", description="Fraction of KV-cache blocks in use (0-1).", tag_keys=keys)
        self.tp_size = Gauge("raytp_tensor_parallel_size", description="Current TP degree of the replica's group.", tag_keys=keys)
        self.prompt_tokens = Counter("raytp_prompt_tokens", description="Prompt tokens of admitted requests.", tag_keys=keys)
        self.generation_tokens = Counter("raytp_generation_tokens", description="Tokens generated.", tag_keys=keys)
        self.success = Counter("raytp_request_success", description="Finished requests by reason.", tag_keys=keys + ("finished_reason",))
        self.prefix_queries = Counter("raytp_prefix_cache_queries", description="Tokens of admitted sequences looked up in the prefix cache.", tag_keys=keys)
        self.prefix_hits = Counter("raytp_prefix_cache_hits", description="Tokens of admitted sequences found in the prefix cache.", tag_keys=keys)
        self.restarts = Counter("raytp_tp_group_restarts", description="TP group recoveries and resizes.", tag_keys=keys)
        self.recovery = Histogram(
            "raytp_recovery_seconds", description="Time each phase of a recovery took (detect, abort, spare_join, "
            "shard_load, kv_restore, communicator, replay; teardown and start for a rebuild).",
            boundaries=RECOVERY_BUCKETS, tag_keys=keys + ("phase",))
        self.recoveries = Counter("raytp_recoveries", description="Recoveries of the TP group by kind: replace (a spare "
                                  "took a lost rank's place), rebuild, degrade (rebuilt smaller).",
                                  tag_keys=keys + ("kind",))
        self.health_checks = Counter("raytp_health_checks", description="Serve's health checks of the replica by "
                                     "result: ok, recovering (a fault the engine is mending: reported healthy, so "
                                     "Serve keeps the replica) or failed (beyond repair: Serve replaces it).",
                                     tag_keys=keys + ("result",))
        self.attention_backend = Gauge("raytp_attention_backend", description="1 for the attention kernel the "
                                       "replica's ranks run (cpu, cuda-paged, cuda-gathered, or reference: the slow "
                                       "fallback where the device's kernel cannot run).", tag_keys=keys + ("backend",))
        self._backend = ""
        self.recomputed = Counter("raytp_recomputed_tokens", description="Tokens whose KV a completed step had computed "
                                  "and a recovery lost, so they were computed again.", tag_keys=keys)

    def on_step(self, num_running: int, num_waiting: int, kv_usage: float, collective_seconds: float,
                step_seconds: float) -> None:
        self.set_load(num_running, num_waiting, kv_usage)
        self.allreduce.observe(collective_seconds, tags=self.tags)
        self.step.observe(step_seconds, tags=self.tags)

    def set_load(self, num_running: int, num_waiting: int, kv_usage: float) -> None:
        self.running.set(num_running, tags=self.tags)
        self.waiting.set(num_waiting, tags=self.tags)
        self.kv_usage.set(kv_usage, tags=self.tags)

    def on_stages(self, compute_seconds: list[float], sent_bytes: list[int]) -> None:
        for stage, seconds in enumerate(compute_seconds):
            tags = {**self.tags, "stage": str(stage)}
            self.stage_compute.observe(seconds, tags=tags)
            self.stage_busy.inc(seconds, tags=tags)
        for stage, sent in enumerate(sent_bytes):
            self.stage_sent.inc(sent, tags={**self.tags, "stage": str(stage)})

    def on_expert_tokens(self, per_expert: list[float]) -> None:
        for n in per_expert:
            self.expert_tokens.observe(n, tags=self.tags)

    def on_first_token(self, ttft: float, queue_time: float) -> None:
        self.ttft.observe(ttft, tags=self.tags)
        self.queue.observe(queue_time, tags=self.tags)

    def on_tokens(self, n: int, inter_token: float | None) -> None:
        self.generation_tokens.inc(n, tags=self.tags)
        if inter_token is not None:
            self.itl.observe(inter_token, tags=self.tags)

    def on_admitted(self, prompt_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens, tags=self.tags)

    def on_prefix_cache(self, queried_tokens: int, hit_tokens: int) -> None:
        if queried_tokens:
            self.prefix_queries.inc(queried_tokens, tags=self.tags)
            if hit_tokens:
                self.prefix_hits.inc(hit_tokens, tags=self.tags)

    def on_finished(self, reason: str, e2e: float) -> None:
        self.success.inc(1, tags={**self.tags, "finished_reason": reason})
        self.e2e.observe(e2e, tags=self.tags)

    def on_recovery(self, kind: str, phases: dict[str, float]) -> None:
        self.recoveries.inc(1, tags={**self.tags, "kind": kind})
        for phase, seconds in phases.items():
            self.recovery.observe(seconds, tags={**self.tags, "phase": phase})

    def on_replay(self, seconds: float) -> None:
        self.recovery.observe(seconds, tags={**self.tags, "phase": "replay"})

    def on_recomputed(self, num_tokens: int) -> None:
        if num_tokens:
            self.recomputed.inc(num_tokens, tags=self.tags)

    def on_health_check(self, result: str) -> None:
        self.health_checks.inc(1, tags={**self.tags, "result": result})

    def on_group(self, tp_size: int, restarted: bool, attention_backend: str = "") -> None:
        self.tp_size.set(tp_size, tags=self.tags)
        if attention_backend:
            if self._backend and self._backend != attention_backend:
                self.attention_backend.set(0, tags={**self.tags, "backend": self._backend})
            self._backend = attention_backend
            self.attention_backend.set(1, tags={**self.tags, "backend": attention_backend})
        if restarted:
            self.restarts.inc(1, tags=self.tags)
