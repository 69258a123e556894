"""Tensor-parallel building blocks (Megatron-style).

Every collective these layers need is called right here in `forward`, through
the Communicator handed to the layer, never in a hook. Weights are created
already sharded (each rank allocates only its part) and filled by the loader.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from raytp.cluster.comm import Communicator
from raytp.model import cpu_ops

# oneDNN's packed-weight GEMM wants a typical row count to choose its blocking; any count works.
_PACK_BATCH_HINT = 32
# The dtypes raytp's own CPU ops have kernels for (the per-token ops: both; the linear op: where this CPU has them),
# by the name cpu_ops.linear_op takes.
_OP_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


def padded_rows(rows: int) -> int:
    """The row count a packed GEMM runs at: `rows` rounded up to a bucket.

    oneDNN builds (JIT-compiles) a kernel for every new input shape, about
    0.5 ms for a small one and 10 ms for a 2,000-row one, per weight shape, so
    a step at a token count never seen before paid that 33 times (0.4 s for a
    2,000-token prefill of bench-58m). Buckets keep the set of shapes small
    (about 75 up to 4,096 rows), each built once: exact up to 32 rows (decode
    batches), then multiples of 32 up to 512, then of 128 (at most 25% padding
    where the GEMM is compute-bound).
    """
    if rows <= 32:
        return rows
    step = 32 if rows <= 512 else 128
    return -(-rows // step) * step


def row_buckets(max_rows: int) -> list[int]:
    """The row counts packed GEMMs run at for 1..max_rows rows."""
    return sorted({padded_rows(rows) for rows in range(1, max_rows + 1)})


def build_gemm_kernels(model: nn.Module, max_rows: int, max_head_rows: int) -> None:
    """Have oneDNN build the kernel of every packed GEMM a step of up to max_rows tokens (and max_head_rows
    sequences, the LM head's rows) can run: one GEMM per weight shape and row bucket (layers share kernels).

    Built on first use instead, a decode batch of a size not seen yet paid ~3 ms for its kernels (bench-58m), and
    a first burst of 32 requests meets ~40 new sizes.
    """
    kernels = {}  # (LM head?, weight shape, bias in the GEMM?) -> (a module, that bias)
    for m in model.modules():
        if isinstance(m, PackableLinear) and m.kernel == "onednn":
            bias = m.bias if isinstance(m, ColumnParallelLinear) else None  # as their forward() calls matmul
            kernels.setdefault((isinstance(m, ParallelLMHead), tuple(m.weight.shape), bias is not None), (m, bias))
    with torch.inference_mode():
        for (is_head, (_, in_features), _), (m, bias) in kernels.items():
            for rows in row_buckets(max_head_rows if is_head else max_rows):
                m.matmul(m.weight.new_zeros(rows, in_features), bias)  # the GEMM alone: no collective


@functools.lru_cache(maxsize=1)
def amx_computes_bf16() -> bool:
    """Whether this CPU has AMX tiles for bfloat16 and oneDNN can use them. There raytp's op computes bfloat16 on the
    tiles too, and faster for a decode step's rows (linear_cpu.cpp); where it cannot (PackableLinear._onednn_is_faster)
    oneDNN's GEMM is 1.8-6.5x faster than raytp's AVX512-BF16 kernel from 8 rows up (benchmarks/linear_kernels.py)."""
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()) and onednn_linear_available(torch.bfloat16)


# float32 from this many rows (prompt chunks) on a CPU where mkl_sgemm_is_fast: MKL's GEMM on the weight as loaded,
# 6-16% faster than raytp's op from 160 rows up, level at 96-128, slower below (smollm2, 87m and 0.5b shapes, one
# thread, Xeon with AMX, 2026-12-05); raytp's op keeps the decode steps' rows, where it reads the weight faster.
SGEMM_FROM_ROWS = 160


@functools.lru_cache(maxsize=None)
def mkl_sgemm_is_fast() -> bool:
    """Whether torch's float32 GEMM is MKL's on an Intel CPU; on AMD CPUs MKL takes a slow generic path."""
    if not torch.backends.mkl.is_available():
        return False
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("vendor_id") and "GenuineIntel" in line for line in f)
    except OSError:
        return False


def onednn_linear_available(dtype: torch.dtype) -> bool:
    """Whether this torch can run CPU linears through oneDNN with packed weights in `dtype`."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


class DirectCall(nn.Module):
    """A module whose call is its forward, without nn.Module.__call__'s machinery (hooks, tracing and compile
    checks) that raytp never uses: a decode step calls ~7 modules a layer, and under cProfile that machinery was
    ~0.4 ms of a 30-layer SmolLM2 int4 step on CPU (~10 ms)."""

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)


