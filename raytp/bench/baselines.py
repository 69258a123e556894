"""Baselines run by the same tool on the same checkpoint and workload.

- transformers ``generate``, static batches: requests are taken in arrival
  order, ``batch_size`` at a time, left-padded, greedy, with
  ``min_new_tokens = max_new_tokens =`` the longest requested output of the
  batch (a static batch runs until its longest member is done; only each
  request's own output tokens count). A batch starts when its last member has
  arrived and the previous batch is done. Batch size 1 is "one request at a
  time". Latencies are from each request's arrival; a token's time is the
  decoding step that produced it (as if streamed); E2E is the end of its
  batch, when ``generate`` returns.
- raytp's engine in this process, without Ray, Serve or HTTP: ``AsyncEngine``
  over ``LocalExecutor`` (TP=1), driven by the same load generator as the
  HTTP runs. Comparing it with raytp over HTTP isolates the cost of Ray + Serve.
"""
from __future__ import annotations

import asyncio
import itertools
import time

import torch

from raytp.bench.loadgen import Mark, RequestResult, RequestSpec, RunResult, offered_rate


# ---- transformers ---------------------------------------------------------------------------


def load_transformers_model(model_path: str, dtype: str = "float32"):
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise RuntimeError("the transformers baseline needs transformers: pip install -e '.[test]'") from None
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype).eval()


def _step_clock():
    """A transformers streamer that only records when each decoding step's tokens exist (works for batches)."""
    from transformers.generation.streamers import BaseStreamer

    class StepClock(BaseStreamer):
        def __init__(self):
            self.times: list[float] = []
            self._prompt_seen = False

        def put(self, value) -> None:
            if not self._prompt_seen:  # generate first hands over the prompt
                self._prompt_seen = True
                return
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    return StepClock()


def _generate_batch(model, specs: list[RequestSpec], pad_id: int) -> list[float]:
    """One static batch; returns the time of each decoding step."""
    clock = _step_clock()
    longest = max(len(s.prompt_ids) for s in specs)
    new_tokens = max(s.output_len for s in specs)
    ids = torch.tensor([[pad_id] * (longest - len(s.prompt_ids)) + s.prompt_ids for s in specs])  # (B, L) left-padded
    mask = torch.tensor([[0] * (longest - len(s.prompt_ids)) + [1] * len(s.prompt_ids) for s in specs])  # (B, L)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, num_beams=1, pad_token_id=pad_id, streamer=clock)
    if out.shape[1] - longest != new_tokens or len(clock.times) != new_tokens:
        raise RuntimeError(f"transformers generated {out.shape[1] - longest} tokens ({len(clock.times)} steps), "
                           f"expected {new_tokens}")
    return clock.times


def run_transformers_static(model, specs: list[RequestSpec], arrivals: list[float], batch_size: int,
                            progress: bool = True, pad_id: int = 0) -> RunResult:
    from tqdm.auto import tqdm

    name = "transformers-sequential" if batch_size == 1 else "transformers-static"
    bar = tqdm(total=len(specs), desc=f"{name} bs={batch_size}", unit="req", disable=not progress, leave=False)
    results = [RequestResult(s.index, len(s.prompt_ids), s.output_len) for s in specs]
    t0 = time.perf_counter()
    end = t0
    try:
        for lo in range(0, len(specs), batch_size):
            batch = list(range(lo, min(lo + batch_size, len(specs))))
            wait = t0 + max(arrivals[i] for i in batch) - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            start = time.perf_counter()
            steps = _generate_batch(model, [specs[i] for i in batch], pad_id)
            end = time.perf_counter()
            for i in batch:
                res, arrived = results[i], t0 + arrivals[i]
                own = steps[: specs[i].output_len]  # only this request's tokens are useful output
                res.send_time = start - t0
                res.output_tokens = res.num_chunks = len(own)
                res.ttft = own[0] - arrived
                res.itl = [b - a for a, b in zip(own, own[1:])]
                res.e2e = end - arrived
            bar.update(len(batch))
    finally:
        bar.close()
    run = RunResult(name, batch_size, offered_rate(arrivals), end - t0, results,
                    extra={"batch_size": batch_size, "threads": torch.get_num_threads()})
    return run


def warm_up_transformers(model, vocab_size: int) -> None:
    from raytp.bench.loadgen import make_workload

    _generate_batch(model, make_workload(2, (16, 32), (4, 4), vocab_size, seed=12345), 0)


# ---- raytp's engine in-process ------------------------------------------------------------


class EngineBackend:
    """raytp's AsyncEngine over a LocalExecutor (TP=1, no Ray), as a load-generator backend."""

    name = "raytp-inprocess"

    def __init__(self, engine):
        self.engine = engine
        self._ids = itertools.count()

    @classmethod
    async def start(cls, model_path: str, threads: int | None = None, **config) -> "EngineBackend":
        from raytp.config import EngineConfig
        from raytp.engine.engine import AsyncEngine
        from raytp.cluster.executor import LocalExecutor

        cfg = EngineConfig.parse({"model": model_path, "device": "cpu", "tensor_parallel_size": 1, **config})
        engine = AsyncEngine(cfg, lambda c, path, max_len: LocalExecutor(c, path, max_len, num_threads=threads))
        await engine.start()
        return cls(engine)

    async def __call__(self, spec: RequestSpec, mark: Mark) -> int:
        from raytp.sampling import SamplingParams

        params = SamplingParams(max_tokens=spec.output_len, temperature=0.0, ignore_eos=True)
        final = None
        async for out in self.engine.generate(spec.prompt_ids, params, f"bench-{next(self._ids)}"):
            if out.delta_token_ids:
                mark()
            final = out
        return len(final.outputs[0].token_ids) if final is not None else 0

    async def shutdown(self) -> None:
        await self.engine.shutdown()
        await asyncio.sleep(0)
