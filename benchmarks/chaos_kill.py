"""Kill a TP worker again and again under load; count lost, duplicated and changed tokens.

Runs against a live raytp server as a user would (OpenAI API over HTTP):

    raytp serve --model tiny --tensor-parallel-size 2 --device cpu --port 8000 &
    python benchmarks/chaos_kill.py --url http://127.0.0.1:8000 --rounds 20

Each round starts STREAMS greedy streaming completions, waits until every
stream has produced some tokens, SIGKILLs one `ray::TPWorker` process of the
server (the workers run on this machine), and lets the streams finish. Every
stream must end with exactly the tokens of a fault-free reference run, and no
request may fail. It reports, per round, the pause the clients saw: the
longest gap between two tokens of any stream (the kill, the detection, the
rebuild of the group and the re-prefill of every stream all fall inside it).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time

import httpx


def worker_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "ray::TPWorker"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


async def stream_tokens(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], max_tokens: int,
                        progress: dict, key: int) -> list[str]:
    """One streaming completion; returns the text pieces in order (one per generated token)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True}
    pieces: list[str] = []
    last = time.monotonic()
    async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {await resp.aread()!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            for choice in chunk.get("choices", []):
                now = time.monotonic()
                pieces.append(choice.get("text", ""))
                progress[key] = (len(pieces), now, max(progress.get(key, (0, 0, 0.0))[2], now - last))
                last = now
    return pieces


async def run_round(url: str, model: str, prompts: list[list[int]], max_tokens: int, kill: bool) -> dict:
    progress: dict = {}
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0)) as client:
        tasks = [asyncio.create_task(stream_tokens(client, url, model, p, max_tokens, progress, i))
                 for i, p in enumerate(prompts)]
        if kill:
            while len(progress) < len(prompts) or min(n for n, _, _ in progress.values()) < 3:
                if all(t.done() for t in tasks):
                    break
                await asyncio.sleep(0.005)
            pids = worker_pids()
            if not pids:
                raise RuntimeError("no ray::TPWorker process found on this machine")
            os.kill(random.choice(pids), signal.SIGKILL)
        results = await asyncio.gather(*tasks, return_exceptions=True)
    return {"results": results, "max_gap_s": max(g for _, _, g in progress.values())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rng = random.Random(args.seed)
    prompts = [[rng.randrange(3, 1000) for _ in range(rng.randrange(4, 48))] for _ in range(args.streams)]
    reference = asyncio.run(run_round(args.url, args.model, prompts, args.max_tokens, kill=False))["results"]
    if any(isinstance(r, BaseException) for r in reference):
        print("reference run failed:", [r for r in reference if isinstance(r, BaseException)][:3])
        return 2
    failed = changed = 0
    gaps = []
    for i in range(args.rounds):
        out = asyncio.run(run_round(args.url, args.model, prompts, args.max_tokens, kill=True))
        errors = [r for r in out["results"] if isinstance(r, BaseException)]
        diffs = sum(1 for r, ref in zip(out["results"], reference) if not isinstance(r, BaseException) and r != ref)
        failed += len(errors)
        changed += diffs
        gaps.append(out["max_gap_s"])
        print(f"round {i + 1:2d}/{args.rounds}: failed {len(errors)}, changed {diffs}, "
              f"pause (longest gap between tokens) {out['max_gap_s']:.2f}s" + (f"  ({errors[0]})" if errors else ""))
        sys.stdout.flush()
    print(f"\n{args.rounds} kills x {args.streams} streams x {args.max_tokens} tokens: "
          f"{failed} failed requests, {changed} streams with lost/duplicated/changed tokens")
    print(f"pause the clients saw: median {statistics.median(gaps):.2f}s, max {max(gaps):.2f}s")
    return 0 if failed == 0 and changed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
