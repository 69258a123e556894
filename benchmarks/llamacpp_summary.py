"""Summarise benchmarks/compare_llamacpp.sh's JSON files: per workload, each server's median over rounds, and each
server's ratio to llama.cpp at one thread (throughput: higher is better; latency: lower is better).

    python benchmarks/llamacpp_summary.py benchmarks/results/llamacpp
"""
from __future__ import annotations

import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vllm_summary import LATENCY, finish, load  # noqa: E402  (the same file layout and run summaries)

BASELINE = "llamacpp1"
SERVERS = ["raytpf32", "raytpbf16", "raytpint8", "raytpint4", "vllmbf16", "llamacpp1", "llamacppall"]
METRICS = {
    "single": [("decode tok/s", lambda s: 1000.0 / s["itl_ms"]["p50"]), ("TTFT p50", lambda s: s["ttft_ms"]["p50"])],
    "burst": [("out tok/s", lambda s: s["output_throughput"]), *LATENCY[:1], *LATENCY[2:4]],
    "poisson": [("out tok/s", lambda s: s["output_throughput"]), *LATENCY[:1], *LATENCY[2:3]],
}


def main(out_dir: str) -> int:
    runs = load(out_dir)
    servers = [s for s in SERVERS if any(key[0] == s for key in runs)]
    summary: dict = {}
    print(f"{'workload':9}  {'metric':12}  " + "  ".join(f"{s:>19}" for s in servers) + f"   (median of rounds; ms; "
          f"ratio to {BASELINE} in brackets)")
    for workload, metrics in METRICS.items():
        for name, get in metrics:
            medians = {s: statistics.median([get(r) for r in runs[(s, workload)]]) for s in servers if (s, workload) in runs}
            if not medians:
                continue
            base = medians.get(BASELINE)
            cells = []
            for s in servers:
                if s not in medians:
                    cells.append(f"{'-':>19}")
                    continue
                ratio = f" ({medians[s] / base:5.2f}x)" if base else ""
                cells.append(f"{medians[s]:>10.1f}{ratio}")
            summary[f"{workload} {name}"] = {s: medians[s] for s in medians}
            print(f"{workload:9}  {name:12}  " + "  ".join(cells))
    return finish(out_dir, runs, summary)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/llamacpp"))
