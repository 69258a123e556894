"""Start `raytp serve` as a subprocess for a benchmark, wait until it answers, stop it afterwards."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time


class ServerError(RuntimeError):
    """The server did not start (its log's tail is in the message)."""


def _tail(path: str, lines: int = 40) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


class ServerProcess:
    """``raytp serve --model PATH --tensor-parallel-size N --device cpu --port P --metrics-export-port M`` in a child process.

    Output goes to a log file (its path is printed). `stop()` sends SIGINT
    (raytp serve's Ctrl-C: it shuts down Serve and the Ray it started), then
    SIGTERM, then kills the child's process group as a last resort.
    """

    def __init__(self, model_path: str, tensor_parallel_size: int = 1, device: str = "cpu", port: int | None = None,
                 metrics_export_port: int | None = None, extra_args: list[str] | None = None,
                 startup_timeout_s: float = 600.0, log_path: str | None = None):
        from raytp.cluster.comm import free_port

        self.port = port or free_port()
        self.metrics_export_port = metrics_export_port or free_port()
        self.cmd = [sys.executable, "-m", "raytp.cli", "serve", "--model", model_path,
                    "--tensor-parallel-size", str(tensor_parallel_size), "--device", device,
                    "--host", "127.0.0.1", "--port", str(self.port),
                    "--metrics-export-port", str(self.metrics_export_port), *(extra_args or [])]
        self.startup_timeout_s = startup_timeout_s
        self.log_path = log_path or os.path.join(tempfile.gettempdir(), f"raytp-bench-serve-{self.port}.log")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "ServerProcess":
        print(f"starting: {' '.join(self.cmd)}  (log: {self.log_path})", flush=True)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        import httpx

        t0 = time.monotonic()
        with httpx.Client(timeout=5.0, trust_env=False) as client:
            while True:
                if self.proc.poll() is not None:
                    raise ServerError(f"raytp serve exited with status {self.proc.returncode} before it was ready; "
                                      f"log {self.log_path}:\n{_tail(self.log_path)}")
                try:
                    models = client.get(f"{self.url}/v1/models")
                    health = client.get(f"{self.url}/health")
                    if models.status_code == 200 and models.json().get("data") and health.status_code == 200:
                        print(f"raytp serve is ready at {self.url} after {time.monotonic() - t0:.0f}s", flush=True)
                        return
                except (httpx.HTTPError, ValueError):
                    pass
                if time.monotonic() - t0 > self.startup_timeout_s:
                    raise ServerError(f"raytp serve was not ready within {self.startup_timeout_s:g}s; "
                                      f"log {self.log_path}:\n{_tail(self.log_path)}")
                time.sleep(1.0)

    def stop(self, timeout_s: float = 60.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        for sig, wait in ((signal.SIGINT, timeout_s), (signal.SIGTERM, 15.0)):
            if proc.poll() is not None:
                break
            proc.send_signal(sig)
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the session we started it in: our child and its Ray
            except ProcessLookupError:
                pass
            proc.wait(10)
        self._log.close()

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
