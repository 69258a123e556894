"""Per-step overhead of the Ray TPGroup against an in-process forward of the same batch.

Runs the same decode steps (same SeqStep lists: B sequences with a 32-token
prompt, then one token each per step) on

  (a) LocalExecutor: TP=1 in this process, no Ray;
  (b) TPGroup TP=1: one Ray actor (Ray dispatch overhead = b - a);
  (c) TPGroup TP=2 with gloo collectives over loopback (before the shared-memory path);
  (d) TPGroup TP=2 with shared-memory all-reduce/all-gather (the default on CPU).
  collective ms: time inside all-reduce/all-gather per step, waiting for the peer included.

Then (a) and (b) again with the next step sent before the previous one's
tokens are back, as AsyncEngine does (PREVIOUS_TOKEN inputs, two steps in
flight): the step time it shows is what a client sees per decode step, and
(b) pipelined - (a) pipelined is what Ray still costs.

Every rank uses one intra-op thread (as TPGroup's CPU workers do), so the
in-process run is configured the same way; the three take turns step by step,
so other load on the machine hits them alike. The model is the 58M-parameter
bench checkpoint (Llama: hidden 512, 8 layers, 8 heads, 4 KV heads,
intermediate 1536, vocab 32000, fp32, random weights from a fixed seed) that
`raytp bench checkpoint` writes (raytp/bench/checkpoint.py).

    python benchmarks/step_overhead.py [--steps 30] [--batches 1 16]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

import torch

from raytp.config import EngineConfig
from raytp.cluster.executor import Executor, LocalExecutor
from raytp.sampling import SamplingParams
from raytp.bench.checkpoint import ensure_bench_checkpoint
from raytp.engine.step import PREVIOUS_TOKEN, SeqStep

PROMPT_LEN, BLOCK_SIZE, MAX_MODEL_LEN = 32, 16, 256
GREEDY = SamplingParams(max_tokens=MAX_MODEL_LEN - PROMPT_LEN, temperature=0.0, ignore_eos=True)


def make_config(path: str, tp: int, cpu_collectives: str = "shm") -> EngineConfig:
    return EngineConfig(model=path, tensor_parallel_size=tp, device="cpu", dtype="float32", block_size=BLOCK_SIZE,
                        max_model_len=MAX_MODEL_LEN, max_num_seqs=16, cpu_collectives=cpu_collectives)


class DecodeRun:
    """`batch` sequences on one executor: prefilled with 32-token prompts, then one decode step per call."""

    def __init__(self, executor: Executor, batch: int):
        self.executor = executor
        blocks_per_seq = MAX_MODEL_LEN // BLOCK_SIZE
        gen = torch.Generator().manual_seed(batch)  # the same prompts on every executor
        prompts = [torch.randint(3, 32000, (PROMPT_LEN,), generator=gen).tolist() for _ in range(batch)]
        self.tables = [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(batch)]
        result = executor.execute([SeqStep(p, 0, t, GREEDY, 0) for p, t in zip(prompts, self.tables)])  # prefill
        self.last, self.pos = result.token_ids, PROMPT_LEN

    def step(self) -> tuple[float, float, float]:
        """One decode step: (wall seconds, worker seconds, collective seconds)."""
        seqs = [SeqStep([tok], self.pos, t, GREEDY, self.pos - PROMPT_LEN + 1) for tok, t in zip(self.last, self.tables)]
        t0 = time.perf_counter()
        result = self.executor.execute(seqs)
        wall = time.perf_counter() - t0
        self.last, self.pos = result.token_ids, self.pos + 1
        return wall, result.step_seconds, result.collective_seconds


def time_pipelined(executor: Executor, batch: int, steps: int, warmup: int = 3) -> float:
    """Seconds per decode step with two steps in flight (each step's inputs are the previous step's samples)."""
    run = DecodeRun(executor, batch)
    rids = [f"seq-{i}" for i in range(batch)]
    # The worker remembers its samples by request id: one more step with real tokens names them.
    executor.execute([SeqStep([tok], run.pos, t, GREEDY, 1, rid) for tok, t, rid in zip(run.last, run.tables, rids)])

    async def go() -> float:
        in_flight, t0 = [], 0.0
        for i in range(warmup + steps):
            if i == warmup:
                t0 = time.perf_counter()
            pos = run.pos + 1 + i
            in_flight.append(executor.submit([SeqStep([PREVIOUS_TOKEN], pos, t, GREEDY, pos - PROMPT_LEN + 1, rid)
                                              for t, rid in zip(run.tables, rids)]))
            if len(in_flight) == 2:
                await in_flight.pop(0)
        await in_flight.pop(0)
        return (time.perf_counter() - t0) / steps

    return asyncio.run(go())


def time_decode(executors: dict[str, Executor], batch: int, steps: int, warmup: int = 3) -> dict[str, dict]:
    """Median seconds per decode step for each executor, the executors taking turns step by step
    (so that other load on the machine hits them alike)."""
    runs = {name: DecodeRun(ex, batch) for name, ex in executors.items()}
    samples: dict[str, list] = {name: [] for name in runs}
    for i in range(warmup + steps):
        for name, run in runs.items():
            sample = run.step()
            if i >= warmup:
                samples[name].append(sample)
    return {name: {key: statistics.median(s[k] for s in samples[name])
                   for k, key in enumerate(("step", "worker", "collective"))} for name in runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="timed decode steps per batch size")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    args = ap.parse_args()

    import ray

    from raytp.cluster.group import TPGroup

    path = ensure_bench_checkpoint()
    # Logical CPUs: every group gets its own bundles; they take turns, so they never compete for the cores.
    ray.init(num_cpus=5, include_dashboard=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
             log_to_driver=False)
    executors = {
        "(a) LocalExecutor, in-process": (LocalExecutor(make_config(path, 1), path, MAX_MODEL_LEN, num_threads=1), 1),
        "(b) TPGroup TP=1, Ray": (TPGroup(make_config(path, 1), path, MAX_MODEL_LEN), 1),
        "(c) TPGroup TP=2, gloo": (TPGroup(make_config(path, 2, "gloo"), path, MAX_MODEL_LEN), 2),
        "(d) TPGroup TP=2, shm": (TPGroup(make_config(path, 2, "shm"), path, MAX_MODEL_LEN), 2),
    }
    names = list(executors)
    try:
        for ex, tp in executors.values():
            ex.start(tp)
        by_batch = {b: time_decode({n: ex for n, (ex, _) in executors.items()}, b, args.steps) for b in args.batches}
        pipelined = {name: {b: time_pipelined(executors[name][0], b, args.steps) for b in args.batches}
                     for name in names[:2]}
    finally:
        for ex, _ in executors.values():
            ex.shutdown()
        ray.shutdown()
    rows = {name: {b: by_batch[b][name] for b in args.batches} for name in names}

    print(f"\ndecode step, {os.cpu_count()} CPU cores, 1 thread per rank, prompt {PROMPT_LEN}, "
          f"median of {args.steps} steps, executors taking turns (torch {torch.__version__})\n")
    head = f"{'executor':32} {'batch':>5} {'step ms':>9} {'worker ms':>10} {'collective ms':>14} {'tokens/s':>9}"
    print(head)
    print("-" * len(head))
    for name, by_batch in rows.items():
        for b, r in by_batch.items():
            print(f"{name:32} {b:>5} {r['step'] * 1e3:>9.2f} {r['worker'] * 1e3:>10.2f} "
                  f"{r['collective'] * 1e3:>14.2f} {b / r['step']:>9.1f}")
    local, tp1 = rows[names[0]], rows[names[1]]
    print()
    for b in args.batches:
        print(f"Ray dispatch overhead at batch {b:>2} (b - a): {(tp1[b]['step'] - local[b]['step']) * 1e3:6.2f} ms/step"
              f"   (b's step - b's worker time: {(tp1[b]['step'] - tp1[b]['worker']) * 1e3:.2f} ms)")
    print("\nwith the next step sent ahead (two in flight, as AsyncEngine runs them):")
    for name, by_batch in pipelined.items():
        for b, sec in by_batch.items():
            print(f"{name:32} {b:>5} {sec * 1e3:>9.2f} ms/step {b / sec:>9.1f} tokens/s")
    for b in args.batches:
        gap = pipelined[names[1]][b] - pipelined[names[0]][b]
        print(f"Ray overhead left at batch {b:>2} (b - a, both sent ahead): {gap * 1e3:6.2f} ms/step")


if __name__ == "__main__":
    main()
