"""Turn runs into numbers: per-run statistics, the tables, the JSON file and the latency-throughput plot.

Output tokens are the counted ones (usage block / engine output). Throughput
is output tokens over the run's duration (first arrival to last completion);
latencies are per request (TTFT, E2E) or per token gap (ITL), in ms, at
p50/p90/p99 (linear interpolation, as numpy.percentile).
"""
from __future__ import annotations

import json
import math
import os
import platform
import time

from raytp.bench.loadgen import RunResult

PERCENTILES = (50, 90, 99)


def _stats_ms(values: list[float]) -> dict:
    import numpy as np

    if not values:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}, "max": None}
    arr = np.asarray(values, dtype=float) * 1000.0
    return {"mean": float(arr.mean()), **{f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES},
            "max": float(arr.max())}


def summarize(run: RunResult) -> dict:
    ok = [r for r in run.requests if r.error is None]
    failed = [r for r in run.requests if r.error is not None]
    out_tokens = sum(r.output_tokens for r in ok)
    duration = max(run.duration, 1e-9)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1 and r.ttft is not None]
    return {
        "backend": run.backend,
        "concurrency": run.concurrency,
        "request_rate": "inf" if math.isinf(run.request_rate) else run.request_rate,
        "num_requests": len(run.requests),
        "completed": len(ok),
        "failed": len(failed),
        "errors": sorted({r.error for r in failed})[:5],
        "duration_s": run.duration,
        "total_input_tokens": sum(r.prompt_len for r in ok),
        "total_output_tokens": out_tokens,
        "requested_output_tokens": sum(r.output_len for r in run.requests),
        "token_chunks": sum(r.num_chunks for r in ok),
        "output_throughput": out_tokens / duration,
        "request_throughput": len(ok) / duration,
        "total_token_throughput": (out_tokens + sum(r.prompt_len for r in ok)) / duration,
        "ttft_ms": _stats_ms([r.ttft for r in ok if r.ttft is not None]),
        "itl_ms": _stats_ms([g for r in ok for g in r.itl]),
        "tpot_ms": _stats_ms(tpot),
        "e2e_ms": _stats_ms([r.e2e for r in ok if r.e2e is not None]),
        **_join_summary(ok),
        **run.extra,
    }


def _join_summary(ok: list) -> dict:
    """With a joining long prompt: its TTFT, and the longest gap it caused in the other streams (ms)."""
    joined = [r for r in ok if r.joins]
    if not joined:
        return {}
    others = [g for r in ok if not r.joins for g in r.itl]
    return {"join": {"prompt_len": joined[0].prompt_len, "ttft_ms": joined[0].ttft * 1000.0,
                     "streams_max_itl_ms": max(others) * 1000.0 if others else None}}


def streaming_warning(s: dict) -> str | None:
    """A note when the answers came in (nearly) one chunk each, so that TTFT and ITL say little."""
    if s["completed"] and s["total_output_tokens"] > 2 * s["completed"] and s["token_chunks"] <= s["completed"]:
        return (f"{s['backend']} c={s['concurrency']}: {s['total_output_tokens']} tokens came in {s['token_chunks']} "
                "chunks: the server did not stream token by token, so TTFT ~ E2E and ITL is empty (raytp serve "
                "only sends chunks with new text, and a checkpoint without a tokenizer has none)")
    return None