class PackableLinear(DirectCall):
    """A linear layer's weight (out, in), optionally repacked once for a faster CPU kernel.

    On CPUs torch's F.linear calls MKL's sgemm, which on AMD CPUs takes a slow
    generic path. In float32 on a CPU with AVX-512, and in bfloat16 (an even
    number of input features) on one with AVX512-BF16, raytp's own op
    (linear_cpu.cpp) streams a weight packed in 16-column blocks: as fast as
    oneDNN from 64 rows up and up to 1.8x faster for the few rows of a decode
    step, where oneDNN reads the weight at half the memory's speed
    (benchmarks/README.md; measured on an EPYC without AMX). On a CPU with AMX
    tiles raytp's op computes bfloat16 on them, 1.25-1.6x oneDNN's speed from 1
    to 32 rows, 0.76-1.19x at 256 (measured on a Xeon); a weight it cannot take
    there goes to oneDNN (_onednn_is_faster). float32 prompt chunks of SGEMM_FROM_ROWS rows
    and more go to MKL's GEMM on the weight as loaded, where it is the faster
    (Intel CPUs). Elsewhere oneDNN's inner product with the
    weight packed ahead of time, and for float16 torch's F.linear. `pack()`
    is called after the weights are loaded; the original weight stays (the
    loader, tied embeddings and tests read it).
    """

    def __init__(self, out_features: int, in_features: int, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.packed: torch.Tensor | None = None
        self.scales: torch.Tensor | None = None  # int8: the weight's column scales; int4: its groups' steps and minimums
        self.kernel = "torch"  # which packing `packed` holds: "raytp", "int8", "int4", "onednn", or none ("torch")
        self._raytp_call = None  # x -> x W^T through raytp's op, bound by use() for the packing it holds

    def use(self, kernel: str, packed: torch.Tensor | None, scales: torch.Tensor | None = None) -> None:
        """Compute with `packed` (and `scales`), packed for `kernel`. raytp's op is bound here, once, instead of being
        looked up in each of a decode step's ~120 linear calls (under cProfile, matmul's own Python was ~0.3 ms of a
        ~10 ms SmolLM2 int4 step)."""
        self.kernel, self.packed, self.scales = kernel, packed, scales
        N = self.weight.shape[0]
        if kernel == "raytp":
            linear = self._op().linear
            if self.weight.dtype == torch.float32 and mkl_sgemm_is_fast():
                weight = self.weight  # kept beside the packing (see the class)
                self._raytp_call = lambda x: linear(x, packed, N) if x.shape[0] < SGEMM_FROM_ROWS else F.linear(x, weight)
            else:
                self._raytp_call = lambda x: linear(x, packed, N)
        elif kernel in QUANTIZED_KERNELS:
            linear = getattr(_quantized_op(kernel), f"linear_{kernel}")  # raises where this CPU has no such kernel
            self._raytp_call = lambda x: linear(x, packed, scales, N)
        else:
            self._raytp_call = None

    def pack(self, quantization: str = "none") -> None:
        """Pack the loaded weight for the fastest kernel here; quantization "int8" or "int4": quantized for raytp's
        op of that name (CPUs with AVX512-VNNI; a layer whose input width is not a multiple of 32 keeps its dtype)."""
        if self.weight.device.type != "cpu":
            return
        if quantization in QUANTIZED_KERNELS and self.weight.shape[1] % 32 == 0:
            self.use(quantization, *getattr(_quantized_op(quantization), f"pack_{quantization}")(self.weight.detach()))
            return
        op = None if self._onednn_is_faster() else self._op()
        if op is not None:
            # float32: (ceil(out / 16), in, 16); bfloat16: (ceil(out / 16), in / 2, 32)
            self.use("raytp", op.pack(self.weight.detach()))
        elif onednn_linear_available(self.weight.dtype):
            self.use("onednn", torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), _PACK_BATCH_HINT))

    def _op(self):
        """raytp's linear op for this weight, or None: not built here, no kernel for the dtype on this CPU, or (the
        bfloat16 kernel takes k in pairs) an odd number of input features."""
        if self.weight.dtype == torch.bfloat16 and self.weight.shape[1] % 2:
            return None
        return cpu_ops.linear_op(_OP_DTYPES.get(self.weight.dtype, ""))

    def _onednn_is_faster(self) -> bool:
        """bfloat16 on a CPU with AMX tiles (amx_computes_bf16) where raytp's op cannot use them for this weight (an
        input width not a multiple of 32, or the op built or run without them): oneDNN's GEMM does."""
        if self.weight.dtype != torch.bfloat16 or not amx_computes_bf16():
            return False
        op = self._op()
        return op is None or not op.amx() or self.weight.shape[1] % 32 != 0

    def adopt(self, kernel: str, packed: torch.Tensor, scales: torch.Tensor | None = None) -> None:
        """Compute with a weight packed for raytp's op `kernel` in another process (a lost rank's shard; `scales`
        with a quantized one); where this process has no kernel for a float one, pack again for whatever it has."""
        if kernel in QUANTIZED_KERNELS:
            self.use(kernel, packed, scales)
        elif self._op() is None or self._onednn_is_faster():
            self.pack()
        else:
            self.use("raytp", packed)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        # x: (T, in) -> (T, out)
        if self._raytp_call is not None:  # raytp's op: float32, bfloat16, int8 or int4 weights
            y = self._raytp_call(x)
            return y if bias is None else y + bias
        if self.kernel == "torch":
            return F.linear(x, self.weight, bias)
        rows = x.shape[0]
        padded = padded_rows(rows)
        if padded != rows:
            x = torch.cat([x, x.new_zeros(padded - rows, x.shape[1])])  # (padded, in); extra rows dropped below
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")[:rows]


