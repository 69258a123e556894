"""Per-op timing of the CPU linear kernels, one thread: raytp's op (linear_cpu.cpp) and oneDNN's packed GEMM, in
float32 and bfloat16 (raytp's on AMX tiles where the CPU has them, and its AVX512-BF16 kernel), and raytp's int8 and
int4 ops (quantization int8 and int4, bfloat16 x), over the weight shapes of several models and a range of row counts;
for an MLP's gate and up projections also silu(gate) * up after the AMX product and in the same pass.

    python benchmarks/linear_kernels.py [--rows 1,8,32,128,512] [--repeat 30] [--copies 1]

Prints, per shape and row count, the median time of each kernel and the weight bytes read per second (what a
decode step is bound by). Every kernel runs alternately in one process, so the machine's drift hits them alike.
--copies N: N copies of each weight, called in turn, so that each call reads its weight from beyond L2 as a model's
layers do (1: the same weight again, from cache for the small ones).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from raytp.model import cpu_ops
from raytp.model.layers import PackableLinear, silu_mul

# (model, layer, out_features, in_features) per rank at TP=1
SHAPES = [
    ("smollm2-135m", "gate/up", 1536, 576),
    ("smollm2-135m", "down", 576, 1536),
    ("smollm2-135m", "lm_head", 49152, 576),
    ("llama-0.5b", "qkv", 2560, 1536),
    ("llama-0.5b", "gate/up", 4096, 1536),
    ("llama-0.5b", "down", 1536, 4096),
]


KERNELS = [(torch.float32, "raytp"), (torch.float32, "onednn"), (torch.bfloat16, "raytp-amx"),
           (torch.bfloat16, "raytp"), (torch.bfloat16, "onednn"), (torch.bfloat16, "int8"), (torch.bfloat16, "int4"),
           (torch.bfloat16, "amx+silu"), (torch.bfloat16, "amx-silu-fused")]
NAMES = ["raytp fp32", "oneDNN fp32", "raytp bf16 AMX", "raytp bf16", "oneDNN bf16", "raytp int8", "raytp int4",
         "AMX, then SiLU x up", "AMX with SiLU x up"]
# The last two only for an MLP's gate and up projections (layer "gate/up"): the product then raytp's silu_mul op, and
# the two in one pass (linear_silu_mul); their GB/s counts the weight only, as the others'.


def _kernel(out_f: int, in_f: int, dtype: torch.dtype, kernel: str, layer_name: str):
    """x -> x W^T through `kernel` for a random weight, or None where this CPU has no such kernel. "raytp": raytp's
    float32 or AVX512-BF16 kernel (even where PackableLinear.pack() would pick another); "raytp-amx": its bfloat16
    kernel on AMX tiles; "amx+silu" / "amx-silu-fused": x -> silu(gate) * up for a gate/up weight (see NAMES)."""
    if kernel.startswith("amx") and layer_name != "gate/up":
        return None
    layer = PackableLinear(out_f, in_f, dtype)
    torch.nn.init.normal_(layer.weight, std=0.02)
    if kernel == "onednn":
        layer.use("onednn", torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), 32))
        return layer.matmul
    if kernel in ("int8", "int4"):
        if cpu_ops.linear_op(kernel) is None:
            return None
        layer.pack(kernel)
        return layer.matmul
    op = cpu_ops.linear_op({torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype])
    if op is None or (kernel != "raytp" and not op.amx()):
        return None
    packed = op.pack(layer.weight.detach())
    if kernel == "amx-silu-fused":
        return lambda x: op.linear_silu_mul(x, packed, out_f)
    if kernel == "amx+silu":
        return lambda x: silu_mul(op.linear(x, packed, out_f, amx=True))
    amx = kernel == "raytp-amx"
    return lambda x: op.linear(x, packed, out_f, amx=amx)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,4,16,32,128,512")
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--copies", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(1)
    rows_list = [int(r) for r in a.rows.split(",")]
    print(f"{'model':14} {'layer':8} {'N x K':>12} {'rows':>5} " + " ".join(f"{name:>22}" for name in NAMES))
    with torch.inference_mode():
        for model, name, out_f, in_f in SHAPES:
            # per kernel: its copies of the weight, or [] where this CPU has no such kernel
            calls = [[c for c in (_kernel(out_f, in_f, dtype, kernel, name) for _ in range(a.copies)) if c is not None]
                     for dtype, kernel in KERNELS]
            for rows in rows_list:
                xs = [torch.randn(rows, in_f).to(dtype) for dtype, _ in KERNELS]
                times: list[list[float]] = [[] for _ in KERNELS]
                for _ in range(a.repeat):
                    for i, (copies, x) in enumerate(zip(calls, xs)):
                        if not copies:
                            continue
                        t = time.perf_counter()
                        for call in copies:
                            call(x)
                        times[i].append((time.perf_counter() - t) / len(copies))
                cells = []
                for (dtype, kernel), ts in zip(KERNELS, times):
                    if not ts:
                        cells.append("n/a")
                        continue
                    med = statistics.median(ts)
                    # int4: 4 bits and a float16 step and minimum per 32 weights
                    weight_bits = {"int8": 8, "int4": 5}.get(kernel) or torch.finfo(dtype).bits
                    gbs = out_f * in_f * weight_bits / 8 / med / 1e9
                    cells.append(f"{med * 1e3:8.3f} ms {gbs:5.1f} GB/s")
                print(f"{model:14} {name:8} {f'{out_f}x{in_f}':>12} {rows:5d} " + " ".join(f"{c:>22}" for c in cells))


if __name__ == "__main__":
    main()
