"""What `raytp bench` and `raytp bench compare` run, in order, and what they write.

`run`: the load generator over HTTP against `--url` (any OpenAI-compatible
server) or against a `raytp serve` it starts for `--model`; one run per
concurrency of the sweep.

`compare`: on one checkpoint and one workload, in one process and one go:
transformers one request at a time and with static batches (each batch size
of the list), raytp's engine in-process (AsyncEngine + LocalExecutor, TP=1),
and raytp over HTTP (a `raytp serve` subprocess at TP=1, or `--url`). The
phases run one after another, each alone on the machine (the server starts
only after the in-process phases are done and their memory is freed).
"""
from __future__ import annotations

import asyncio
import gc
import json
import math
import os
from dataclasses import asdict, dataclass, field

from raytp.bench import report
from raytp.bench.loadgen import OpenAIBackend, RequestSpec, RunResult, arrival_times, make_workload, run_load, warm_up

HTTP_VS_HF_TARGET = 1.5
OVERHEAD_TARGET = 0.10


@dataclass
class BenchOptions:
    model: str | None = None  # checkpoint dir, 'tiny' or 'bench-58m'
    url: str | None = None  # an already running server; else one is started for `model`
    served_model_name: str | None = None  # the `model` field of requests; default: the server's first model
    vocab_size: int | None = None  # default: from the checkpoint's config.json
    num_prompts: int = 32
    prompt_len: tuple[int, int] = (16, 128)
    output_len: tuple[int, int] = (16, 96)
    request_rate: float = math.inf
    shared_prefix_len: int = 0  # tokens every prompt starts with (a system prompt / document)
    join_prompt_len: int = 0  # one more request with a prompt this long, arriving at join_at s
    join_at: float = 1.0
    concurrency: list[int] = field(default_factory=lambda: [1, 4, 16, 32])
    seed: int = 0
    backends: list[str] = field(default_factory=lambda: ["transformers", "inprocess", "http"])  # compare only
    hf_batch_sizes: list[int] = field(default_factory=lambda: [1, 4, 8, 16, 32])
    hf_threads: list[int] | None = None  # torch threads for transformers (each is tried); default: all cores
    cpus_per_rank: int = 1  # raytp's cpus_per_rank (CPU: torch threads per rank), in-process and for the server started
    tensor_parallel_size: int = 1  # of the raytp serve started for the HTTP runs (in-process is always TP=1)
    server_args: list[str] = field(default_factory=list)  # extra `raytp serve` options
    out_json: str | None = None
    out_png: str | None = None
    progress: bool = True
    repeat: int = 1  # runs per point; the fastest is kept (the others' throughputs are recorded)


def _say(msg: str) -> None:
    print(f"raytp bench: {msg}", flush=True)


def _model_path(opts: BenchOptions) -> str | None:
    if opts.model is None:
        return None
    from raytp.bench.checkpoint import resolve_bench_model

    return resolve_bench_model(opts.model)


def _vocab_size(opts: BenchOptions, model_path: str | None) -> int:
    if opts.vocab_size:
        return opts.vocab_size
    if model_path is None:
        raise ValueError("--vocab-size is needed when no --model checkpoint is given (prompts are random token ids)")
    with open(os.path.join(model_path, "config.json")) as f:
        return int(json.load(f)["vocab_size"])


def _loadavg() -> float:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else float("nan")


def _warn_if_busy() -> None:
    load, cpus = _loadavg(), os.cpu_count() or 1
    if load > 0.5 * cpus:
        _say(f"warning: the 1-minute load average is {load} on {cpus} CPUs before this run: other processes compete "
             "for the cores and the numbers will be noisy")


def _workload(opts: BenchOptions, vocab: int) -> tuple[list[RequestSpec], list[float]]:
    specs = make_workload(opts.num_prompts, opts.prompt_len, opts.output_len, vocab, opts.seed,
                          opts.shared_prefix_len, opts.join_prompt_len)
    join_at = opts.join_at if opts.join_prompt_len else None
    return specs, arrival_times(opts.num_prompts, opts.request_rate, opts.seed, join_at)


