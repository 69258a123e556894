"""Decode throughput on one GPU: raytp's engine in-process (TP=1) against transformers `generate`.

For each batch size B: B requests of a fixed prompt length, all arriving at
once, each generating exactly --new-tokens tokens (greedy, no EOS). Decode
tokens/s = B * (new_tokens - 1) / (time from the batch's first token to its
last), so the prefill is left out. raytp runs its AsyncEngine over a
LocalExecutor (the serving path without Ray: steps are scheduled ahead, as in
`raytp serve`); transformers runs `generate` on the same checkpoint on the
same device, its step times taken with a streamer.

Batch-1 roofline: every decode step reads all weights once (the embedding
table only one row) plus the KV cache, so tokens/s <= bandwidth / bytes.
The bandwidth is measured here with a large device-to-device copy; the
result is reported as a fraction of that roofline. Every number is recorded
with the device name.

    python benchmarks/gpu_decode.py                       # Llama-3-8B shape, bf16, cuda
    python benchmarks/gpu_decode.py --shape small --device cpu --dtype float32   # a quick check anywhere

The Llama-3-8B-shaped checkpoint (hidden 4096, 32 layers, 32 heads, 8 KV
heads, intermediate 14336, vocab 128256; random weights, bf16, 16 GB) is
written once to --checkpoint-dir, one safetensors shard per layer.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time

import torch
from safetensors.torch import save_file

from raytp.random_checkpoint import default_cache_dir, ensure_dir, llama_config, llama_layer_weights, write_json

SHAPES = {
    # Llama-3-8B: the real model's shapes and rope theta, random weights.
    "llama3-8b": dict(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256,
                      bos_id=128000, eos_id=128001, max_positions=8192, rope_theta=500000.0),
    # For checking the script on any machine.
    "small": dict(hidden=256, intermediate=768, layers=4, heads=8, kv_heads=4, vocab=4096, bos_id=1, eos_id=2),
}
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# ---- the checkpoint ----------------------------------------------------------------------------


def _write_sharded(out_dir: str, config: dict, dtype: torch.dtype, device: str, seed: int = 8) -> None:
    """config.json + one shard per layer (and one for embeddings, norm and LM head) + the index."""
    write_json(out_dir, "config.json", config)
    write_json(out_dir, "generation_config.json", {"bos_token_id": config["bos_token_id"],
                                                   "eos_token_id": config["eos_token_id"]})
    g = torch.Generator(device=device).manual_seed(seed)
    h, vocab = config["hidden_size"], config["vocab_size"]

    def normal(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * 0.02).to(dtype).cpu()

    weight_map, total = {}, 0
    shards = [("model-embed-head.safetensors", {"model.embed_tokens.weight": normal(vocab, h),
                                                "model.norm.weight": torch.ones(h, dtype=dtype),
                                                "lm_head.weight": normal(vocab, h)})]
    for i in range(config["num_hidden_layers"]):
        shards.append((f"model-layer-{i:03d}.safetensors", llama_layer_weights(config, i, normal, dtype)))
    for name, tensors in shards:
        save_file(tensors, os.path.join(out_dir, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    write_json(out_dir, "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def ensure_checkpoint(shape: str, dtype: str, root: str, device: str) -> str:
    kw = dict(SHAPES[shape])
    rope_theta = kw.pop("rope_theta", 10000.0)
    config = llama_config(**kw, rope_theta=rope_theta, raytp_gpu_bench=1)
    config["torch_dtype"] = dtype
    final = os.path.join(root, f"gpu-bench-{shape}-{dtype}")

    def is_current(path: str) -> bool:
        return os.path.isfile(os.path.join(path, "model.safetensors.index.json"))

    def write(tmp: str) -> None:
        print(f"writing a random {shape} checkpoint ({dtype}) to {final}", flush=True)
        _write_sharded(tmp, config, _DTYPES[dtype], device)

    return ensure_dir(final, write, is_current)


# ---- measurements ------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: str, nbytes: int = 2 * 2**30) -> float:
    """Bytes/s of a large device-to-device copy (each byte read once and written once)."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    _sync(device)
    reps = 10
    t0 = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    _sync(device)
    return 2 * nbytes * reps / (time.perf_counter() - t0)


def bytes_per_token(config: dict, dtype: torch.dtype, context: int) -> int:
    """Bytes one batch-1 decode step reads: every weight but the embedding table, plus the KV cache."""
    h, inter, vocab, layers = (config[k] for k in ("hidden_size", "intermediate_size", "vocab_size", "num_hidden_layers"))
    q_rows, kv_rows = config["num_attention_heads"] * config["head_dim"], config["num_key_value_heads"] * config["head_dim"]
    per_layer = 2 * q_rows * h + 2 * kv_rows * h + 3 * h * inter + 2 * h
    weights = layers * per_layer + vocab * h + h + h  # layers, LM head, final norm, one embedding row
    kv = 2 * layers * kv_rows * context
    return (weights + kv) * torch.empty((), dtype=dtype).element_size()


