"""Benchmarks: an OpenAI-API load generator, the baselines it is compared with, and the bench checkpoint.

`raytp bench ...` (or `python -m raytp.bench ...`); see raytp/bench/cli.py and benchmarks/README.md.
"""
from raytp.bench.cli import add_bench_arguments, main, run_bench

__all__ = ["add_bench_arguments", "main", "run_bench"]
