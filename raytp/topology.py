"""NVLink topology of the GPUs a TP group got.

TP all-reduces run every layer: over PCIe instead of NVLink they can cost more
than the compute. The group warns (or refuses, with require_nvlink) when its
GPUs are not all NVLink-connected to each other.
"""
from __future__ import annotations

import itertools
import logging
from typing import Callable

log = logging.getLogger(__name__)


class TopologyError(RuntimeError):
    """The GPUs of a TP group are not all NVLink-connected and require_nvlink is set."""


def missing_nvlink_pairs(gpu_ids: list[int], connected: Callable[[int, int], bool]) -> list[tuple[int, int]]:
    """Pairs of GPUs (physical ids) with no NVLink between them."""
    return [(a, b) for a, b in itertools.combinations(sorted(gpu_ids), 2) if not connected(a, b)]


def nvml_nvlink_connected() -> Callable[[int, int], bool]:
    """connected(a, b) from NVML: True if an active NVLink of GPU a reaches GPU b (directly or through an NVSwitch)."""
    import pynvml

    pynvml.nvmlInit()
    bus_ids = {}
    for i in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(i)
        bus_ids[i] = pynvml.nvmlDeviceGetPciInfo(handle).busId

    def connected(a: int, b: int) -> bool:
        handle = pynvml.nvmlDeviceGetHandleByIndex(a)
        for link in range(pynvml.NVML_NVLINK_MAX_LINKS):
            try:
                if pynvml.nvmlDeviceGetNvLinkState(handle, link) != pynvml.NVML_FEATURE_ENABLED:
                    continue
                remote = pynvml.nvmlDeviceGetNvLinkRemotePciInfo_v2(handle, link).busId
            except pynvml.NVMLError:
                continue
            # A link to an NVSwitch reaches every GPU on the switch fabric.
            if remote == bus_ids[b] or remote not in bus_ids.values():
                return True
        return False

    return connected


def check_nvlink(gpu_ids: list[int], refuse: bool, connected: Callable[[int, int], bool] | None = None) -> None:
    try:
        connected = connected or nvml_nvlink_connected()
    except Exception as err:  # no NVML: cannot tell; say so and go on
        log.warning("cannot read the NVLink topology (%s); not checking it", err)
        return
    missing = missing_nvlink_pairs(gpu_ids, connected)
    if not missing:
        log.info("GPUs %s are all NVLink-connected", gpu_ids)
        return
    msg = f"GPUs {gpu_ids} are not all NVLink-connected: no NVLink between {missing}; TP all-reduces will go over PCIe"
    if refuse:
        raise TopologyError(msg + " (require_nvlink is set)")
    log.warning(msg)
