"""Pipeline parallelism's throughput: TP=1 x PP=2 with micro-batches against one step in flight, TP=2 and TP=1.

A local multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`:
a head node with 2 CPUs and a second node with 1), a random-weight Llama
(raytp.random_checkpoint, cached in ~/.cache/raytp), and the async engine
in-process (no HTTP, so that the comparison is of the executors alone). Each
round runs every layout once, in turn, on a burst of BURST greedy requests
(random token-id prompts, max_tokens new tokens each, ignore_eos), and
reports output tokens/s:

- `tp1`: one rank;
- `tp2`: two ranks on the head node, one all-reduce per attention and MLP;
- `tp1_pp2_one_step`: two stages on two nodes, one step in flight
  (pipeline_steps_in_flight=1: each stage idles while the other computes);
- `tp1_pp2`: the same two stages, two micro-batches taking turns, four steps
  in flight (raytp's default): each micro-batch's next step waits at the
  first stage for the tokens the last stage sends it directly;
- `tp1_pp2_two_steps` (not run by default): two micro-batches, one step each
  in flight: a micro-batch's tokens go through the engine before its next
  step is sent (how raytp's pipelines ran before the tokens link).
- `tp1_pp2_eight_steps` (not run by default): two micro-batches, four steps
  each in flight: more slack for the engine's round trip (a step's tokens
  back to the engine, the next step out), at the price of later stops and a
  longer queue ahead of a new prompt.

The stages split the layers as raytp does by default: balanced by the weights
a step reads, half the LM head's counting on the last stage (87m: 4 layers and 2).

    python benchmarks/pipeline_throughput.py --shape 87m --rounds 2 --out benchmarks/results/pipeline/87m.json

Compare within one run only: this machine's speed moves from day to day.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time

LAYOUTS = {
    "tp1": dict(tensor_parallel_size=1),
    "tp2": dict(tensor_parallel_size=2),
    "tp1_pp2_one_step": dict(tensor_parallel_size=1, pipeline_parallel_size=2, pipeline_steps_in_flight=1),
    "tp1_pp2": dict(tensor_parallel_size=1, pipeline_parallel_size=2),
    "tp1_pp2_two_steps": dict(tensor_parallel_size=1, pipeline_parallel_size=2, pipeline_steps_in_flight=2),
    "tp1_pp2_eight_steps": dict(tensor_parallel_size=1, pipeline_parallel_size=2, pipeline_steps_in_flight=8),
}


async def burst(engine, prompts: list[list[int]], max_tokens: int) -> tuple[float, int]:
    """Every prompt at once; (seconds until the last one finished, output tokens)."""
    from raytp.sampling import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    async def one(i: int, prompt: list[int]) -> int:
        count = 0
        async for out in engine.generate(prompt, params, f"b{i}-{time.monotonic_ns()}"):
            count += len(out.delta_token_ids)
        return count

    t0 = time.perf_counter()
    counts = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    return time.perf_counter() - t0, sum(counts)


def run_layout(model: str, layout: dict, prompts, max_tokens: int, dtype: str) -> dict:
    from raytp.config import EngineConfig
    from raytp.engine.engine import AsyncEngine

    config = EngineConfig.parse(dict(model=model, device="cpu", dtype=dtype, cpus_per_rank=1, num_spare_ranks=0,
                                     max_model_len=512, **layout))

    async def main():
        engine = AsyncEngine(config)
        await engine.start()
        try:
            await burst(engine, prompts[:4], 4)  # the first steps of each size pay for first-touch memory
            seconds, tokens = await burst(engine, prompts, max_tokens)
        finally:
            await engine.shutdown()
        return {"seconds": seconds, "output_tokens": tokens, "output_tok_s": tokens / seconds}

    return asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="87m", help="raytp.random_checkpoint shape (20m, 87m, 0.5b)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--burst", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--layouts", default="tp1,tp2,tp1_pp2_one_step,tp1_pp2", help=f"of {', '.join(LAYOUTS)}")
    parser.add_argument("--partition", help="layers per stage for the pipeline layouts, e.g. 4,2 (default: raytp's)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    from raytp.random_checkpoint import ensure_random_llama

    model = ensure_random_llama(args.shape)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 32000) for _ in range(args.prompt_len)] for _ in range(args.burst)]
    cluster = Cluster(initialize_head=True, connect=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    layouts = args.layouts.split(",")
    runs: dict[str, list[dict]] = {name: [] for name in layouts}
    try:
        for r in range(args.rounds):
            for name in layouts:
                layout = dict(LAYOUTS[name])
                if args.partition and layout.get("pipeline_parallel_size", 1) > 1:
                    layout["pipeline_partition"] = [int(n) for n in args.partition.split(",")]
                result = run_layout(model, layout, prompts, args.max_tokens, args.dtype)
                runs[name].append(result)
                print(f"round {r + 1} {name:18s} {result['output_tok_s']:7.1f} output tok/s "
                      f"({result['output_tokens']} tokens in {result['seconds']:.2f}s)", flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    median = {name: statistics.median(x["output_tok_s"] for x in runs[name]) for name in layouts}
    print(f"\n{args.shape}, {args.dtype}, burst of {args.burst} x {args.max_tokens} tokens, median of {args.rounds}:")
    for name in layouts:
        print(f"  {name:18s} {median[name]:7.1f} output tok/s")
    if "tp1_pp2" in median and "tp1_pp2_one_step" in median:
        ratios = [a["output_tok_s"] / b["output_tok_s"] for a, b in zip(runs["tp1_pp2"], runs["tp1_pp2_one_step"])]
        print(f"  micro-batches / one step in flight: {statistics.median(ratios):.2f}x "
              f"(rounds {', '.join(f'{x:.2f}' for x in ratios)})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"shape": args.shape, "dtype": args.dtype, "partition": args.partition, "burst": args.burst,
                       "prompt_len": args.prompt_len,
                       "max_tokens": args.max_tokens, "runs": runs, "median_output_tok_s": median}, f, indent=1)


if __name__ == "__main__":
    main()