def machine_info() -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    info = {"hostname": platform.node(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "loadavg_1_5_15": [round(x, 2) for x in load],
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads_default"] = torch.get_num_threads()
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except Exception:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            info["cpu_model"] = names[0]
    except OSError:
        pass
    return info


# ---- tables -------------------------------------------------------------------------------


def _fmt(v, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def runs_table(summaries: list[dict]) -> str:
    header = ["backend", "conc", "thr", "rate", "done", "out tok/s", "req/s"]
    for metric in ("TTFT", "ITL", "E2E"):
        header += [f"{metric} p{p}" for p in PERCENTILES]
    rows = []
    for s in summaries:
        row = [s["backend"], str(s["concurrency"]), _fmt(s.get("threads")), _fmt(s["request_rate"]), f"{s['completed']}/{s['num_requests']}",
               _fmt(s["output_throughput"]), _fmt(s["request_throughput"], 2)]
        for key in ("ttft_ms", "itl_ms", "e2e_ms"):
            row += [_fmt(s[key][f"p{p}"]) for p in PERCENTILES]
        rows.append(row)
    return _table(header, rows) + ("\n(latencies in ms; out tok/s counts each request's own output tokens; conc is the "
                                   "batch size for transformers; thr: torch threads where known)")


def compare_table(compare: dict) -> str:
    header = ["backend", "setting", "out tok/s", "x HF static", "TTFT p50", "ITL p50", "E2E p50", "E2E p99"]
    rows = []
    base = compare.get("transformers_best_static_tok_s")
    for entry in compare["rows"]:
        s = entry["summary"]
        ratio = s["output_throughput"] / base if base else None
        rows.append([entry["label"], entry["setting"], _fmt(s["output_throughput"]), _fmt(ratio, 2),
                     _fmt(s["ttft_ms"]["p50"]), _fmt(s["itl_ms"]["p50"]), _fmt(s["e2e_ms"]["p50"]),
                     _fmt(s["e2e_ms"]["p99"])])
    lines = [_table(header, rows)]
    targets = compare.get("targets", {})
    for c in compare.get("per_concurrency", []):
        parts = []
        if c.get("http_vs_hf_static") is not None:
            goal = targets.get("http_vs_hf_static_min")
            parts.append(f"raytp HTTP / transformers best static = {c['http_vs_hf_static']:.2f}x"
                         + (f" (target >= {goal:g}x)" if goal else ""))
        if c.get("serving_overhead") is not None:
            goal = targets.get("serving_overhead_max")
            parts.append(f"serving overhead = 1 - HTTP/in-process = {100 * c['serving_overhead']:.1f}%"
                         + (f" (target < {100 * goal:g}%)" if goal else ""))
        if not parts:
            continue
        lines.append(f"concurrency {c['concurrency']}: " + "; ".join(parts))
        same = c.get("hf_same_threads")
        if same and same["output_throughput"] != base:
            ratios = [f"in-process {c['inprocess_vs_hf_static_same_threads']:.2f}x"]
            if c.get("http_vs_hf_static_same_threads") is not None:
                ratios.append(f"HTTP {c['http_vs_hf_static_same_threads']:.2f}x")
            lines.append(f"    vs transformers with {same['threads']} thread(s) like a raytp rank "
                         f"(best bs={same['batch_size']}, {same['output_throughput']:.1f} tok/s): " + ", ".join(ratios))
    return "\n".join(lines)


# ---- files --------------------------------------------------------------------------------


def write_json(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False, default=str)
        f.write("\n")


def plot_latency_throughput(summaries: list[dict], path: str, title: str = "") -> None:
    """Three panels (TTFT, ITL, E2E; p50 solid, p99 dashed) against output tok/s, one line per backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends: dict[str, list[dict]] = {}  # one line per series: transformers' batch sizes form one
    for s in summaries:
        if s["completed"]:
            series = (f"transformers static, {s['threads']} thr (bs)" if "batch_size" in s
                      else f"{s['backend']} (concurrency)")
            backends.setdefault(series, []).append(s)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (key, name) in zip(axes, (("ttft_ms", "TTFT"), ("itl_ms", "inter-token latency"), ("e2e_ms", "end-to-end latency"))):
        for i, (backend, points) in enumerate(sorted(backends.items())):
            points = sorted((p for p in points if p[key]["p50"] is not None), key=lambda s: s["output_throughput"])
            if not points:  # e.g. no inter-token gaps: the server sent each answer in one chunk
                continue
            x = [p["output_throughput"] for p in points]
            color = f"C{i}"
            ax.plot(x, [p[key]["p50"] for p in points], "o-", color=color, label=f"{backend} p50")
            ax.plot(x, [p[key]["p99"] for p in points], "x--", color=color, alpha=0.6, label=f"{backend} p99")
            for p in points:
                label = str(p.get("batch_size", p["concurrency"]))  # the point's sweep value
                ax.annotate(label, (p["output_throughput"], p[key]["p50"]),
                            textcoords="offset points", xytext=(3, 3), fontsize=7, color=color)
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel(f"{name} (ms)")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(name)
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
            break
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
