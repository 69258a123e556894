"""The checks of benchmarks/gpu_check.sh after tests/gpu, on one device, without Ray; everything goes into one JSON.

- engine_tp1: raytp's engine in this process (AsyncEngine over a LocalExecutor: the start-up that profiles
  memory and sizes the KV cache, then scheduled steps) generates greedy tokens on a random-weight checkpoint
  written with transformers' save_pretrained; transformers generates on the same device, in the same dtype.
  Low-precision kernels differ, so two greedy runs may part where the top two logits nearly tie: a prompt
  passes if its tokens are equal, or part only where raytp's token is in transformers' top 2.
- nccl_world1: cupy's NCCL at world size 1 through raytp's communicator (warm-up at init, all-reduce,
  all-gather, collective time from CUDA events, abort on close). On CPU: skipped.
- decode: benchmarks/gpu_decode.py's measurement (raytp against transformers, batch-1 roofline fraction).

engine_tp1 and decode record the attention kernel the rank ran and fail on CUDA when it is the reference (the
slow fallback of attention_backend auto).

    python benchmarks/gpu_check.py --device cuda --out gpu_check.json [--tests-junit tests_gpu.xml]
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests.helpers, from the repo
import gpu_decode  # noqa: E402  (benchmarks/, next to this file)

NEW_TOKENS = 24


def pytest_summary(junit_xml: str) -> dict:
    """Counts from pytest's --junitxml report; ok unless a test failed or errored (skips are fine: no CUDA)."""
    if not os.path.isfile(junit_xml):
        return {"ok": False, "error": f"no pytest report at {junit_xml} (pytest did not finish)"}
    suite = ET.parse(junit_xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return {**counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "ok": counts["failures"] == 0 and counts["errors"] == 0}


def kernel_ok(device: str, attention_backend: str) -> bool:
    """On CUDA the check fails on the reference attention: a replica there is slow, whatever its tokens."""
    return device != "cuda" or attention_backend.startswith("cuda")


def graphs_ok(device: str, replays: int) -> bool:
    """On CUDA decode steps must replay CUDA graphs (cuda_graphs defaults to true)."""
    return device != "cuda" or replays > 0


def engine_tp1(device: str, dtype: str, work_dir: str) -> dict:
    from raytp.config import EngineConfig
    from raytp.engine.engine import AsyncEngine
    from raytp.cluster.executor import LocalExecutor
    from raytp.sampling import SamplingParams
    from tests.helpers import load_reference, write_llama

    # GQA (8 query heads, 2 KV heads), head_dim 32; a wider init than transformers' default, so that greedy
    # tokens are decided by clear margins rather than bf16 rounding.
    path = write_llama(work_dir, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=2, vocab_size=1024, max_position_embeddings=512, initializer_range=0.1,
                       seed=14)
    g = torch.Generator().manual_seed(14)
    prompts = [torch.randint(3, 1024, (n,), generator=g).tolist() for n in (5, 17, 40, 96)]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    cfg = EngineConfig(model=path, device=device, dtype=dtype, max_model_len=256, max_num_seqs=len(prompts))

    async def generate() -> tuple[list[list[int]], int]:
        engine = AsyncEngine(cfg, lambda c, p, m: LocalExecutor(c, p, m))
        await engine.start()
        try:
            async def one(i: int, prompt: list[int]) -> list[int]:
                return [t async for out in engine.generate(prompt, params, f"check-{i}") for t in out.delta_token_ids]

            outs = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
            executor = engine.core.supervisor.executor
            graphs = executor.worker.graphs
            return outs, executor.num_kv_blocks, executor.attention_backend, graphs.replays if graphs else 0
        finally:
            await engine.shutdown()

    t0 = time.perf_counter()
    ours, kv_blocks, attention, replays = asyncio.run(generate())
    seconds = time.perf_counter() - t0
    left = {}
    if device == "cuda":  # what the engine left on the device once shut down (before and after a gc pass)
        left = {"allocated_gib": torch.cuda.memory_allocated() / 2**30, "reserved_gib": torch.cuda.memory_reserved() / 2**30}
        gc.collect()
        torch.cuda.empty_cache()
        left.update(allocated_after_gc_gib=torch.cuda.memory_allocated() / 2**30,
                    reserved_after_gc_gib=torch.cuda.memory_reserved() / 2**30)
    ref = load_reference(path, dtype=getattr(torch, dtype), device=device)
    ref.generation_config.eos_token_id = None
    per_prompt = []
    for prompt, tokens in zip(prompts, ours):
        ids = torch.tensor([prompt], device=device)
        with torch.inference_mode():
            out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                               min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, output_scores=True,
                               return_dict_in_generate=True)
        theirs = out.sequences[0, len(prompt):].tolist()
        same = next((i for i, (a, b) in enumerate(zip(tokens, theirs)) if a != b), len(theirs))
        row = {"prompt_len": len(prompt), "matching_prefix": same, "tokens": len(theirs)}
        if same < len(theirs):  # where they part, is raytp's token transformers' runner-up?
            row["near_tie"] = tokens[same] in out.scores[same][0].topk(2).indices.tolist()
        per_prompt.append(row)
    same_tokens = all(r["matching_prefix"] == r["tokens"] or (r["matching_prefix"] > 0 and r["near_tie"])
                      for r in per_prompt)
    return {"ok": same_tokens and kernel_ok(device, attention) and graphs_ok(device, replays),
            "attention_backend": attention, "cuda_graph_replays": replays, "memory_left_after_shutdown": left,
            "block_size": cfg.resolved_block_size(), "dtype": dtype, "kv_blocks": kv_blocks, "engine_seconds": seconds, "prompts": per_prompt,
            "tokens_matching": sum(r["matching_prefix"] for r in per_prompt),
            "tokens_total": sum(r["tokens"] for r in per_prompt)}