def _meta(opts: BenchOptions, model_path: str | None, vocab: int, specs: list[RequestSpec]) -> dict:
    workload = {
        "num_prompts": opts.num_prompts, "prompt_len": list(opts.prompt_len), "output_len": list(opts.output_len),
        "request_rate": "inf" if math.isinf(opts.request_rate) else opts.request_rate, "seed": opts.seed,
        "shared_prefix_len": opts.shared_prefix_len, "join_prompt_len": opts.join_prompt_len,
        "join_at": opts.join_at if opts.join_prompt_len else None,
        "vocab_size": vocab, "requested_output_tokens": sum(s.output_len for s in specs),
        "prompt_tokens": sum(len(s.prompt_ids) for s in specs), "temperature": 0.0, "ignore_eos": True,
    }
    opt = {k: v for k, v in asdict(opts).items() if k not in ("out_json", "out_png", "progress")}
    opt["request_rate"] = workload["request_rate"]
    return {"machine": report.machine_info(), "model": opts.model, "model_path": model_path, "workload": workload,
            "options": opt}


def _best(runs: list[RunResult]) -> RunResult:
    """The fastest of repeated runs of one point (least disturbed by other load); all throughputs are kept."""
    tok_s = [report.summarize(r)["output_throughput"] for r in runs]
    best = runs[max(range(len(runs)), key=tok_s.__getitem__)]
    if len(runs) > 1:
        best.extra["repeats_output_throughput"] = tok_s
    return best


# ---- the phases ------------------------------------------------------------------------------


async def _http_sweep(url: str, opts: BenchOptions, specs, arrivals, vocab: int, name: str,
                      threads: int | None = None, tp: int | None = None) -> list[RunResult]:
    backend = OpenAIBackend(url, opts.served_model_name or "", max_connections=max(opts.concurrency) + 4, name=name)
    try:
        if not opts.served_model_name:
            models = await backend.get_json("/v1/models")
            backend.model = models["data"][0]["id"]
        _say(f"{name}: model {backend.model!r} at {url}")
        await warm_up(backend, vocab)
        runs = []
        for c in opts.concurrency:
            load = _loadavg()
            run = _best([await run_load(backend, specs, arrivals, c, opts.progress) for _ in range(opts.repeat)])
            run.extra.update({"url": url, "loadavg_1m_before": load})
            if threads is not None:
                run.extra["threads"] = threads
            if tp is not None:
                run.extra["tensor_parallel_size"] = tp
            runs.append(run)
            summary = report.summarize(run)
            _say(f"{name} c={c}: {summary['output_throughput']:.1f} output tok/s")
            if report.streaming_warning(summary):
                _say("warning: " + report.streaming_warning(summary))
        return runs
    finally:
        await backend.aclose()


def run_http(opts: BenchOptions, model_path: str | None, specs, arrivals, vocab: int, name: str = "raytp-http") -> tuple[list[RunResult], dict]:
    """The HTTP sweep against opts.url, or against a `raytp serve` started (and stopped) here."""
    if opts.url:
        return asyncio.run(_http_sweep(opts.url, opts, specs, arrivals, vocab, name if opts.model else "http")), {"url": opts.url}
    if model_path is None:
        raise ValueError("give --url (a running server) or --model (raytp serve is started for it)")
    from raytp.bench.server import ServerProcess

    tp = opts.tensor_parallel_size
    server = ServerProcess(model_path, tp, "cpu", extra_args=["--cpus-per-rank", str(opts.cpus_per_rank), *opts.server_args])
    with server:
        runs = asyncio.run(_http_sweep(server.url, opts, specs, arrivals, vocab, name, threads=opts.cpus_per_rank, tp=tp))
    return runs, {"server_cmd": server.cmd, "server_log": server.log_path}


