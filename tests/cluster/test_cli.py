"""`raytp serve` as a user runs it: a subprocess, the OpenAI client, then Ctrl-C.

The command joins the session's Ray cluster through RAY_ADDRESS instead of
starting a second Ray (two Rays on a 2-core machine would fight over the
cores and double the start-up time). Joining is also the documented way to
run it on an existing cluster. Serve's HTTP options are cluster-wide, so
the test first makes sure no Serve runs on the cluster: the command then
starts Serve itself on the requested port, and shuts Serve down again on
Ctrl-C (without stopping the cluster it joined).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from raytp.cluster.comm import free_port

pytestmark = pytest.mark.timeout(240)


def _serve_running() -> bool:
    from ray.serve.context import _get_global_client

    return _get_global_client(raise_if_no_controller_running=False) is not None


class Output:
    """Collects a process's output lines in the background."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc):
        for line in proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def text(self) -> str:
        return "\n".join(self.lines)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


def test_cli_help():
    out = subprocess.run([sys.executable, "-m", "raytp.cli", "serve", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0
    for flag in ("--model", "--tensor-parallel-size", "--device", "--host", "--port", "--metrics-export-port",
                 "--max-model-len", "--max-num-seqs", "--api-key", "--max-queued-requests", "--cors-allow-origins"):
        assert flag in out.stdout


def test_cli_guard_options_reach_the_app_config():
    from raytp.cli import build_parser, engine_config_from_args

    args = build_parser().parse_args(["serve", "--model", "tiny", "--api-key", "sk-secret-9", "--max-queued-requests", "8",
                                      "--cors-allow-origins", "https://a.example", "https://b.example"])
    config = engine_config_from_args(args)
    assert (config.api_key, config.max_queued_requests) == ("sk-secret-9", 8)
    assert config.cors_allow_origins == ["https://a.example", "https://b.example"]
    assert "sk-secret-9" not in repr(config)  # the key stays out of logs


def test_cli_bad_option_names_field_and_value():
    out = subprocess.run([sys.executable, "-m", "raytp.cli", "serve", "--model", "tiny", "--tensor-parallel-size", "0"],
                         capture_output=True, text=True, timeout=60, env={**os.environ, "RAY_ADDRESS": ""})
    assert out.returncode == 2
    assert "tensor_parallel_size=0" in out.stderr


def test_cli_refuses_a_corrupt_gguf_before_starting_anything(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + bytes(60))
    out = subprocess.run([sys.executable, "-m", "raytp.cli", "serve", "--model", str(bad)],
                         capture_output=True, text=True, timeout=60, env={**os.environ, "RAY_ADDRESS": ""})
    assert out.returncode == 2
    assert f"{bad}: not a readable GGUF file" in out.stderr
    assert "starting a local Ray" not in out.stdout + out.stderr


def test_cli_serve_joins_cluster_answers_and_stops_on_ctrl_c(ray_cluster):
    import ray
    from ray import serve

    if _serve_running():
        serve.shutdown()
    port = free_port()
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "raytp.cli", "serve", "--model", "tiny", "--tensor-parallel-size", "2",
           "--device", "cpu", "--max-model-len", "256", "--host", "127.0.0.1", "--port", str(port),
           "--metrics-export-port", str(free_port())]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = Output(proc)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 150
        while True:
            assert proc.poll() is None, f"raytp serve exited early ({proc.returncode}):\n{out.text()}"
            try:
                if httpx.get(base + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"no /health 200 within 150s:\n{out.text()}"
            time.sleep(1)

        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60)
        res = client.completions.create(model="tiny", prompt="Hello world", max_tokens=8, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert res.usage.completion_tokens == 8 and res.choices[0].finish_reason == "length"

        # The API line comes once serve.run has returned, shortly after /health answers.
        deadline = time.monotonic() + 60
        while f"OpenAI API at {base}/v1" not in out.text():
            assert time.monotonic() < deadline, out.text()
            time.sleep(0.5)
        # Joined, not started: the metrics are the cluster node's own.
        assert f"metrics at http://127.0.0.1:{ray_cluster.metrics_export_port}/metrics" in out.text()

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0, out.text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    out.join(5)
    assert "shutting down" in out.text() and "stopped" in out.text()
    # It shut down the Serve it started, and left the cluster it joined running.
    assert ray.is_initialized() and ray.cluster_resources().get("CPU") == ray_cluster.num_cpus
    assert not _serve_running()
    with pytest.raises(httpx.HTTPError):
        httpx.get(base + "/health", timeout=5)
