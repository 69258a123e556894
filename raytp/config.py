"""Typed, validated configuration.

`EngineConfig` is what one replica (one TP group plus its engine) needs. It is
the `args` of the Serve application (`raytp.serve.app:build_app`), the options
of `raytp serve` and the keyword arguments of `LLM(...)`. A bad value raises a
`ConfigError` that names the field and the value.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and value."""


def format_validation_error(err: ValidationError, what: str) -> str:
    parts = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(root)"
        value = e.get("input")
        parts.append(f"{field}={value!r}: {e['msg']}")
    return f"invalid {what}: " + "; ".join(parts)


class EngineConfig(BaseModel):
    """One replica: a model served by one tensor-parallel group."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="Local Hugging Face checkpoint directory, or 'tiny' for the built-in demo model.")
    served_model_name: str | None = Field(
        default=None, description="Name clients use in the `model` field; defaults to 'tiny' or the directory's name."
    )
    tensor_parallel_size: int = Field(default=1, ge=1, le=64, description="Number of TP ranks (one worker each).")
    min_tensor_parallel_size: int = Field(
        default=1, ge=1, le=64, description="Smallest TP degree the group may shrink to when the old size cannot be placed."
    )
    pipeline_parallel_size: int = Field(
        default=1, ge=1, le=64, description="Pipeline stages of a replica, each a TP group of tensor_parallel_size "
        "ranks on one node computing a contiguous share of the layers (the first also the embedding, the last the "
        "LM head); the residual stream goes from stage to stage over the network (TCP on CPU, NCCL on GPU). "
        "For models that do not fit one node."
    )
    pipeline_partition: list[int] | None = Field(
        default=None, description="Decoder layers of each pipeline stage, first to last (e.g. 10 6); must sum to the "
        "model's layers. Default: the split that makes the costliest stage cheapest, by the weights a decode step "
        "reads (the last stage's LM head included)."
    )
    pipeline_placement: Literal["spread", "pack"] = Field(
        default="spread", description="Pipeline stages on different nodes where the cluster has them (spread) or on "
        "as few nodes as possible (pack). A stage's ranks are always on one node."
    )
    pipeline_steps_in_flight: int | None = Field(
        default=None, ge=1, le=64, description="Steps a pipeline runs at once, so that every stage has work: the "
        "running sequences are split into min(stages, this) micro-batches of their own, and each micro-batch's next "
        "step may be queued at the first stage before its previous one's tokens are back (the last stage sends them "
        "there directly). Default: 2 x pipeline_parallel_size; 1: one step at a time."
    )
    device: Literal["cpu", "cuda", "auto"] = Field(default="auto", description="cpu (gloo), cuda (NCCL) or auto.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="Weights and activations dtype. auto follows the checkpoint: on CPU bfloat16 for a "
        "bfloat16 or float16 checkpoint (and a quantized GGUF) where the CPU computes bfloat16 natively (AVX512-BF16 "
        "or AMX), else float32; on CUDA float16 for a float16 checkpoint, else bfloat16."
    )
    quantization: Literal["none", "int8", "int4"] = Field(
        default="none", description="int8: linear weights quantized per output column and activations per 32 "
        "values, multiplied with AVX512-VNNI (CPU only; needs AVX512-VNNI and AVX512-BF16): ~1.6x the linears' speed "
        "of bfloat16 in a decode step, at a small cost in accuracy (README). int4: the weights in 4 bits per column "
        "and group of 32 values as llama.cpp's Q4_1 (5 bits a weight), the same CPUs: a decode step's linears read "
        "0.6 of int8's bytes, at a larger cost in accuracy."
    )
    max_num_seqs: int = Field(default=32, ge=1, le=4096, description="Most sequences in one batch.")
    max_model_len: int | None = Field(
        default=None, ge=2, description="Longest prompt plus output; defaults to the checkpoint's max_position_embeddings."
    )
    max_num_batched_tokens: int | None = Field(
        default=None, ge=16, description="Most tokens computed in one step (decode rows first, then prompt chunks: a "
        "longer prompt is prefilled over several steps; a chunk's tokens count more the longer the context they "
        "attend to, by the attention's share of the model's FLOPs). Default: 256 on CPU (in-process on the 32-request burst, "
        "against 512: the same throughput, TTFT p50 no worse, half the p99 inter-token gap; benchmarks/README.md), "
        "4096 on CUDA."
    )
    enable_prefix_caching: bool = Field(
        default=True, description="Share the KV blocks of a prompt prefix already computed (by any request, kept until "
        "evicted least recently used) instead of computing it again."
    )
    block_size: int | None = Field(
        default=None, ge=1, le=1024, description="Tokens per KV-cache block (and the unit of prefix sharing). Default: "
        "16, and 256 on CUDA where torch's flash attention reads the paged cache in place (FA2 takes pages of a "
        "multiple of 256 tokens only; another size on CUDA runs flash attention over keys gathered per layer, slower)."
    )
    num_kv_blocks: int | None = Field(
        default=None, ge=1, description="KV-cache blocks per rank; default sized from max_num_seqs and max_model_len (CPU) "
        "or from gpu_memory_utilization less the measured peak of the largest step (CUDA)."
    )
    gpu_memory_utilization: float = Field(
        default=0.85, gt=0.0, le=1.0, description="Fraction of each GPU's memory a rank may use in all: weights, the "
        "largest step's activations, NCCL's buffers and, with what is left, the KV cache."
    )
    seed: int = Field(default=0, description="Seed for unseeded sampling.")
    placement_timeout_s: float = Field(default=30.0, gt=0, description="How long to wait for the placement group.")
    step_timeout_s: float = Field(
        default=60.0, gt=0, description="The longest a step may run in any case; also the watchdog's limit for a step "
        "size not measured yet (hang_detection_multiple sets it for the others)."
    )
    hang_detection_multiple: float = Field(
        default=5.0, ge=1.0, description="A step that runs this many times longer than the slowest recent step of its "
        "size (at least hang_detection_floor_s) makes the engine ping the ranks: one that does not answer is hung "
        "and replaced like a dead one; if all answer, the step is slow and is waited on."
    )
    hang_detection_floor_s: float = Field(
        default=1.0, gt=0, description="The least time a step runs before the ranks are asked whether one hangs."
    )
    num_spare_ranks: int = Field(
        default=1, ge=0, le=64, description="Warm spare rank processes per replica, per pipeline stage (CPU, more "
        "than one rank in all): one takes a dead or hung rank's place, its shard and KV cache, while the other ranks "
        "keep theirs (where no spare is up, a new rank process is started in the lost rank's place and maps them); "
        "0: every failure rebuilds the whole group."
    )
    gpu_host_copies: bool = Field(
        default=False, description="GPU, TP > 1: keep host copies of each rank's weight shard (written once) and KV "
        "cache (updated after every step) in /dev/shm, so that a lost rank is started again in its place from them "
        "while the other ranks keep their processes, weights and KV caches, and only the steps in flight are "
        "recomputed; off: a lost GPU rank rebuilds the group (every running request recomputed). Host memory: the "
        "GPUs' weights plus their KV caches. (CPU ranks keep both in /dev/shm with num_spare_ranks > 0.)"
    )
    max_recoveries: int = Field(
        default=5, ge=1, description="Recoveries allowed within recovery_window_s; one more fails the requests that "
        "were in every failed step (the likely cause) with an error, and the rest are served on (failures with no "
        "request in common go on being mended)."
    )
    recovery_window_s: float = Field(default=120.0, gt=0, description="The window max_recoveries counts in.")
    init_timeout_s: float = Field(default=120.0, gt=0, description="How long workers may take to start, connect and load weights.")
    require_nvlink: bool = Field(default=False, description="Refuse (instead of warn) when the GPUs are not all NVLink-connected.")
    cpus_per_rank: float = Field(
        default=1, gt=0, le=256, description="CPUs reserved for each rank's bundle; on CPU also its torch threads. "
        "A fraction (e.g. 0.5) lets more ranks than cores share them, one thread each and unpinned: TP=3 on a "
        "2-core machine, at the price of ranks waiting for a core in every collective."
    )
    attention_backend: Literal["auto", "reference", "cpu", "cuda"] = Field(
        default="auto", description="Paged attention: auto picks the compiled kernel of the device (the C++ op on CPU, "
        "flash attention 2 on CUDA) and falls back to reference (padded SDPA, slow) where it cannot run, logged as an "
        "error and shown in the raytp_attention_backend metric; a backend named here that cannot run is a start-up error."
    )
    expert_parallel: bool = Field(
        default=False, description="Mixture-of-experts models (Mixtral, Qwen3-MoE, OLMoE): place whole experts on the ranks "
        "(tensor_parallel_size must divide the number of experts) instead of a slice of every expert on every rank "
        "(the default). Both give the same tokens, with one all-reduce per layer either way."
    )
    cuda_graphs: bool = Field(
        default=True, description="CUDA: decode steps replay CUDA graphs captured per padded batch size (at most "
        "256 sequences) instead of launching every kernel from Python; false runs every step eagerly."
    )
    pack_weights: bool = Field(
        default=True, description="Repack linear weights on CPU for raytp's float32 op (AVX-512) or oneDNN, 2-2.5x faster than plain "
        "F.linear; false: plain F.linear."
    )
    cpu_binding: bool = Field(
        default=True, description="CPU ranks: pin each rank to cpus_per_rank cores of its own (and `raytp serve` keeps "
        "Ray's other processes off them), so that the proxy and replica do not preempt the model; where the ranks "
        "leave cores for the rest and may (root or CAP_SYS_NICE), their compute threads also run at nice -10."
    )
    cpu_collectives: Literal["shm", "gloo"] = Field(
        default="shm", description="CPU ranks: shared-memory all-reduce/all-gather (shm) or gloo over loopback for everything."
    )
    # HTTP guards of the OpenAI API (raytp.serve); the offline LLM ignores them.
    api_key: str | None = Field(
        default=None, min_length=1, repr=False,
        description="Clients must send `Authorization: Bearer <api_key>` to /v1/*, /tokenize and /detokenize "
        "(401 otherwise); /health stays open.",
    )
    max_queued_requests: int | None = Field(
        default=None, ge=0, description="Requests a replica holds beyond its running batch (max_num_seqs): past "
        "max_num_seqs + this many unfinished requests (each choice of each prompt counts), a new one gets 429 with "
        "Retry-After. Default: no limit.",
    )
    cors_allow_origins: list[str] = Field(
        default_factory=list, description="Origins browsers may call the API from (CORS), e.g. "
        "https://app.example.com, or * for any; none: no CORS headers.",
    )

    @model_validator(mode="after")
    def _check(self) -> "EngineConfig":
        if self.cpus_per_rank > 1 and self.cpus_per_rank != int(self.cpus_per_rank):
            raise ValueError(f"cpus_per_rank={self.cpus_per_rank:g}: must be a whole number of CPUs, or a fraction "
                             f"below 1 (ranks that share cores)")
        if self.quantization != "none" and (self.device == "cuda" or not self.pack_weights):
            raise ValueError(f"quantization={self.quantization!r} runs in raytp's CPU linear op: it needs device cpu "
                             f"or auto (not {self.device!r}) and pack_weights true (not {self.pack_weights})")
        if self.pipeline_partition is not None and len(self.pipeline_partition) != self.pipeline_parallel_size:
            raise ValueError(f"pipeline_partition={self.pipeline_partition} has {len(self.pipeline_partition)} stages "
                             f"where pipeline_parallel_size={self.pipeline_parallel_size}")
        if self.min_tensor_parallel_size > self.tensor_parallel_size:
            raise ValueError(
                f"min_tensor_parallel_size={self.min_tensor_parallel_size} is larger than "
                f"tensor_parallel_size={self.tensor_parallel_size}"
            )
        return self

    @classmethod
    def parse(cls, data: dict[str, Any]) -> "EngineConfig":
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise ConfigError(format_validation_error(err, "raytp config")) from None

    def steps_in_flight(self) -> int:
        """Steps the engine keeps in flight: a pipeline's pipeline_steps_in_flight, else two (the next step goes out
        before the current one's tokens are back: see engine.py)."""
        if self.pipeline_parallel_size > 1:
            return self.pipeline_steps_in_flight or 2 * self.pipeline_parallel_size
        return 2

    def micro_batches(self) -> int:
        """Groups of disjoint running sequences whose steps take turns (a pipeline's stages each work on one);
        one for a single stage, whose steps in flight overlap on the same sequences."""
        if self.pipeline_parallel_size > 1:
            return min(self.pipeline_parallel_size, self.steps_in_flight())
        return 1

    def steps_remembered(self) -> int:
        """Steps after which a rank still knows the token it sampled for a sequence, and a penalized one's tokens so
        far (step.py): in a pipeline a micro-batch's next step follows its previous one by up to the steps in
        flight; a single stage's follows at once."""
        return self.steps_in_flight() if self.pipeline_parallel_size > 1 else 1

    def resolved_max_num_batched_tokens(self) -> int:
        if self.max_num_batched_tokens is not None:
            return self.max_num_batched_tokens
        return 256 if self.resolved_device() == "cpu" else 4096

    def resolved_block_size(self) -> int:
        if self.block_size is not None:
            return self.block_size
        if self.resolved_device() == "cuda" and self.attention_backend in ("auto", "cuda"):
            from raytp.model.attention.cuda import PAGE_MULTIPLE, paged_varlen_attn

            if paged_varlen_attn() is not None:
                return PAGE_MULTIPLE
        return 16

    def rank_threads(self) -> int:
        """Torch threads of a CPU rank: its whole CPUs, and one for a rank that shares a core."""
        return max(1, int(self.cpus_per_rank))

    def binds_cores(self) -> bool:
        """Whether CPU ranks are pinned to cores of their own (not when they share cores)."""
        return self.cpu_binding and self.cpus_per_rank >= 1

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_dtype(self, checkpoint_dtype: str | None = None) -> str:
        """The dtype to serve in: `dtype`, or for auto the checkpoint's own (`checkpoint_dtype`, its config's
        torch_dtype) where this device computes it fast. On CPU that is bfloat16 only where the CPU has
        AVX512-BF16 or AMX (raytp's linear op and attention read bfloat16 there at half float32's bytes, and
        elsewhere bfloat16 is emulated and slower than float32); a float16 checkpoint runs in bfloat16 there too
        (CPUs rarely have float16 arithmetic; vLLM's CPU build does the same). Chosen in the replica's process,
        for the ranks' node: both are expected to have the same kind of CPU."""
        if self.dtype != "auto":
            return self.dtype
        if self.resolved_device() == "cuda":
            return "float16" if checkpoint_dtype == "float16" else "bfloat16"
        if checkpoint_dtype in ("bfloat16", "float16") and cpu_computes_bf16():
            return "bfloat16"
        return "float32"

    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        import os

        return os.path.basename(os.path.normpath(self.model))


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bfloat16 arithmetic (AVX512-BF16 or AMX tiles)."""
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
