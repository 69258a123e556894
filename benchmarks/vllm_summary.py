"""Summarise benchmarks/compare_vllm_cpu.sh's JSON files: per workload, each server's median over rounds, and
raytp / vLLM ratios (throughput: higher is better for raytp; latency: lower is better for raytp).

    python benchmarks/vllm_summary.py benchmarks/results/vllm_cpu
"""
from __future__ import annotations

import glob
import json
import os
import re
import statistics
import sys


def load(out_dir: str) -> dict:
    """{(server, workload): [run summary per round]}"""
    runs: dict = {}
    for path in sorted(glob.glob(os.path.join(out_dir, "*_r*.json"))):
        m = re.match(r"(\w+?)_([\w-]+)_r(\d+)\.json$", os.path.basename(path))
        if m:
            with open(path) as f:
                runs.setdefault((m.group(1), m.group(2)), []).append(json.load(f)["runs"][0])
    return runs


LATENCY = [("TTFT p50", lambda s: s["ttft_ms"]["p50"]), ("TTFT p90", lambda s: s["ttft_ms"]["p90"]),
           ("ITL p50", lambda s: s["itl_ms"]["p50"]), ("ITL p99", lambda s: s["itl_ms"]["p99"]),
           ("E2E p50", lambda s: s["e2e_ms"]["p50"])]
METRICS = {  # per workload: what to compare
    "burst": [("out tok/s", lambda s: s["output_throughput"]), *LATENCY],
    "poisson": [("out tok/s", lambda s: s["output_throughput"]), *LATENCY],
    "shared-prefix": [("req/s", lambda s: s["request_throughput"]), *LATENCY],
    "long-prompt": [("max gap", lambda s: s["join"]["streams_max_itl_ms"]),
                    ("join TTFT", lambda s: s["join"]["ttft_ms"]), *LATENCY[2:]],
}


def main(out_dir: str) -> int:
    runs = load(out_dir)
    summary = {}
    print(f"{'workload':13}  {'metric':9}  {'raytp':>9}  {'vLLM':>9}  {'raytp/vLLM':>10}  (median of rounds; ms)")
    for workload, metrics in METRICS.items():
        for name, get in metrics:
            vals = {s: [get(r) for r in runs.get((s, workload), [])] for s in ("raytp", "vllm")}
            if not vals["raytp"] or not vals["vllm"]:
                continue
            a, b = statistics.median(vals["raytp"]), statistics.median(vals["vllm"])
            summary[f"{workload} {name}"] = {"raytp": vals["raytp"], "vllm": vals["vllm"], "ratio": a / b}
            print(f"{workload:13}  {name:9}  {a:9.1f}  {b:9.1f}  {a / b:9.2f}x")
    return finish(out_dir, runs, summary)


def finish(out_dir: str, runs: dict, summary: dict) -> int:
    """Print the failed requests, write summary.json; the exit status (1 if any request failed)."""
    failed = sum(r["failed"] for rs in runs.values() for r in rs)
    print(f"failed requests: {failed}")
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/vllm_cpu"))
