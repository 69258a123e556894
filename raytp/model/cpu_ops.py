"""raytp's compiled CPU ops: built once per machine with torch's C++ extension loader, cached on disk.

Three small C++ sources, each a module of its own: paged attention over the
block KV cache (attention/paged_attention_cpu.cpp), float32, bfloat16 and
int8/int4 linear layers that stream their packed weight (linear_cpu.cpp), and a
layer's per-token ops in one pass each (rowwise_cpu.cpp: RMSNorm, residual
add + RMSNorm, rotary with the KV cache write, SiLU * up; and greedy
sampling's row argmax). Each is compiled for this
CPU (-march=native) by g++ and ninja the first time a process here asks for
it (about a minute), into a directory keyed by the source, the flags and the
CPU's instruction set, so a restarted rank loads the built .so in
milliseconds and a changed source or another CPU gets a build of its own.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import platform

log = logging.getLogger(__name__)

_HERE = os.path.dirname(__file__)
ATTENTION_SOURCE = os.path.join(_HERE, "attention", "paged_attention_cpu.cpp")
LINEAR_SOURCE = os.path.join(_HERE, "linear_cpu.cpp")
ROWWISE_SOURCE = os.path.join(_HERE, "rowwise_cpu.cpp")
# Included by the sources (from _HERE), and hashed with each: a change in one rebuilds them.
HEADERS = [os.path.join(_HERE, name) for name in ("amx_tiles.h", "avx512_math.h")]

_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp-simd"]


def _cpu_signature() -> str:
    """A short hash of this CPU's model and instruction-set flags: part of the build cache's key."""
    text = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("flags", "model name", "Features", "CPU part"))]
        text += "".join(sorted(set(lines)))
    except OSError:
        pass
    return hashlib.sha1(text.encode()).hexdigest()[:12]


@functools.lru_cache(maxsize=None)
def load_extension(source: str):
    """Build (first time on this machine) or load the op compiled from `source`; raises if there is no toolchain.

    The build directory is named by a hash of the source, the flags and the
    CPU, so a built op is imported straight from its .so: a restarted rank
    does not even run ninja's up-to-date check (0.5-1 s per process).
    """
    text = b""
    for path in [source, *HEADERS]:
        with open(path, "rb") as f:
            text += f.read()
    digest = hashlib.sha1(text + " ".join(_FLAGS).encode() + _cpu_signature().encode()).hexdigest()[:12]
    stem = os.path.splitext(os.path.basename(source))[0]
    name = f"raytp_{stem}_{digest}"
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
    log.info("building the CPU op %s (once per machine, about a minute)", name)
    return load(name, [source], extra_cflags=_FLAGS, extra_include_paths=[_HERE], build_directory=build_dir,
                verbose=False)


QUANTIZED_NEEDS = "raytp's int8 and int4 linear ops need a CPU with AVX512-VNNI and AVX512-BF16 and a C++ toolchain to build them"


@functools.lru_cache(maxsize=None)
def linear_op(dtype: str = "float32"):
    """The linear op for "float32", "bfloat16", "int8" or "int4" weights, or None where it cannot serve (no toolchain
    to build it, no AVX-512, for bfloat16 no AVX512-BF16, for int8 and int4 no AVX512-VNNI on this CPU): then linear
    layers keep oneDNN (layers.PackableLinear), and quantization is refused (check_quantization)."""
    try:
        op = load_extension(LINEAR_SOURCE)
    except Exception as err:  # noqa: BLE001 - any build failure means: use oneDNN
        log.warning("could not build raytp's CPU linear op (%s); linear layers use oneDNN", err)
        return None
    return op if op.available(dtype) else None


@functools.lru_cache(maxsize=1)
def rowwise_op():
    """The per-token ops (RMSNorm, add + RMSNorm, rotary with the KV cache write, SiLU * up), or None where they
    cannot be built (then the layers use torch's ops)."""
    try:
        return load_extension(ROWWISE_SOURCE)
    except Exception as err:  # noqa: BLE001 - any build failure means: use torch
        log.warning("could not build raytp's CPU per-token ops (%s); the layers use torch's ops", err)
        return None


def check_quantization(quantization: str, device: str) -> None:
    """Raise ValueError where `quantization` cannot run on `device` here (call before any rank starts)."""
    if quantization == "none":
        return
    if device != "cpu":
        raise ValueError(f"quantization={quantization!r} runs on CPU only (device is {device!r})")
    if linear_op(quantization) is None:
        raise ValueError(f"quantization={quantization!r}: {QUANTIZED_NEEDS}; this one cannot (use quantization none)")


def prebuild(attention: bool, linear: bool) -> None:
    """Build the ops the CPU ranks will load (the attention op, the linear op, the per-token ops) in this process
    before they start, so that their one-time compile is not spent inside the ranks' start-up timeout; the ranks
    then load them from the disk cache."""
    if attention:
        try:
            load_extension(ATTENTION_SOURCE)
        except Exception as err:  # noqa: BLE001 - the ranks fall back (auto) or fail with the same error (cpu)
            log.warning("could not build the CPU paged-attention op here: %s", err)
    if linear:
        linear_op()
    rowwise_op()