def decode_rate(token_times: list[list[float]]) -> float:
    """Decode tokens/s of a batch: tokens after each request's first, over first-token-of-batch to last token."""
    start = max(times[0] for times in token_times)
    end = max(times[-1] for times in token_times)
    tokens = sum(sum(1 for t in times[1:] if t > start) for times in token_times)
    return tokens / (end - start)


def prompts_for(batch: int, prompt_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, vocab - 10, (prompt_len,), generator=g).tolist() for _ in range(batch)]


def run_raytp(path: str, device: str, dtype: str, batches: list[int], prompt_len: int,
              new_tokens: int) -> tuple[dict, dict, str, int, dict]:
    """Decode tokens/s per batch size with decode graphs (the default) and, on the same engine with them turned
    off, eagerly; the attention kernel the rank ran (its label) and how many graph replays there were."""
    from raytp.config import EngineConfig
    from raytp.engine.engine import AsyncEngine
    from raytp.cluster.executor import LocalExecutor
    from raytp.sampling import SamplingParams

    cfg = EngineConfig(model=path, device=device, dtype=dtype, tensor_parallel_size=1, max_num_seqs=max(batches),
                       max_model_len=prompt_len + new_tokens + 16,
                       max_num_batched_tokens=max(4096, max(batches) * prompt_len))
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    vocab = json.load(open(os.path.join(path, "config.json")))["vocab_size"]

    async def one_batch(engine, batch: int, tag: str) -> list[list[float]]:
        async def one(i: int, prompt: list[int]) -> list[float]:
            times = []
            async for out in engine.generate(prompt, params, f"{tag}-{i}"):
                times.extend([time.perf_counter()] * len(out.delta_token_ids))
            return times

        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts_for(batch, prompt_len, vocab))))

    async def main() -> dict:
        engine = AsyncEngine(cfg, lambda c, p, m: LocalExecutor(c, p, m))
        await engine.start()
        try:
            await one_batch(engine, 2, "warmup")
            rates = {b: decode_rate(await one_batch(engine, b, f"b{b}")) for b in batches}
            # The engine loop and the rank's step thread share the GIL: with a shorter switch interval than
            # Python's 5 ms, a thread waiting for it gets it sooner.
            interval = sys.getswitchinterval()
            sys.setswitchinterval(SHORT_SWITCH_INTERVAL_S)
            short_switch = {b: decode_rate(await one_batch(engine, b, f"switch-b{b}")) for b in batches}
            sys.setswitchinterval(interval)
            worker = engine.core.executor.worker
            replays = worker.graphs.replays if worker.graphs is not None else 0
            graph_limits = worker.graph_limits
            worker.graph_limits, worker.graphs = None, None  # the same engine, every step eager
            eager = {b: decode_rate(await one_batch(engine, b, f"eager-b{b}")) for b in batches}
            worker.graph_limits = graph_limits  # graphs again, for the rank alone
            step_ms = await asyncio.to_thread(rank_step_ms, worker, engine.core.executor.num_kv_blocks, prompt_len,
                                              vocab, min(64, cfg.max_model_len - prompt_len - 2))
            extra = {"short_switch_interval": short_switch, "rank_alone_step_ms_batch1": step_ms}
            return rates, eager, engine.core.executor.attention_backend, replays, extra
        finally:
            await engine.shutdown()

    return asyncio.run(main())


SHORT_SWITCH_INTERVAL_S = 0.0005


