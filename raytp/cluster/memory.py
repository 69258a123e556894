"""GPU memory for the KV cache: what is left of gpu_memory_utilization x total at the peak of the largest step.

Free memory right after loading the weights is not that: the largest step
(max_num_batched_tokens tokens over max_num_seqs sequences) allocates
activations, cuBLAS allocates its workspace at its first GEMM, and NCCL its
buffers at the first collective. So a rank warms NCCL up, runs that step
with the features that cost the most memory (top-p's sort of the vocabulary,
sampled and prompt logprobs), and reads the numbers below (as vLLM and
SGLang size their caches).
"""
from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class MemoryProfile:
    """One GPU, read after the profile step with torch's cache emptied (bytes)."""

    total: int  # the device's memory
    used: int  # total - free: torch's reserve plus what torch does not allocate (CUDA context, NCCL, other processes)
    reserved: int  # torch's caching allocator's share of `used`
    peak_reserved: int  # torch's caching allocator at the step's peak (weights, activations, cuBLAS workspace), no KV cache
    graph_pool: int = 0  # what the decode CUDA graphs hold besides (their static buffers and memory pool)

    @property
    def peak(self) -> int:
        """What the rank needs besides its KV cache: torch's peak plus all that torch does not allocate."""
        return self.peak_reserved + self.graph_pool + (self.used - self.reserved)

    def kv_cache_bytes(self, gpu_memory_utilization: float) -> int:
        """gpu_memory_utilization x total - peak, never below 0."""
        return max(0, int(gpu_memory_utilization * self.total) - self.peak)

    def describe(self, gpu_memory_utilization: float) -> str:
        return (f"gpu_memory_utilization={gpu_memory_utilization:g} x {self.total / GIB:.1f} GiB - peak "
                f"{self.peak / GIB:.2f} GiB (torch {self.peak_reserved / GIB:.2f} GiB, CUDA graphs {self.graph_pool / GIB:.2f} GiB, CUDA context, NCCL and other "
                f"processes {(self.used - self.reserved) / GIB:.2f} GiB) = "
                f"{self.kv_cache_bytes(gpu_memory_utilization) / GIB:.2f} GiB for the KV cache")
