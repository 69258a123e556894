"""Top-p sampling's cost, one thread: raytp's filter (the nucleus looked for among the largest logits first,
raytp/sampling.py) against a sort of every row's whole vocabulary, and a real model's throughput with top_p.

    python benchmarks/top_p_sampling.py [--rows 32] [--vocab 49152] [--repeat 5] [--model smollm2]

1. The filter alone on (rows, vocab) logits at temperature 0.8 and top_p 0.95, rows of three kinds: peaked (a nucleus
   of ~10 tokens, as a trained model's usually is), medium (~1,500) and flat (random weights: most of the
   vocabulary), the two ways alternating in one process; both keep the same tokens (checked).
2. --model: 32 streams of 48 tokens at temperature 0.8 / top_p 0.95 through the in-process engine (TP=1, bfloat16,
   one thread), raytp's filter and the sort alternating (TOP_P_CANDIDATES emptied); output tokens/s.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from raytp import sampling


def time_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def filter_alone(rows: int, vocab: int, repeat: int) -> None:
    gen = torch.Generator().manual_seed(0)
    top_k, top_p = torch.full((rows,), -1), torch.full((rows,), 0.95)
    print(f"{'rows':>12}  {'kept (mean)':>11}  {'raytp ms':>9}  {'sort ms':>8}")
    for kind, scale in (("peaked", 6.0), ("medium", 3.0), ("flat", 1.0)):
        logits = torch.randn(rows, vocab, generator=gen) * scale / 0.8  # (rows, vocab), temperature 0.8
        fast = sampling._filter_top_k_top_p(logits, top_k, top_p)
        slow = sampling._filter_top_k_top_p_sorted(logits, top_k, top_p)
        same = sum(torch.equal(a, b) for a, b in zip(fast, slow))
        kept = torch.isfinite(fast).sum(dim=1).float().mean().item()
        raytp_ms = time_ms(lambda: sampling._filter_top_k_top_p(logits, top_k, top_p), repeat)
        sort_ms = time_ms(lambda: sampling._filter_top_k_top_p_sorted(logits, top_k, top_p), repeat)
        print(f"{kind:>12}  {kept:>11.0f}  {raytp_ms:>9.1f}  {sort_ms:>8.1f}   ({same}/{rows} rows kept alike)")


def engine_throughput(model: str, repeat: int) -> None:
    from raytp import LLM, SamplingParams
    from raytp.cluster.executor import LocalExecutor
    from raytp.named_models import resolve_model_path

    llm = LLM(resolve_model_path(model), dtype="bfloat16", device="cpu", max_num_batched_tokens=256, max_num_seqs=32,
              executor_factory=lambda c, p, n: LocalExecutor(c, p, n, num_threads=1))
    prompts = ["Write a short story about a robot learning to paint.", "Explain how a bicycle stays upright.",
               "What are the main causes of inflation?", "Describe the water cycle for a child."] * 8
    params = SamplingParams(max_tokens=48, temperature=0.8, top_p=0.95, ignore_eos=True)
    llm.generate(prompts[:2], params)
    candidates = sampling.TOP_P_CANDIDATES
    seconds = {"raytp": [], "sort": []}
    for _ in range(repeat):
        for name, cands in (("raytp", candidates), ("sort", ())):
            sampling.TOP_P_CANDIDATES = cands
            start = time.perf_counter()
            llm.generate(prompts, params)
            seconds[name].append(time.perf_counter() - start)
    sampling.TOP_P_CANDIDATES = candidates
    for name, values in seconds.items():
        print(f"{model}, 32 streams x 48 tokens, top_p 0.95, {name}: {32 * 48 / statistics.median(values):.0f} tok/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--model", default=None, help="also time the engine on this model (e.g. smollm2)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    filter_alone(args.rows, args.vocab, args.repeat)
    if args.model:
        engine_throughput(args.model, max(1, args.repeat // 2))


if __name__ == "__main__":
    main()
