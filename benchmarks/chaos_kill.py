"""Kill a TP worker again and again under load; count lost, duplicated and changed tokens.

Runs against a raytp server as a user would (OpenAI API over HTTP). Either one
you started:

    raytp serve --model tiny --tensor-parallel-size 2 --device cpu --port 8000 &
    python benchmarks/chaos_kill.py --url http://127.0.0.1:8000 --rounds 20

or, along a model-size axis, one per shape that the script starts and stops
itself: for each shape it writes a random-weight Llama once (vocab 32000,
float32, no tokenizer; cached in ~/.cache/raytp/random-llama-SHAPE), runs
`raytp serve --model DIR --tensor-parallel-size 2 --device cpu
--max-model-len 512` (plus any --serve-arg) on free ports, and stops it
before the next shape:

    python benchmarks/chaos_kill.py --shapes 20m,0.5b --rounds 10
    python benchmarks/chaos_kill.py --shapes 20m --kill-signal STOP --serve-arg="--step-timeout-s 5"

Each round starts STREAMS greedy streaming completions, waits until every
stream has produced some tokens, sends SIGKILL (or, with --kill-signal STOP,
SIGSTOP: a hung rank) to one `ray::TPWorker` process of the server (the
workers run on this machine), and lets the streams finish. A stopped process
still there after the round is killed. Every stream must end with exactly the
token ids of a fault-free reference run, and no request may fail. It reports,
per round, the pause the clients saw: the longest gap between two tokens of
any stream that ends after the signal (the detection, the replacement of the
rank or the rebuild of the group, and the replayed steps all fall inside it;
with STOP the detection is the step watchdog). Gaps that end before the
signal (a stream waiting for the others' prompts) are left out: on a large
model they are longer than the recovery itself. With --shapes it also prints the recovery
metrics of each server (raytp_recovery_seconds by phase, raytp_recoveries by
kind) and ends with a table of the shapes side by side.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time

import httpx

RETRIES_ON_503 = 2  # as the official openai client (max_retries=2)

# Ray's metrics agent exports what the processes recorded every few seconds (10 s by default): wait this long
# after the last round before scraping, so that the last recovery is in the numbers.
METRICS_WAIT_S = 12.0


def worker_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "ray::TPWorker"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def rank_pids() -> dict[int, int]:
    """The serving ranks' processes by pid -> rank: those that map a rank's KV cache file (raytp-group-*/rankN.kv;
    a CPU group's ranks do, its warm spares do not), else every TPWorker process."""
    ranks = {}
    for pid in worker_pids():
        try:
            with open(f"/proc/{pid}/maps") as f:
                found = re.search(r"raytp-group-\w+/rank(\d+)\.kv", f.read())
        except OSError:
            continue
        if found:
            ranks[pid] = int(found.group(1))
    return ranks or {pid: -1 for pid in worker_pids()}


async def stream_tokens(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], max_tokens: int,
                        progress: dict, key: int) -> list[int]:
    """One streaming completion; returns the generated token ids in order. A 503 (the replica's group is down while
    it recovers) is retried after a pause, as the official openai client does (twice, backing off from 0.5 s)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "return_token_ids": True}
    tokens: list[int] = []
    times = progress.setdefault(key, [])  # when each token arrived
    for attempt in range(RETRIES_ON_503 + 1):
        async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
            if resp.status_code == 503 and attempt < RETRIES_ON_503:
                await asyncio.sleep(0.5 * 2**attempt)
                continue
            if resp.status_code != 200:
                raise RuntimeError(f"HTTP {resp.status_code}: {await resp.aread()!r}")
            await _read_stream(resp, tokens, times)
            return tokens
    return tokens


async def _read_stream(resp, tokens: list[int], times: list[float]) -> None:
    """Add the token ids of a 200 streaming response to `tokens`, and when each arrived to `times`."""
    async for line in resp.aiter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if "error" in chunk:
            raise RuntimeError(f"stream error: {chunk['error']}")
        for choice in chunk.get("choices", []):
            if not choice.get("token_ids"):
                continue
            tokens.extend(choice["token_ids"])
            times.append(time.monotonic())


def longest_gap_after(times: list[float], since: float) -> float:
    """The longest gap between consecutive tokens whose later token came after `since`."""
    return max((b - a for a, b in zip(times, times[1:]) if b > since), default=0.0)


async def run_round(url: str, model: str, prompts: list[list[int]], max_tokens: int,
                    kill_signal: signal.Signals | None, kill_spares: bool = False) -> dict:
    progress: dict = {}  # stream -> arrival times of its tokens
    victim, signalled = None, float("inf")
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(300.0), trust_env=False) as client:
            tasks = [asyncio.create_task(stream_tokens(client, url, model, p, max_tokens, progress, i))
                     for i, p in enumerate(prompts)]
            # Every stream is past its prompt: the fault comes here (and the reference run's gaps count from here).
            while len(progress) < len(prompts) or min(len(t) for t in progress.values()) < 3:
                if all(t.done() for t in tasks):
                    break
                await asyncio.sleep(0.005)
            signalled = time.monotonic()
            if kill_signal is not None:
                ranks = rank_pids()
                if not ranks:
                    raise RuntimeError("no ray::TPWorker process found on this machine")
                victim = random.choice(sorted(ranks))
                if kill_spares:  # no spare is up: the rank is started again in its place
                    for spare in set(worker_pids()) - set(ranks):
                        os.kill(spare, signal.SIGKILL)
                os.kill(victim, kill_signal)
            results = await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        if kill_signal == signal.SIGSTOP and victim in worker_pids():  # a stopped rank must not linger
            os.kill(victim, signal.SIGKILL)
    return {"results": results,
            "max_gap_s": max((longest_gap_after(t, signalled) for t in progress.values()), default=0.0)}


def chaos(url: str, model: str, args: argparse.Namespace) -> dict | None:
    """The reference run and args.rounds kill rounds against url; None if the reference run failed."""
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(3, 1000) for _ in range(rng.randrange(4, 48))] for _ in range(args.streams)]
    no_fault = asyncio.run(run_round(url, model, prompts, args.max_tokens, None))
    reference = no_fault["results"]
    print(f"no-fault run: longest gap between tokens once every stream is past its prompt {no_fault['max_gap_s']:.2f}s")
    if any(isinstance(r, BaseException) for r in reference):
        print("reference run failed:", [r for r in reference if isinstance(r, BaseException)][:3])
        return None
    kill_signal = signal.Signals["SIG" + args.kill_signal]
    failed = changed = 0
    gaps = []
    for i in range(args.rounds):
        time.sleep(args.settle_s)  # the replica's spare rank comes up (a few seconds after the last replacement)
        out = asyncio.run(run_round(url, model, prompts, args.max_tokens, kill_signal, args.kill_spares))
        errors = [r for r in out["results"] if isinstance(r, BaseException)]
        diffs = sum(1 for r, ref in zip(out["results"], reference) if not isinstance(r, BaseException) and r != ref)
        failed += len(errors)
        changed += diffs
        gaps.append(out["max_gap_s"])
        print(f"round {i + 1:2d}/{args.rounds}: failed {len(errors)}, changed {diffs}, "
              f"pause (longest gap between tokens after the signal) {out['max_gap_s']:.2f}s" + (f"  ({errors[0]})" if errors else ""))
        sys.stdout.flush()
    print(f"\n{args.rounds} kills ({kill_signal.name}) x {args.streams} streams x {args.max_tokens} tokens: "
          f"{failed} failed requests, {changed} streams with lost/duplicated/changed tokens")
    if gaps:
        print(f"pause the clients saw: median {statistics.median(gaps):.2f}s, max {max(gaps):.2f}s")
    return {"kills": args.rounds, "failed": failed, "changed": changed, "gaps": gaps}


def print_recovery_metrics(metrics_port: int) -> None:
    """The server's raytp_recovery* metrics as exported, and the mean seconds per recovery of each phase."""
    try:
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10.0, trust_env=False).text
    except httpx.HTTPError as err:
        print(f"metrics: scraping :{metrics_port} failed: {err}")
        return
    lines = [line for line in text.splitlines() if line.startswith("ray_raytp_recover")]  # recovery_*, recoveries
    sums: dict[str, list[float]] = {}  # phase -> [seconds, recoveries], summed over the exporting processes
    for line in lines:
        if "_bucket{" in line:
            continue  # the buckets are many; the table below sums them up
        print(line)
        name = line.split("{", 1)[0]
        phase = re.search(r'phase="([^"]*)"', line)
        if phase and name in ("ray_raytp_recovery_seconds_sum", "ray_raytp_recovery_seconds_count"):
            sums.setdefault(phase.group(1), [0.0, 0.0])[name.endswith("_count")] += float(line.rsplit(" ", 1)[1])
    if sums:
        # Ray's histogram _sum is approximate (Ray re-records each observation at its bucket's midpoint,
        # see ray/_private/telemetry/open_telemetry_metric_recorder.py), so the means are too; _count is exact.
        print(f"{'phase':<16} {'recoveries':>10} {'mean s':>8}")
        for phase, (seconds, count) in sums.items():
            print(f"{phase:<16} {count:>10.0f} {seconds / count if count else float('nan'):>8.2f}")