def nccl_world1(device: str) -> dict:
    if device != "cuda":
        return {"ok": True, "skipped": "needs CUDA (dry run)"}
    from cupy.cuda import nccl

    from raytp.cluster.comm import NcclCommunicator, nccl_unique_id
    from raytp.cluster.worker import TimedCommunicator

    t0 = time.perf_counter()
    comm = NcclCommunicator(nccl_unique_id(), 0, 1)  # includes the warm-up all-reduce
    init_seconds = time.perf_counter() - t0
    timed = TimedCommunicator(comm, cuda_events=True)
    checks = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int64):
        x = (torch.arange(1 << 20, device="cuda") % 97).to(dtype)  # (1M,)
        expected = x.clone()
        checks[str(dtype)] = (torch.equal(timed.all_reduce(x), expected)
                              and torch.equal(timed.all_gather(x.view(1024, 1024), dim=0), expected.view(1024, 1024)))
    t0 = time.perf_counter()
    timed.all_reduce(torch.ones(1, device="cuda"))
    torch.cuda.synchronize()
    first_small_seconds = time.perf_counter() - t0
    collective_seconds = timed.take_seconds()
    t0 = time.perf_counter()
    timed.close()
    close_seconds = time.perf_counter() - t0
    return {"ok": all(checks.values()) and collective_seconds > 0, "nccl_version": nccl.get_version(),
            "correct": checks, "init_with_warm_up_seconds": init_seconds,
            "small_all_reduce_after_init_seconds": first_small_seconds,
            "collective_seconds_from_cuda_events": collective_seconds, "abort_seconds": close_seconds}


def decode(device: str, dtype: str, shape: str, checkpoint_dir: str, work_dir: str) -> dict:
    """gpu_decode.py in a process of its own: its model and KV cache are sized from a device that nothing of the
    checks before it still holds memory on."""
    out = os.path.join(work_dir, "decode.json")
    size = (["--batches", "1", "32", "--prompt-len", "128", "--new-tokens", "128"] if device == "cuda" else
            ["--batches", "1", "2", "--prompt-len", "16", "--new-tokens", "8", "--copy-mib", "64"])  # dry run: small
    proc = subprocess.run([sys.executable, gpu_decode.__file__, "--shape", shape, "--device", device, "--dtype", dtype,
                           "--checkpoint-dir", checkpoint_dir, "--out-json", out, *size], capture_output=True, text=True)
    print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", flush=True)
    if proc.returncode != 0:
        return {"ok": False, "error": f"gpu_decode.py exited with {proc.returncode}", "stderr": proc.stderr[-4000:]}
    with open(out) as f:
        r = json.load(f)
    r["ok"] = (all(v > 0 for v in r["raytp_decode_tokens_per_s"].values()) and kernel_ok(device, r["attention_backend"])
               and graphs_ok(device, r["cuda_graph_replays"]))
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--decode-shape", choices=sorted(gpu_decode.SHAPES), help="default: llama3-8b on cuda, small on cpu")
    ap.add_argument("--checkpoint-dir", default=gpu_decode.default_cache_dir())
    ap.add_argument("--tests-junit", help="pytest --junitxml report of tests/gpu")
    ap.add_argument("--out", required=True, help="the JSON to write (rewritten after every check)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda, but torch sees no CUDA device (use --device cpu for a dry run)", file=sys.stderr)
        return 2
    shape = args.decode_shape or ("llama3-8b" if args.device == "cuda" else "small")
    report = {"device": gpu_decode.device_name(args.device), "dry_run": args.device == "cpu", "torch": torch.__version__,
              "torch_cuda": torch.version.cuda, "checks": {}}
    if args.tests_junit:
        report["checks"]["tests_gpu"] = pytest_summary(args.tests_junit)
    with tempfile.TemporaryDirectory() as work_dir:
        checks = [("engine_tp1", lambda: engine_tp1(args.device, args.dtype, work_dir)),
                  ("nccl_world1", lambda: nccl_world1(args.device)),
                  ("decode", lambda: decode(args.device, args.dtype, shape, args.checkpoint_dir, work_dir))]
        for name, run in checks:
            print(f"== {name}", flush=True)
            t0 = time.perf_counter()
            try:
                report["checks"][name] = run()
            except Exception as err:  # noqa: BLE001 - a check that raises is a failed check; the others still run
                report["checks"][name] = {"ok": False, "error": f"{type(err).__name__}: {err}",
                                          "traceback": traceback.format_exc(limit=-8)}
            report["checks"][name]["seconds"] = round(time.perf_counter() - t0, 2)
            print(json.dumps(report["checks"][name], default=str)[:2000], flush=True)
            report["ok"] = all(c["ok"] for c in report["checks"].values())
            with open(args.out, "w") as f:
                json.dump(report, f, indent=2, default=str)
    print(f"\n{report['device']}: {'all checks passed' if report['ok'] else 'FAILED: ' + ', '.join(n for n, c in report['checks'].items() if not c['ok'])}"
          f" -> {args.out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
