"""Per-step overhead of the Ray TPGroup against an in-process forward of the same batch.

Runs the same decode steps (same SeqStep lists: B sequences with a 32-token
prompt, then one token each per step) on

  (a) LocalExecutor: TP=1 in this process, no Ray;
  (b) TPGroup TP=1: one Ray actor (Ray dispatch overhead = b - a);
  (c) TPGroup TP=2: two Ray actors and the CPU communicator the group picks (shown in the
      table; collective_seconds: time inside all-reduce/all-gather, waiting for the peer included).

Every rank uses one intra-op thread (as TPGroup's CPU workers do), so the
in-process run is configured the same way; the three take turns step by step,
so other load on the machine hits them alike. The model is the 58M-parameter
bench checkpoint (Llama: hidden 512, 8 layers, 8 heads, 4 KV heads,
intermediate 1536, vocab 32000, fp32, random weights from a fixed seed),
written once with transformers' save_pretrained.

    python benchmarks/step_overhead.py [--steps 30] [--batches 1 16]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time

import torch

from raytp.config import EngineConfig
from raytp.executor import Executor, LocalExecutor
from raytp.sampling import SamplingParams
from raytp.tiny import default_cache_dir
from raytp.worker import SeqStep

CHECKPOINT_NAME = "bench-58m-hf"  # not "bench-58m": raytp/bench/checkpoint.py owns that directory
SEED = 58
BENCH_SHAPES = dict(
    hidden_size=512,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    intermediate_size=1536,
    vocab_size=32000,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)
PROMPT_LEN, BLOCK_SIZE, MAX_MODEL_LEN = 32, 16, 256
GREEDY = SamplingParams(max_tokens=MAX_MODEL_LEN - PROMPT_LEN, temperature=0.0, ignore_eos=True)


def ensure_checkpoint() -> str:
    """<cache>/bench-58m-hf, written with transformers on first use (random weights, seed 58)."""
    path = os.path.join(default_cache_dir(), CHECKPOINT_NAME)
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
        if all(cfg.get(k) == v for k, v in BENCH_SHAPES.items()):
            return path
    from transformers import LlamaConfig, LlamaForCausalLM

    print(f"writing {path} ...", flush=True)
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(LlamaConfig(**BENCH_SHAPES, dtype="float32")).eval()
    print(f"  {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters", flush=True)
    model.save_pretrained(path)
    return path


def make_config(path: str, tp: int) -> EngineConfig:
    return EngineConfig(model=path, tensor_parallel_size=tp, device="cpu", dtype="float32", block_size=BLOCK_SIZE,
                        max_model_len=MAX_MODEL_LEN, max_num_seqs=16)


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


class BackendName(logging.Handler):
    """Catches the communicator TPGroup reports ("TP group of N ranks connected over X")."""

    def __init__(self):
        super().__init__()
        self.name = "?"

    def emit(self, record: logging.LogRecord) -> None:
        if "connected over" in record.msg:
            self.name = str(record.args[-1]).replace("Communicator", "").lower()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="timed decode steps per batch size")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    args = ap.parse_args()

    import ray

    from raytp.cluster import TPGroup

    path = ensure_checkpoint()
    backend = BackendName()
    logging.getLogger("raytp.cluster").addHandler(backend)
    logging.getLogger("raytp.cluster").setLevel(logging.INFO)
    ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
             log_to_driver=False)
    names = ["(a) LocalExecutor, in-process", "(b) TPGroup TP=1, Ray", "(c) TPGroup TP=2, Ray"]
    executors = dict(zip(names, [LocalExecutor(make_config(path, 1), path, MAX_MODEL_LEN, num_threads=1),
                                 TPGroup(make_config(path, 1), path, MAX_MODEL_LEN),
                                 TPGroup(make_config(path, 2), path, MAX_MODEL_LEN)]))
    try:
        for ex, tp in zip(executors.values(), (1, 1, 2)):
            ex.start(tp)
        names[2] += f" + {backend.name}"
        executors[names[2]] = executors.pop("(c) TPGroup TP=2, Ray")
        by_batch = {b: time_decode(executors, b, args.steps) for b in args.batches}
    finally:
        for ex in executors.values():
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


if __name__ == "__main__":
    main()