# The quantized weights raytp's linear op computes with (`quantization` in the config).
QUANTIZED_KERNELS = ("int8", "int4")


def _quantized_op(kernel: str):
    """raytp's linear op for int8 or int4 weights; RuntimeError where this CPU has none (check_quantization refuses
    such a config before any rank starts)."""
    op = cpu_ops.linear_op(kernel)
    if op is None:
        raise RuntimeError(f"quantization {kernel}: {cpu_ops.QUANTIZED_NEEDS}")
    return op


class ColumnParallelLinear(PackableLinear):
    """Y = X A with A split by columns, A = [A_0 | A_1 | ... | A_{p-1}].

    Rank r holds A_r (out_features / p columns; stored as nn.Linear's
    (out, in) weight rows) and computes Y_r = X A_r + b_r. No communication:
    the output stays sharded along its last dimension, ready for a
    RowParallelLinear.
    """

    def __init__(self, in_features: int, out_features_per_rank: int, bias: bool, dtype: torch.dtype):
        super().__init__(out_features_per_rank, in_features, dtype)
        self.bias = nn.Parameter(torch.zeros(out_features_per_rank, dtype=dtype), requires_grad=False) if bias else None
        self._fused_silu_mul = None  # silu_mul() in one pass of raytp's op, bound by use() where it can

    def use(self, kernel: str, packed: torch.Tensor | None, scales: torch.Tensor | None = None) -> None:
        super().use(kernel, packed, scales)
        self._fused_silu_mul = None
        N, K = self.weight.shape
        if (kernel == "raytp" and self.weight.dtype == torch.bfloat16 and self.bias is None and K % 32 == 0
                and N % 32 == 0 and (op := self._op()).amx()):
            fused = op.linear_silu_mul
            self._fused_silu_mul = lambda x: fused(x, packed, N)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (T, in) -> (T, out / p)
        return self.matmul(x, self.bias)

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        """An MLP's gate and up projections (this rank's gate rows, then its up rows): x (T, in) -> silu(gate) * up
        (T, out / 2p). In one pass of raytp's op where it holds the weight on AMX tiles (bfloat16, no bias, out / 2p
        a multiple of 16), which never writes the (T, out / p) product (a 256-token SmolLM2 prefill step spent 10%
        in silu_mul, reading and writing it); else the product, then silu_mul."""
        if self._fused_silu_mul is not None:
            return self._fused_silu_mul(x)
        return silu_mul(self.forward(x))


class RowParallelLinear(PackableLinear):
    """Y = X A with A split by rows and X split by columns (as a column-parallel layer leaves it).

    Rank r holds A_r (in_features / p rows of A) and computes the partial
    product X_r A_r; Y = sum_r X_r A_r is one all-reduce. The bias is added
    once, after the sum.
    """

    def __init__(self, in_features_per_rank: int, out_features: int, bias: bool, dtype: torch.dtype, comm: Communicator):
        super().__init__(out_features, in_features_per_rank, dtype)
        self.comm = comm
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (T, in / p) -> partial (T, out) -> all-reduce -> (T, out)
        y = self.matmul(x)
        if self.comm.world_size > 1:
            y = self.comm.all_reduce(y)
        if self.bias is not None:
            y = y + self.bias
        return y