def run_inprocess(opts: BenchOptions, model_path: str, specs, arrivals, vocab: int) -> list[RunResult]:
    from raytp.bench.baselines import EngineBackend

    async def go() -> list[RunResult]:
        backend = await EngineBackend.start(model_path, opts.cpus_per_rank)
        try:
            await warm_up(backend, vocab)
            runs = []
            for c in opts.concurrency:
                load = _loadavg()
                run = _best([await run_load(backend, specs, arrivals, c, opts.progress) for _ in range(opts.repeat)])
                run.extra.update({"threads": opts.cpus_per_rank, "loadavg_1m_before": load})
                runs.append(run)
                _say(f"raytp-inprocess c={c}: {report.summarize(run)['output_throughput']:.1f} output tok/s")
            return runs
        finally:
            await backend.shutdown()

    return asyncio.run(go())


def run_transformers(opts: BenchOptions, model_path: str, specs, arrivals, vocab: int) -> list[RunResult]:
    import torch

    from raytp.bench.baselines import load_transformers_model, run_transformers_static, warm_up_transformers

    old_threads = torch.get_num_threads()
    runs = []
    try:
        model = load_transformers_model(model_path)
        for threads in opts.hf_threads or [os.cpu_count() or 1]:
            torch.set_num_threads(threads)
            warm_up_transformers(model, vocab)
            for bs in opts.hf_batch_sizes:
                load = _loadavg()
                run = _best([run_transformers_static(model, specs, arrivals, bs, opts.progress)
                             for _ in range(opts.repeat)])
                run.extra["loadavg_1m_before"] = load
                runs.append(run)
                _say(f"{run.backend} bs={bs} threads={threads}: {report.summarize(run)['output_throughput']:.1f} "
                     "output tok/s")
        del model
        gc.collect()
        return runs
    finally:
        torch.set_num_threads(old_threads)


# ---- the modes ---------------------------------------------------------------------------------


def _write_outputs(opts: BenchOptions, data: dict, title: str) -> None:
    if opts.out_json:
        report.write_json(opts.out_json, data)
        _say(f"wrote {opts.out_json}")
    if opts.out_png:
        report.plot_latency_throughput(data["runs"], opts.out_png, title)
        _say(f"wrote {opts.out_png}")


def bench_run(opts: BenchOptions) -> dict:
    model_path = _model_path(opts)
    vocab = _vocab_size(opts, model_path)
    specs, arrivals = _workload(opts, vocab)
    meta = _meta(opts, model_path, vocab, specs)
    _warn_if_busy()
    runs, server = run_http(opts, model_path, specs, arrivals, vocab, name="raytp-http" if not opts.url else "http")
    meta.update(server)
    summaries = [report.summarize(r) for r in runs]
    print(report.runs_table(summaries), flush=True)
    data = {"meta": meta, "runs": summaries}
    _write_outputs(opts, data, f"{opts.model or opts.url}: latency vs throughput")
    return data


