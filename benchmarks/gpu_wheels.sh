#!/usr/bin/env bash
# Wheels for the lent GPU machine, fetched here: it has torch, cupy, NCCL and transformers but no network, and lacks
# some of raytp's own dependencies (pydantic for the config, llguidance for sampling's grammar masks, gguf). They go
# to .gpu-wheels/ (git-ignored), which the device tool carries (carry: [".gpu-wheels"]) and gpu_check.sh installs
# from, each only where it is missing there.
#
#   bash benchmarks/gpu_wheels.sh [--python-version 3.12]
set -euo pipefail
cd "$(dirname "$0")/.."

python_version=3.12  # the GPU image's python3 (/work/.library/device/KINDS.md)
while [[ $# -gt 0 ]]; do
  case "$1" in
    --python-version) python_version=$2; shift 2 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "gpu_wheels.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

# The versions raytp's pyproject.toml asks for, and pydantic's own dependencies.
packages=("pydantic>=2.5,<3" annotated-types typing-inspection "llguidance>=1.9,<2" "gguf>=0.10")
platforms=()
for p in manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 any; do
  platforms+=(--platform "$p")
done
rm -rf .gpu-wheels
python -m pip download -q --no-deps --only-binary=:all: --python-version "$python_version" --implementation cp \
  "${platforms[@]}" -d .gpu-wheels "${packages[@]}"
# pydantic-core must be the one this pydantic pins: resolve the pair together, then keep only that pydantic-core.
python -m pip download -q --only-binary=:all: --python-version "$python_version" --implementation cp \
  "${platforms[@]}" -d .gpu-wheels/.resolved "pydantic>=2.5,<3"
mv .gpu-wheels/.resolved/pydantic_core-*.whl .gpu-wheels/ && rm -rf .gpu-wheels/.resolved
ls .gpu-wheels
du -sh .gpu-wheels
