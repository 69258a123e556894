"""NVLink topology of the GPUs a TP group got, asked of NVML on the ranks' node.

TP all-reduces run every layer: over PCIe instead of NVLink they can cost more
than the compute. The group warns (or refuses, with require_nvlink) when its
GPUs are not all NVLink-connected to each other.

This runs in rank 0's process, on the node the STRICT_PACK group put every
rank on (the replica may be on another node, or in another pod). The GPUs are
named by NVML UUID, which each rank read from its own CUDA device: Ray's GPU
ids are indices in an order (CUDA's) that need not be NVML's (PCI order).
"""
from __future__ import annotations

import itertools


class TopologyError(RuntimeError):
    """The GPUs of a TP group are not all NVLink-connected and require_nvlink is set."""


def missing_nvlink_pairs(gpu_uuids: list[str], nvml) -> list[tuple[int, int]]:
    """Pairs of ranks (a < b) whose GPUs have no NVLink path between them, per NVML's P2P status.

    `nvml` is the pynvml module (nvidia-ml-py). On an NVSwitch system every
    pair reports NVLink; on two NVLink islands, pairs across them do not.
    Raises nvml.NVMLError if NVML cannot answer (no driver, an unknown UUID).
    """
    nvml.nvmlInit()
    try:
        handles = [nvml.nvmlDeviceGetHandleByUUID(uuid) for uuid in gpu_uuids]
        return [
            (a, b) for a, b in itertools.combinations(range(len(handles)), 2)
            if nvml.nvmlDeviceGetP2PStatus(handles[a], handles[b], nvml.NVML_P2P_CAPS_INDEX_NVLINK)
            != nvml.NVML_P2P_STATUS_OK
        ]
    finally:
        nvml.nvmlShutdown()


def check_nvlink(gpu_uuids: list[str], refuse: bool, nvml=None) -> str | None:
    """Run on the ranks' node: None if every pair of GPUs (rank i has gpu_uuids[i]) is NVLink-connected,
    else a warning to log; raises TopologyError instead if `refuse` and pairs are missing.

    Where NVML cannot tell (not installed, no driver, a MIG device), says so and does not refuse.
    """
    try:
        if nvml is None:
            import pynvml as nvml
        missing = missing_nvlink_pairs(gpu_uuids, nvml)
    except ImportError as err:
        return f"cannot read the NVLink topology ({err}; install nvidia-ml-py); not checking it"
    except nvml.NVMLError as err:
        return f"cannot read the NVLink topology from NVML ({err}); not checking it"
    if not missing:
        return None
    pairs = ", ".join(f"rank {a} ({gpu_uuids[a]}) - rank {b} ({gpu_uuids[b]})" for a, b in missing)
    msg = f"the GPUs of this TP group are not all NVLink-connected: no NVLink between {pairs}; TP all-reduces will go over PCIe"
    if refuse:
        raise TopologyError(msg + " (require_nvlink is set)")
    return msg
