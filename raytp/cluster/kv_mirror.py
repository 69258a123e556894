"""A host copy of a GPU rank's KV cache, kept in step, so that a lost rank's cache outlives it.

A CPU rank's cache is itself a file in /dev/shm (rank_store.py), so a rank
that dies leaves it behind. A GPU rank's cache is device memory and dies with
the rank's process. With `kv_host_mirror` on, each GPU rank keeps a mirror of
its cache in such a file: after every step's forward pass, and before the
step's tokens go back to the engine, the slots the step wrote are copied to
the host (one gather on the device, one device-to-host copy, one scatter on
the host). A token the engine has seen therefore has its K/V on the host, and
a rank started in a lost rank's place copies the mirror into its new device
cache: the engine then replays only the steps that were in flight, as with a
CPU replacement, instead of recomputing every running request.

The copy is synchronous on the step's stream: a decode step writes a few MB
per rank (batch 64, 80 layers, one KV head of 128 in bf16: 2.6 MB), a long
prefill more (an 8k-token chunk, 335 MB). The mirror takes as much host memory
as the cache takes device memory (its pages are only taken as blocks are
written).
"""
from __future__ import annotations

import numpy as np
import torch

from raytp.cluster.rank_store import map_kv_cache

SLOT_DIM = 2  # the cache is (layers, 2, slots, kv_heads, head_dim): slots are its third dimension


class KVHostMirror:
    def __init__(self, path: str, shape: tuple[int, ...], dtype: torch.dtype, create: bool):
        """The mirror in the file at `path`: a new, zeroed one (create) or the one a lost rank left."""
        self.host = map_kv_cache(path, shape, dtype, create)  # (layers, 2, slots, kv_heads, head_dim)

    def record(self, cache: torch.Tensor, slots: np.ndarray) -> None:
        """Copy the device cache's `slots` (those a step just wrote) to the mirror. Runs on the current stream, after
        the step's kernels; returns once the copy is on the host."""
        if len(slots) == 0:
            return
        host_index = torch.from_numpy(slots)  # (n,)
        written = cache.index_select(SLOT_DIM, host_index.to(cache.device))  # (layers, 2, n, kv_heads, head_dim)
        self.host.index_copy_(SLOT_DIM, host_index, written.cpu())

    def restore(self, device: torch.device | str) -> torch.Tensor:
        """A device cache holding what the mirror holds (for a rank taking a lost rank's place)."""
        return self.host.to(device, copy=True)  # (a copy on CPU too: the mirror stays the mirror)