def padded_vocab_size(vocab_size: int, world_size: int) -> int:
    """The vocabulary padded up to a multiple of the TP degree, so every rank holds the same number of rows."""
    return math.ceil(vocab_size / world_size) * world_size


def vocab_rows_per_rank(vocab_size: int, world_size: int) -> int:
    """Rows of the vocabulary (embedding, LM head) each rank holds: the padded vocabulary split evenly."""
    return padded_vocab_size(vocab_size, world_size) // world_size


class VocabParallelEmbedding(DirectCall):
    """Embedding table split by vocabulary rows: rank r holds ids [r*V/p, (r+1)*V/p).

    Each rank looks up the ids it owns (zeros for the others); one all-reduce
    sums the partial embeddings into the full one on every rank.
    """

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype, comm: Communicator):
        super().__init__()
        self.comm = comm
        self.vocab_size = vocab_size
        self.rows_per_rank = vocab_rows_per_rank(vocab_size, comm.world_size)
        self.vocab_start = comm.rank * self.rows_per_rank
        # Padding rows (past vocab_size) stay zero: no id ever selects them.
        self.weight = nn.Parameter(torch.zeros(self.rows_per_rank, hidden_size, dtype=dtype), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: (T,) -> (T, hidden)
        if self.comm.world_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.rows_per_rank)
        emb = F.embedding(local.masked_fill(outside, 0), self.weight)
        emb = emb.masked_fill(outside.unsqueeze(-1), 0)
        return self.comm.all_reduce(emb)


class ParallelLMHead(PackableLinear):
    """Output projection split by vocabulary rows, like VocabParallelEmbedding.

    Each rank computes the logits of its vocabulary slice; one all-gather
    concatenates them on every rank, and every rank samples the same tokens
    from them (each feeds its own samples into the next step). With tied
    embeddings the weight is the embedding's.
    """

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype, comm: Communicator,
                 tied_to: VocabParallelEmbedding | None = None):
        super().__init__(vocab_rows_per_rank(vocab_size, comm.world_size), hidden_size, dtype)
        self.comm = comm
        self.vocab_size = vocab_size
        if tied_to is not None:
            self.weight = tied_to.weight
        else:
            nn.init.zeros_(self.weight)  # padding rows (past vocab_size) stay zero

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: (N, hidden) -> local logits (N, V_pad / p) -> gathered (N, V_pad) -> (N, V)
        logits = self.matmul(hidden)
        logits = self.comm.all_gather(logits, dim=-1)
        return logits[:, : self.vocab_size]


class RMSNorm(DirectCall):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (T, hidden) -> (T, hidden)
        if (op := rowwise_op(x)) is not None:
            return op.rms_norm(x, self.weight, self.eps)  # one pass a row (rowwise_cpu.cpp), the roundings below
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Normalize in float32 (as the reference does), scale in the model dtype.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def add_and_norm(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual add and this norm: (x + h, norm(x + h)); x: (T, hidden) is updated in place on CPU."""
        if (op := rowwise_op(x)) is not None and x.is_contiguous() and h.is_contiguous():
            return x, op.add_rms_norm_(x, h, self.weight, self.eps)
        x = x + h
        return x, self(x)


def rowwise_op(x: torch.Tensor):
    """raytp's per-token CPU ops (rowwise_cpu.cpp) where they serve x: a CPU tensor of a dtype they have, and built."""
    return cpu_ops.rowwise_op() if x.is_cpu and x.dtype in _OP_DTYPES else None  # is_cpu: no device object made


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: (T, 2 I), gate then up -> silu(gate) * up (T, I)."""
    if (op := rowwise_op(gate_up)) is not None and gate_up.is_contiguous():
        return op.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope_inv_freq(head_dim: int, rope: dict) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,) for rope_type default, linear or llama3."""
    theta = float(rope.get("rope_theta", 10000.0))
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(rope["factor"])
    if kind == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept,
        # and the band in between interpolated smoothly.
        factor = float(rope["factor"])
        low, high = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
        old_len = float(rope["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_type {kind!r} (supported: default, linear, llama3)")


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, rope: dict):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, rope), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: (T,) -> cos, sin: (T, head_dim), computed in float32
        freqs = positions.float().unsqueeze(-1) * self.inv_freq.unsqueeze(0)  # (T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, D)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (T, H, D), cos/sin: (T, D); rotate-half convention of Hugging Face Llama checkpoints."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)
