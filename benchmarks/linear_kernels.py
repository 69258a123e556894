"""Per-op timing of the CPU linear kernels, one thread: raytp's op (linear_cpu.cpp) and oneDNN's packed GEMM, in
float32 and bfloat16, and raytp's int8 and int4 ops (quantization int8 and int4, bfloat16 x), over the weight shapes of several models
and a range of row counts.

    python benchmarks/linear_kernels.py [--rows 1,8,32,128,512] [--repeat 30]

Prints, per shape and row count, the median time of each kernel and the weight bytes read per second (what a
decode step is bound by). Every kernel runs alternately in one process, so the machine's drift hits them alike.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from raytp.model import cpu_ops
from raytp.model.layers import PackableLinear

# (model, layer, out_features, in_features) per rank at TP=1
SHAPES = [
    ("smollm2-135m", "gate/up", 1536, 576),
    ("smollm2-135m", "down", 576, 1536),
    ("smollm2-135m", "lm_head", 49152, 576),
    ("llama-0.5b", "qkv", 2560, 1536),
    ("llama-0.5b", "gate/up", 4096, 1536),
    ("llama-0.5b", "down", 1536, 4096),
]


def _layer(out_f: int, in_f: int, dtype: torch.dtype, kernel: str) -> PackableLinear:
    layer = PackableLinear(out_f, in_f, dtype)
    torch.nn.init.normal_(layer.weight, std=0.02)
    if kernel == "onednn":
        layer.use("onednn", torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), 32))
    elif kernel in ("int8", "int4"):
        if cpu_ops.linear_op(kernel) is None:
            return None
        layer.pack(kernel)
    else:
        # raytp's op even where PackableLinear.pack() would pick oneDNN (bfloat16 on a CPU with AMX)
        op = cpu_ops.linear_op({torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype])
        if op is not None:
            layer.use("raytp", op.pack(layer.weight.detach()))
    return layer if layer.kernel == kernel else None  # None: this CPU has no such kernel (e.g. no AVX512-BF16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,4,16,32,128,512")
    ap.add_argument("--repeat", type=int, default=30)
    a = ap.parse_args()
    torch.set_num_threads(1)
    rows_list = [int(r) for r in a.rows.split(",")]
    print(f"{'model':14} {'layer':8} {'N x K':>12} {'rows':>5} " + " ".join(
        f"{name:>22}" for name in ("raytp fp32", "oneDNN fp32", "raytp bf16", "oneDNN bf16", "raytp int8", "raytp int4")))
    with torch.inference_mode():
        for model, name, out_f, in_f in SHAPES:
            kernels = [(torch.float32, "raytp"), (torch.float32, "onednn"), (torch.bfloat16, "raytp"),
                       (torch.bfloat16, "onednn"), (torch.bfloat16, "int8"), (torch.bfloat16, "int4")]
            layers = [_layer(out_f, in_f, dtype, kernel) for dtype, kernel in kernels]
            for rows in rows_list:
                xs = [torch.randn(rows, in_f).to(dtype) for dtype, _ in kernels]
                times: list[list[float]] = [[] for _ in kernels]
                for _ in range(a.repeat):
                    for i, (layer, x) in enumerate(zip(layers, xs)):
                        if layer is None:
                            continue
                        t = time.perf_counter()
                        layer.matmul(x)
                        times[i].append(time.perf_counter() - t)
                cells = []
                for (dtype, kernel), ts in zip(kernels, times):
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