def compare_summary(summaries: list[dict]) -> dict:
    """Side-by-side rows and the two headline ratios, per concurrency of the raytp runs."""
    hf = [s for s in summaries if s["backend"].startswith("transformers")]
    best = max(hf, key=lambda s: s["output_throughput"], default=None)
    rows = []
    seq = max((s for s in hf if s.get("batch_size") == 1), key=lambda s: s["output_throughput"], default=None)
    if seq is not None:
        rows.append({"label": "transformers", "setting": f"one at a time, {seq['threads']} thr", "summary": seq})
    if best is not None:
        rows.append({"label": "transformers", "setting": f"best static bs={best['batch_size']}, {best['threads']} thr",
                     "summary": best})
    per_c = []
    concs = sorted({s["concurrency"] for s in summaries if s["backend"].startswith(("raytp", "http"))})
    for c in concs:
        inproc = next((s for s in summaries if s["backend"] == "raytp-inprocess" and s["concurrency"] == c), None)
        http = next((s for s in summaries if s["backend"] in ("raytp-http", "http") and s["concurrency"] == c), None)
        for label, s in (("raytp in-process", inproc), ("raytp HTTP", http)):
            if s is not None:
                tp = f", TP={s['tensor_parallel_size']}" if s.get("tensor_parallel_size", 1) > 1 else ""
                thr = f", {s['threads']} thr" if s.get("threads") else ""
                rows.append({"label": label, "setting": f"concurrency {c}{tp}{thr}", "summary": s})
        entry = {"concurrency": c, "http_vs_hf_static": None, "serving_overhead": None,
                 "http_vs_hf_static_same_threads": None, "inprocess_vs_hf_static_same_threads": None}
        if http is not None and best is not None and best["output_throughput"] > 0:
            entry["http_vs_hf_static"] = http["output_throughput"] / best["output_throughput"]
        # transformers with as many threads as one raytp rank (the in-process run's), if it was tried
        same = max((s for s in hf if inproc is not None and s["threads"] == inproc.get("threads")),
                   key=lambda s: s["output_throughput"], default=None)
        if same is not None:
            entry["hf_same_threads"] = {"threads": same["threads"], "batch_size": same["batch_size"],
                                        "output_throughput": same["output_throughput"]}
            entry["inprocess_vs_hf_static_same_threads"] = inproc["output_throughput"] / same["output_throughput"]
            if http is not None:
                entry["http_vs_hf_static_same_threads"] = http["output_throughput"] / same["output_throughput"]
        # The cost of Ray + Serve + HTTP: only meaningful when both ran the same TP degree (in-process is TP=1).
        if http is not None and inproc is not None and inproc["output_throughput"] > 0 \
                and http.get("tensor_parallel_size", 1) == 1:
            entry["serving_overhead"] = 1.0 - http["output_throughput"] / inproc["output_throughput"]
        per_c.append(entry)
    headline = per_c[-1] if per_c else {}
    return {
        "rows": rows,
        "transformers_best_static_tok_s": best["output_throughput"] if best else None,
        "transformers_best_batch_size": best["batch_size"] if best else None,
        "transformers_best_threads": best["threads"] if best else None,
        "per_concurrency": per_c,
        "targets": {"http_vs_hf_static_min": HTTP_VS_HF_TARGET, "serving_overhead_max": OVERHEAD_TARGET},
        "headline": {
            **headline,
            "meets_http_vs_hf_static": None if headline.get("http_vs_hf_static") is None
            else headline["http_vs_hf_static"] >= HTTP_VS_HF_TARGET,
            "meets_serving_overhead": None if headline.get("serving_overhead") is None
            else headline["serving_overhead"] < OVERHEAD_TARGET,
        },
    }


def bench_compare(opts: BenchOptions) -> dict:
    if not opts.model:
        raise ValueError("compare needs --model (the checkpoint every backend loads), e.g. --model bench-58m")
    unknown = set(opts.backends) - {"transformers", "inprocess", "http"}
    if unknown:
        raise ValueError(f"unknown backends {sorted(unknown)}; choose from transformers, inprocess, http")
    model_path = _model_path(opts)
    vocab = _vocab_size(opts, model_path)
    specs, arrivals = _workload(opts, vocab)
    meta = _meta(opts, model_path, vocab, specs)
    _say(f"model {model_path}; {len(specs)} requests, {meta['workload']['prompt_tokens']} prompt tokens, "
         f"{meta['workload']['requested_output_tokens']} output tokens; request rate {meta['workload']['request_rate']}; "
         f"load average {_loadavg()}")
    _warn_if_busy()
    runs: list[RunResult] = []
    if "transformers" in opts.backends:
        runs += run_transformers(opts, model_path, specs, arrivals, vocab)
    if "inprocess" in opts.backends:
        runs += run_inprocess(opts, model_path, specs, arrivals, vocab)
        gc.collect()
    if "http" in opts.backends:
        http_runs, server = run_http(opts, model_path, specs, arrivals, vocab, name="raytp-http")
        runs += http_runs
        meta.update(server)
    meta["machine"]["loadavg_1m_end"] = _loadavg()
    summaries = [report.summarize(r) for r in runs]
    compare = compare_summary(summaries)
    print(report.runs_table(summaries), flush=True)
    print(flush=True)
    print(report.compare_table(compare), flush=True)
    data = {"meta": meta, "runs": summaries, "compare": compare}
    _write_outputs(opts, data, f"{opts.model}: latency vs output throughput ({os.cpu_count()} CPUs)")
    return data
