"""Tokens/s at batch 16 with and without a json_schema on every request (and with half of them), in process.

The AsyncEngine schedules a step before the previous one's tokens are back;
a request under a grammar cannot be (its mask needs its last token), so
while any runs the engine waits for each step: this measures what that and
the masks cost. Every request makes exactly --max-tokens tokens (the schema
is a long array that max_tokens cuts), so the three runs do the same work.

    python benchmarks/structured_throughput.py [--model tiny] [--tp 1] [--max-tokens 128]
--tp > 1 runs the ranks as Ray actors (a local Ray is started).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

from raytp.config import EngineConfig
from raytp.engine.engine import AsyncEngine, ray_executor
from raytp.cluster.executor import LocalExecutor
from raytp.sampling import SamplingParams
from raytp.engine.structured import StructuredOutputs

# Never complete within max_tokens: every request runs to its length.
SCHEMA = {"type": "array", "minItems": 10000,
          "items": {"type": "object", "properties": {"id": {"type": "integer"}, "tag": {"enum": ["red", "green"]}},
                    "required": ["id", "tag"], "additionalProperties": False}}


async def run(engine: AsyncEngine, batch: int, constrained: int, max_tokens: int) -> dict:
    async def one(i: int) -> int:
        spec = StructuredOutputs(json_schema=SCHEMA) if i < constrained else None
        params = SamplingParams(max_tokens=max_tokens, seed=i, ignore_eos=True, structured_outputs=spec)
        async for out in engine.generate("Write a list:", params, f"b{constrained}-{i}-{time.monotonic()}"):
            final = out
        return len(final.outputs[0].token_ids)

    t0 = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(i) for i in range(batch))))
    seconds = time.perf_counter() - t0
    return {"batch": batch, "with_json_schema": constrained, "tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1)}


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    config = EngineConfig(model=args.model, device="cpu", tensor_parallel_size=args.tp, max_num_seqs=args.batch,
                          max_model_len=512)
    factory = ray_executor if args.tp > 1 else (lambda c, p, m: LocalExecutor(c, p, m))
    engine = AsyncEngine(config, factory)
    await engine.start()
    try:
        await run(engine, args.batch, 0, 16)  # warm-up
        rates: dict[int, list[float]] = {}
        for _ in range(args.repeats):  # interleaved, so that load from elsewhere hits all three alike
            for constrained in (0, args.batch // 2, args.batch):
                row = await run(engine, args.batch, constrained, args.max_tokens)
                rates.setdefault(constrained, []).append(row["tokens_per_s"])
                print(json.dumps({"tp": args.tp, **row}), flush=True)
        print(json.dumps({"tp": args.tp, "median_tokens_per_s_by_requests_with_json_schema":
                          {k: statistics.median(v) for k, v in rates.items()}}))
    finally:
        await engine.shutdown()
        if args.tp > 1:
            import ray

            ray.shutdown()  # the local Ray the group started


if __name__ == "__main__":
    asyncio.run(main())