def rank_step_ms(worker, num_kv_blocks: int, prompt_len: int, vocab: int, steps: int = 64) -> float:
    """ms per batch-1 decode step of the rank alone (no engine loop), in the engine's last KV blocks (the engine
    runs nothing meanwhile, and nothing after this)."""
    from raytp.engine.step import PREVIOUS_TOKEN, SeqStep
    from raytp.sampling import SamplingParams

    greedy = SamplingParams(max_tokens=steps + 2, temperature=0.0, ignore_eos=True)
    needed = -(-(prompt_len + steps + 2) // worker.block_size)
    if needed > num_kv_blocks:
        raise ValueError(f"{steps} steps after a {prompt_len}-token prompt need {needed} KV blocks; there are {num_kv_blocks}")
    blocks = list(range(num_kv_blocks - needed, num_kv_blocks))
    prompt = prompts_for(1, prompt_len, vocab, seed=7)[0]
    worker.execute([SeqStep(prompt, 0, blocks, greedy, 0, "alone", prompt_len=prompt_len)])
    worker.execute([SeqStep([PREVIOUS_TOKEN], prompt_len, blocks, greedy, 1, "alone", prompt_len=prompt_len)])
    t0 = time.perf_counter()
    for i in range(steps):
        worker.execute([SeqStep([PREVIOUS_TOKEN], prompt_len + 1 + i, blocks, greedy, 2 + i, "alone",
                                prompt_len=prompt_len)])
    return (time.perf_counter() - t0) / steps * 1e3


def run_transformers(path: str, device: str, dtype: str, batches: list[int], prompt_len: int, new_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    class StepClock(BaseStreamer):
        def __init__(self):
            self.times, self.prompt_seen = [], False

        def put(self, value):
            if self.prompt_seen:
                self.times.append(time.perf_counter())
            self.prompt_seen = True

        def end(self):
            pass

    model = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[dtype]).to(device).eval()
    model.generation_config.eos_token_id = None
    vocab = model.config.vocab_size

    def generate(batch: int, n: int) -> list[float]:
        clock = StepClock()
        ids = torch.tensor(prompts_for(batch, prompt_len, vocab), device=device)
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0, streamer=clock)
        return clock.times

    generate(2, 4)  # warm-up
    out = {}
    for b in batches:
        times = generate(b, new_tokens)
        out[b] = b * (len(times) - 1) / (times[-1] - times[0])
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def measure(shape: str, device: str, dtype: str, batches: list[int], prompt_len: int, new_tokens: int,
            checkpoint_dir: str, copy_bytes: int = 2 * 2**30) -> dict:
    """Decode tokens/s of raytp and transformers per batch size, with the batch-1 roofline (the JSON this script writes)."""
    path = ensure_checkpoint(shape, dtype, checkpoint_dir, device)
    config = json.load(open(os.path.join(path, "config.json")))
    bandwidth = copy_bandwidth(device, copy_bytes)
    roofline = bandwidth / bytes_per_token(config, _DTYPES[dtype], prompt_len + new_tokens // 2)
    raytp, eager, attention, replays, extra = run_raytp(path, device, dtype, batches, prompt_len, new_tokens)
    _sync(device)
    hf = run_transformers(path, device, dtype, batches, prompt_len, new_tokens)
    result = {"device": device_name(device), "shape": shape, "dtype": dtype, "torch": torch.__version__,
              "prompt_len": prompt_len, "new_tokens": new_tokens,
              "copy_bandwidth_bytes_per_s": bandwidth, "roofline_tokens_per_s": roofline,
              "attention_backend": attention, "cuda_graphs": replays > 0, "cuda_graph_replays": replays,
              "raytp_decode_tokens_per_s": raytp, "raytp_eager_decode_tokens_per_s": eager,
              "transformers_decode_tokens_per_s": hf, **extra}
    if 1 in raytp:
        result["batch1_roofline_fraction"] = {"raytp": raytp[1] / roofline, "raytp_eager": eager[1] / roofline,
                                              "transformers": hf[1] / roofline}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(_DTYPES), default="bfloat16")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--checkpoint-dir", default=default_cache_dir())
    ap.add_argument("--copy-mib", type=int, default=2048, help="size of the copy that measures the bandwidth")
    ap.add_argument("--out-json", help="write the results here")
    args = ap.parse_args()

    r = measure(args.shape, args.device, args.dtype, args.batches, args.prompt_len, args.new_tokens, args.checkpoint_dir,
                copy_bytes=args.copy_mib * 2**20)
    raytp, hf = r["raytp_decode_tokens_per_s"], r["transformers_decode_tokens_per_s"]
    print(f"\n{args.shape}, {args.dtype}, device: {r['device']}, torch {torch.__version__}")
    print(f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens per request, greedy, no EOS")
    print(f"measured copy bandwidth {r['copy_bandwidth_bytes_per_s'] / 1e9:.0f} GB/s -> batch-1 roofline "
          f"{r['roofline_tokens_per_s']:.1f} tokens/s\n")
    eager = r["raytp_eager_decode_tokens_per_s"]
    print(f"{'batch':>5} {'raytp tok/s':>12} {'raytp eager':>12} {'transformers tok/s':>19} {'raytp / transformers':>21}")
    for b in args.batches:
        print(f"{b:>5} {raytp[b]:>12.1f} {eager[b]:>12.1f} {hf[b]:>19.1f} {raytp[b] / hf[b]:>20.2f}x")
    if "batch1_roofline_fraction" in r:
        fraction = r["batch1_roofline_fraction"]
        print(f"\nbatch 1: raytp at {fraction['raytp']:.0%} of the roofline (eager {fraction['raytp_eager']:.0%}), "
              f"transformers at {fraction['transformers']:.0%}")
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump(r, f, indent=2)


if __name__ == "__main__":
    main()
