"""The CPU attention backend: a small C++ op that reads the block KV cache in place.

No library offers variable-length paged attention on the CPU for plain torch
(SDPA needs the keys gathered into padded batches, FlexAttention needs
torch.compile per shape), so paged_attention_cpu.cpp does it in about a hundred
lines: one call per layer for all of a step's sequences, prefill chunks and
decode rows together, GQA and sliding windows included. It is built once per
machine with torch's C++ extension loader (g++ and ninja) and cached on disk,
so a restarted rank loads it in milliseconds; the build directory is keyed by
the source, the flags and the CPU's instruction set, since it is compiled for
this CPU (-march=native).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import platform

import torch

from raytp.model.attention import AttentionBackend, AttentionMetadata

log = logging.getLogger(__name__)

_SOURCE = os.path.join(os.path.dirname(__file__), "paged_attention_cpu.cpp")


def _cpu_signature() -> str:
    """A short hash of this CPU's model and instruction-set flags: the build cache's key."""
    text = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("flags", "model name", "Features", "CPU part"))]
        text += "".join(sorted(set(lines)))
    except OSError:
        pass
    return hashlib.sha1(text.encode()).hexdigest()[:12]


_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp-simd"]


@functools.lru_cache(maxsize=1)
def load_op():
    """Build (first time on this machine) or load the compiled op; raises if there is no toolchain.

    The build directory is named by a hash of the source, the flags and the
    CPU, so a built op is imported straight from its .so: a restarted rank
    does not even run ninja's up-to-date check (0.5-1 s per process).
    """
    with open(_SOURCE, "rb") as f:
        digest = hashlib.sha1(f.read() + " ".join(_FLAGS).encode() + _cpu_signature().encode()).hexdigest()[:12]
    name = f"raytp_paged_attention_cpu_{digest}"
    build_dir = os.path.join(os.path.expanduser("~"), ".cache", "raytp", "ops", name)
    library = os.path.join(build_dir, f"{name}.so")
    # torch's loader holds build_dir/lock while it builds: then the .so may be half-written, so wait via load().
    if os.path.exists(library) and not os.path.exists(os.path.join(build_dir, "lock")):
        spec = importlib.util.spec_from_file_location(name, library)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    from torch.utils.cpp_extension import load

    os.makedirs(build_dir, exist_ok=True)
    log.info("building the CPU paged-attention op %s (once per machine, about a minute)", name)
    return load(name, [_SOURCE], extra_cflags=_FLAGS, build_directory=build_dir, verbose=False)


class CpuPagedAttention(AttentionBackend):
    name = "cpu"

    def __init__(self):
        self.op = load_op()

    def attend(self, q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        # q: (T, H, D); cache[0], cache[1]: (slots, Hkv, D) -> (T, H, D)
        return self.op.paged_attention(q, cache[0], cache[1], meta.block_tables, meta.query_start, meta.seq_lens,
                                       meta.block_size, scale, meta.sliding_window or 0)
