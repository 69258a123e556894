#!/usr/bin/env bash
# The one command behind benchmarks/README.md's CPU numbers, in one run:
# transformers (one at a time, static batches 1..32), raytp's engine in-process
# (TP=1, no Ray) and raytp over HTTP (`raytp serve` started at TP=1 on CPU),
# same bench-58m checkpoint, same workload: bursts of 32 requests, prompts
# 16-128 tokens, outputs 16-96 tokens (ignore_eos, greedy). transformers gets its
# best of batch sizes 1..32 and of 1 or 2 torch threads; raytp runs its default
# cpus_per_rank=1 (one torch thread per rank), in-process and over HTTP alike.
# Each point runs twice and the faster run is kept (the machine is shared).
# Extra arguments go to `raytp bench compare` (e.g. --no-progress, --concurrency 32).
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results
mkdir -p "$out"
echo "load before: $(uptime)"
raytp bench compare --model bench-58m \
    --num-prompts 32 --prompt-len 16:128 --output-len 16:96 --request-rate inf \
    --concurrency 1,4,16,32 --hf-batch-sizes 1,4,8,16,32 --hf-threads 1,2 --cpus-per-rank 1 --repeat 2 \
    --out-json "$out/cpu_compare.json" --out-png "$out/cpu_compare.png" "$@"
echo "load after: $(uptime)"
