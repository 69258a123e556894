"""Offline API: `LLM(model, tensor_parallel_size=2, device="cpu").generate(prompts, params)`."""
from __future__ import annotations

import itertools
import logging

from raytp.config import EngineConfig
from raytp.engine.engine import EngineCore, ExecutorFactory, ray_executor
from raytp.outputs import RequestOutput
from raytp.sampling import SamplingParams

log = logging.getLogger(__name__)


class LLM:
    """Runs a TP group on Ray (starting a local Ray if none is running) and generates synchronously."""

    def __init__(self, model: str, executor_factory: ExecutorFactory | None = None, **config):
        self.config = EngineConfig.parse({"model": model, **config})
        self._started_ray = False
        if executor_factory is None:
            import ray

            if not ray.is_initialized():
                ray.init(log_to_driver=True)
                self._started_ray = True
            executor_factory = ray_executor
        try:
            self.engine = EngineCore(self.config, executor_factory)
            self.engine.start()
        except BaseException:
            self._stop_ray()
            raise
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[int] | list[str] | list[list[int]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        # One prompt (a string or a list of token ids) or a list of them.
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        if not isinstance(params, list):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        order = []
        for prompt, p in zip(prompts, params):
            rid = f"offline-{next(self._ids)}"
            self.engine.add_request(rid, prompt, p)
            order.append(rid)
        final: dict[str, RequestOutput] = {}
        while len(final) < len(order):
            for out in self.engine.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[rid] for rid in order]

    def shutdown(self) -> None:
        self.engine.shutdown()
        self._stop_ray()

    def _stop_ray(self) -> None:
        if self._started_ray:
            import ray

            ray.shutdown()
            self._started_ray = False