def run_shape(shape: str, args: argparse.Namespace) -> dict | None:
    """Write (once) the shape's checkpoint, serve it at TP=2 on CPU, run the chaos rounds, stop the server."""
    from raytp.bench.server import ServerProcess
    from raytp.random_checkpoint import ensure_random_llama, llama_num_parameters, random_llama_config

    params = llama_num_parameters(random_llama_config(shape))
    print(f"\n=== {shape}: {params / 1e6:.1f}M parameters", flush=True)
    path = ensure_random_llama(shape)
    extra = ["--max-model-len", "512", *(a for arg in args.serve_arg for a in shlex.split(arg))]
    with ServerProcess(path, tensor_parallel_size=2, device="cpu", extra_args=extra) as server:
        model = httpx.get(f"{server.url}/v1/models", trust_env=False).json()["data"][0]["id"]
        result = chaos(server.url, model, args)
        time.sleep(METRICS_WAIT_S)
        print_recovery_metrics(server.metrics_export_port)
    return result and {"shape": shape, "params": params, **result}


def print_table(rows: list[dict]) -> None:
    print(f"\n{'shape':<8} {'params':>8} {'kills':>6} {'failed':>7} {'changed':>8} {'median s':>9} {'max s':>7} "
          f"{'median/first':>13}")
    first = None
    for row in rows:
        median = statistics.median(row["gaps"]) if row["gaps"] else float("nan")
        first = median if first is None else first
        print(f"{row['shape']:<8} {row['params'] / 1e6:>7.1f}M {row['kills']:>6} {row['failed']:>7} "
              f"{row['changed']:>8} {median:>9.2f} {max(row['gaps'], default=float('nan')):>7.2f} "
              f"{median / first:>13.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="a running server (without --shapes)")
    ap.add_argument("--model", default="tiny", help="the request's model field (without --shapes)")
    ap.add_argument("--shapes", help="comma-separated random-Llama sizes (20m, 0.5b): serve each in turn instead "
                                     "of using --url")
    ap.add_argument("--serve-arg", action="append", default=[],
                    help="extra `raytp serve` options with --shapes (repeatable), e.g. --serve-arg='--step-timeout-s 5'")
    ap.add_argument("--kill-signal", choices=("KILL", "STOP"), default="KILL",
                    help="SIGKILL the worker, or SIGSTOP it (a hung rank; killed after the round if still there)")
    ap.add_argument("--kill-spares", action="store_true",
                    help="SIGKILL the replica's warm spares with the rank: the rank is then started again in its place "
                         "(what a GPU rank with gpu_host_copies gets, having no spare)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--settle-s", type=float, default=10.0,
                    help="seconds before each round, so that the replica has its warm spare again (0: back to back)")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    if not args.shapes:
        result = chaos(args.url, args.model, args)
        return 2 if result is None else int(bool(result["failed"] or result["changed"]))
    from raytp.random_checkpoint import RANDOM_LLAMA_SHAPES

    shapes = args.shapes.split(",")
    unknown = [s for s in shapes if s not in RANDOM_LLAMA_SHAPES]
    if unknown:
        ap.error(f"unknown shape(s) {unknown}; known: {', '.join(RANDOM_LLAMA_SHAPES)}")
    rows = []
    for shape in shapes:
        row = run_shape(shape, args)
        if row is None:
            return 2
        rows.append(row)
    print_table(rows)
    return int(any(row["failed"] or row["changed"] for row in rows))


if __name__ == "__main__":
    sys.exit(main())
