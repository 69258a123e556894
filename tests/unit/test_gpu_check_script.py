"""benchmarks/gpu_check.sh (the one-call GPU check) runs end to end on CPU as a dry run, so it cannot rot."""
import json
import os
import subprocess

import pytest

pytestmark = pytest.mark.timeout(150)

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def test_dry_run_on_cpu_writes_one_passing_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--device", "cpu", "--out", str(out),
                           "--checkpoint-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=140)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"].startswith("CPU") and report["dry_run"] is True and report["ok"] is True
    checks = report["checks"]
    assert set(checks) == {"tests_gpu", "engine_tp1", "nccl_world1", "decode"}
    # tests/gpu: collected, every one skipped without CUDA, none failed
    assert checks["tests_gpu"]["tests"] > 0 and checks["tests_gpu"]["skipped"] == checks["tests_gpu"]["tests"]
    assert checks["tests_gpu"]["failures"] == checks["tests_gpu"]["errors"] == 0
    engine = checks["engine_tp1"]
    assert engine["dtype"] == "bfloat16" and engine["tokens_total"] == 4 * 24 and engine["kv_blocks"] > 0
    assert all(p["matching_prefix"] > 0 for p in engine["prompts"])
    assert engine["attention_backend"] == "cpu" and engine["block_size"] == 16
    assert checks["nccl_world1"]["skipped"].startswith("needs CUDA")
    decode = checks["decode"]
    assert decode["shape"] == "small" and set(decode["raytp_decode_tokens_per_s"]) == {"1", "2"}
    assert 0 < decode["batch1_roofline_fraction"]["raytp"]
    assert decode["attention_backend"] == "cpu" and decode["cuda_graphs"] is False
    # benchmarks/gpu_decode.py's own measurement, which the check ran (tests/unit/test_gpu_decode_script.py has its
    # arithmetic): the copy bandwidth behind the roofline, and transformers' speed beside raytp's.
    assert decode["copy_bandwidth_bytes_per_s"] > 0 and decode["roofline_tokens_per_s"] > 0
    assert set(decode["transformers_decode_tokens_per_s"]) == {"1", "2"}
    assert all(v > 0 for v in decode["transformers_decode_tokens_per_s"].values())


def test_bad_arguments_are_named():
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--device", "tpu"], cwd=ROOT, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2 and "--device must be cuda or cpu, not 'tpu'" in proc.stderr
