"""Which CUDA device a rank runs on, and how the GPU is named across processes.

Ray gives an actor GPU ids as it knows them on the node: indices ("3"), or
the UUIDs ("GPU-8f1c...") and MIG ids ("MIG-...") the node's
CUDA_VISIBLE_DEVICES listed when Ray started. In the actor it sets
CUDA_VISIBLE_DEVICES to those ids, so torch numbers the actor's GPUs 0.. in
that order: a rank's device index is the position of its Ray id there, not
the id itself (`int("GPU-8f1c...")` fails; device 3 does not exist in an
actor that sees one GPU).

Across processes a GPU is named by its NVML UUID: unlike an index it means
the same GPU whatever CUDA_VISIBLE_DEVICES or CUDA_DEVICE_ORDER a process has.
"""
from __future__ import annotations

import os


class GpuIdError(RuntimeError):
    """Ray's GPU ids for a rank cannot be mapped to exactly one CUDA device."""


def cuda_device_index(ray_gpu_ids: list[str], cuda_visible_devices: str | None) -> int:
    """torch's index of the one GPU Ray gave this rank.

    ray_gpu_ids: `ray.get_gpu_ids()` as strings ([] outside Ray: then device 0);
    cuda_visible_devices: this process's CUDA_VISIBLE_DEVICES (None if unset).
    """
    if not ray_gpu_ids:
        return 0  # not placed by Ray (the in-process engine): the first visible GPU
    if len(ray_gpu_ids) != 1:
        raise GpuIdError(f"a TP rank runs on one GPU, but Ray gave it {len(ray_gpu_ids)}: {ray_gpu_ids}")
    gpu = ray_gpu_ids[0]
    if cuda_visible_devices is None:
        # Ray left CUDA_VISIBLE_DEVICES alone (RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES): an index is the device.
        if gpu.isdigit():
            return int(gpu)
        raise GpuIdError(f"Ray gave this rank GPU {gpu!r} and CUDA_VISIBLE_DEVICES is not set: "
                         f"cannot tell which CUDA device {gpu!r} is")
    visible = [d.strip() for d in cuda_visible_devices.split(",") if d.strip()]
    if gpu not in visible:
        raise GpuIdError(f"Ray gave this rank GPU {gpu!r}, which is not in CUDA_VISIBLE_DEVICES="
                         f"{cuda_visible_devices!r}: cannot tell which CUDA device it is")
    return visible.index(gpu)


def ray_gpu_ids() -> list[str]:
    """The GPU ids Ray assigned to this process ([] outside a Ray worker)."""
    try:
        import ray
    except ImportError:
        return []
    return [str(g) for g in ray.get_gpu_ids()] if ray.is_initialized() else []


def select_cuda_device() -> int:
    """Make the GPU Ray gave this rank torch's current device; return its index."""
    import torch

    index = cuda_device_index(ray_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES"))
    count = torch.cuda.device_count()
    if index >= count:
        raise GpuIdError(f"CUDA device {index} (Ray GPU ids {ray_gpu_ids()}, CUDA_VISIBLE_DEVICES="
                         f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}) does not exist: this process sees {count} GPUs")
    torch.cuda.set_device(index)
    return index


def nvml_uuid(index: int) -> str:
    """NVML's name of CUDA device `index` ("GPU-<uuid>"), the same in every process on the node."""
    import torch

    return f"GPU-{torch.cuda.get_device_properties(index).uuid}"
