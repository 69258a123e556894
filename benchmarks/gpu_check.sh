#!/usr/bin/env bash
# One call that checks raytp's GPU path on one GPU (no Ray, no network) and writes one JSON:
#   1. tests/gpu (pytest; they skip without CUDA)
#   2. the in-process engine at TP=1 in bf16: greedy tokens against transformers on the same device
#   3. NCCL (cupy) at world size 1 through raytp's communicator
#   4. decode tokens/s against transformers, with the batch-1 fraction of the memory-bandwidth roofline
# Finishes within 10 minutes on one H100/H200 (each part has its own time limit below).
#
#   bash benchmarks/gpu_check.sh [--device cuda|cpu] [--out FILE] [--decode-shape llama3-8b|small] [--checkpoint-dir DIR]
#
# The decode benchmark's checkpoint (Llama-3-8B-shaped, random bf16 weights, 16 GB) is written once to
# --checkpoint-dir (default ~/.cache/raytp) and reused.
#
# --device cpu is a dry run of the same code on CPU (small shapes; NCCL skipped): CI runs it
# (tests/unit/test_gpu_check_script.py) so the script cannot rot. Exit status 0 only if every check passed.
#
# On the lent GPU machine (no Ray, no network, python3 is the one with torch): run `bash benchmarks/gpu_wheels.sh`
# here first and carry .gpu-wheels (the device tool's carry: [".gpu-wheels"]); the raytp dependencies that machine
# lacks are installed from it.
set -euo pipefail
cd "$(dirname "$0")/.."

device=cuda out=gpu_check.json extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) device=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --decode-shape|--checkpoint-dir) extra+=("$1" "$2"); shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
case "$device" in cuda|cpu) ;; *) echo "gpu_check.sh: --device must be cuda or cpu, not '$device'" >&2; exit 2 ;; esac

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's raytp and tests/, installed or not

if [[ -d .gpu-wheels ]]; then  # carried wheels (gpu_wheels.sh): install each package that is missing here
  for wheel in .gpu-wheels/*.whl; do
    name=$(basename "$wheel"); name=${name%%-*}
    python3 -m pip show -q "$name" >/dev/null 2>&1 || python3 -m pip install -q --no-index --no-deps "$wheel"
  done
fi

echo "== tests/gpu"
# Its failures are counted in the JSON (tests_gpu) rather than stopping the other checks.
timeout 240 python3 -m pytest tests/gpu -q -rfE --durations=8 -p no:cacheprovider --junitxml="$work/tests_gpu.xml" || true

timeout 330 python3 benchmarks/gpu_check.py --device "$device" --tests-junit "$work/tests_gpu.xml" --out "$out" ${extra[@]+"${extra[@]}"}
