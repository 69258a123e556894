"""Smoke run of `raytp bench`: the in-process engine baseline and the HTTP load generator against a Serve app
of the tiny model, ~4 requests each; the report's fields and counts are checked, never its timings."""
from __future__ import annotations

import asyncio
import json
import math

import pytest

from raytp.bench import report
from raytp.bench.baselines import EngineBackend
from raytp.bench.cli import add_bench_arguments, options_from_args
from raytp.bench.loadgen import OpenAIBackend, arrival_times, make_workload, run_load
from raytp.bench.runner import compare_summary

APP = "bench-smoke"
N = 4


def _check_summary(s: dict, backend: str, specs) -> None:
    requested = sum(spec.output_len for spec in specs)
    assert s["backend"] == backend
    assert s["num_requests"] == N and s["completed"] == N and s["failed"] == 0, s["errors"]
    # ignore_eos: every request produces exactly what it asked for.
    assert s["total_output_tokens"] == s["requested_output_tokens"] == requested
    assert s["total_input_tokens"] == sum(len(spec.prompt_ids) for spec in specs)
    assert N <= s["token_chunks"] <= requested
    assert s["duration_s"] > 0
    assert s["output_throughput"] == pytest.approx(requested / s["duration_s"])
    assert s["request_throughput"] == pytest.approx(N / s["duration_s"])
    for key in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms"):
        st = s[key]
        assert set(st) == {"mean", "p50", "p90", "p99", "max"}
        assert 0 <= st["p50"] <= st["p90"] <= st["p99"] <= st["max"], (key, st)
    assert s["ttft_ms"]["p99"] <= s["e2e_ms"]["p99"]


def _check_requests(run, specs) -> None:
    for res, spec in zip(run.requests, specs):
        assert res.error is None
        assert res.output_tokens == spec.output_len
        assert 0 < res.ttft <= res.e2e
        # One gap per token chunk after the first; a server may merge chunks, never split a token.
        assert len(res.itl) <= spec.output_len - 1


def _serve_url(port: int) -> str:
    from ray import serve

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:  # Serve may already run in this session with its own HTTP options
        from ray.serve.context import _get_global_client

        port = _get_global_client().http_config.port
    except Exception:
        pass
    return f"http://127.0.0.1:{port}/{APP}"


@pytest.mark.timeout(240)
def test_bench_inprocess_and_http(ray_cluster, tmp_path):
    from ray import serve

    from raytp.cluster.comm import free_port
    from raytp.config import EngineConfig
    from raytp.serve.app import build_deployment
    from raytp.tiny import ensure_tiny_checkpoint

    path = ensure_tiny_checkpoint()
    specs = make_workload(N, (8, 24), (4, 12), vocab_size=1024, seed=3)
    arrivals = arrival_times(N, math.inf)
    assert arrivals == [0.0] * N

    async def inprocess():
        backend = await EngineBackend.start(path, threads=1, max_model_len=256)
        try:
            return await run_load(backend, specs, arrivals, concurrency=2, progress=False)
        finally:
            await backend.shutdown()

    inproc = asyncio.run(inprocess())
    _check_requests(inproc, specs)

    url = _serve_url(free_port())
    config = EngineConfig(model="tiny", device="cpu", max_model_len=256)
    serve.run(build_deployment(config), name=APP, route_prefix=f"/{APP}", blocking=False)
    try:
        async def http():
            backend = OpenAIBackend(url, "", name="raytp-http")
            try:
                backend.model = (await backend.get_json("/v1/models"))["data"][0]["id"]
                assert backend.model == "tiny"
                return await run_load(backend, specs, arrivals, concurrency=2, progress=False)
            finally:
                await backend.aclose()

        http_run = asyncio.run(http())
    finally:
        serve.delete(APP)
    _check_requests(http_run, specs)

    summaries = [report.summarize(inproc), report.summarize(http_run)]
    _check_summary(summaries[0], "raytp-inprocess", specs)
    _check_summary(summaries[1], "raytp-http", specs)
    assert summaries[0]["concurrency"] == summaries[1]["concurrency"] == 2
    assert summaries[0]["request_rate"] == summaries[1]["request_rate"] == "inf"

    # Side by side (no transformers row here): the overhead is defined, the HF ratio is not.
    compare = compare_summary(summaries)
    (entry,) = compare["per_concurrency"]
    assert entry["http_vs_hf_static"] is None
    expected = 1 - summaries[1]["output_throughput"] / summaries[0]["output_throughput"]
    assert entry["serving_overhead"] == pytest.approx(expected)
    assert [r["label"] for r in compare["rows"]] == ["raytp in-process", "raytp HTTP"]
    text = report.runs_table(summaries) + report.compare_table(compare)
    assert "raytp-http" in text and "serving overhead" in text
    # An HTTP run at TP=2 is labelled so, and not compared with the TP=1 in-process engine for overhead.
    tp2 = compare_summary([summaries[0], {**summaries[1], "tensor_parallel_size": 2}])
    assert tp2["per_concurrency"][0]["serving_overhead"] is None
    assert "TP=2" in tp2["rows"][1]["setting"]

    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    report.write_json(str(out_json), {"runs": summaries, "compare": compare})
    assert json.loads(out_json.read_text())["runs"][1]["total_output_tokens"] == sum(s.output_len for s in specs)
    report.plot_latency_throughput(summaries, str(out_png), "smoke")
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_arguments():
    import argparse

    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    args = parser.parse_args(["compare", "--model", "bench-58m", "--concurrency", "1,4", "--prompt-len", "16:128",
                              "--output-len", "32", "--request-rate", "2.5"])
    opts = options_from_args(args)
    assert args.mode == "compare"
    assert (opts.concurrency, opts.prompt_len, opts.output_len, opts.request_rate) == ([1, 4], (16, 128), (32, 32), 2.5)
    assert opts.tensor_parallel_size == 1
    assert options_from_args(parser.parse_args(["compare", "--tensor-parallel-size", "2"])).tensor_parallel_size == 2
    assert parser.parse_args([]).mode == "run" and math.isinf(parser.parse_args([]).request_rate)
    for bad in (["--prompt-len", "9:3"], ["--concurrency", "0"], ["--request-rate", "0"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
    arrivals = arrival_times(200, 10.0, seed=1)
    assert arrivals[0] == 0.0 and arrivals == sorted(arrivals)
    assert 10.0 < arrivals[-1] < 30.0  # ~199 gaps of mean 0.1s
