"""A host copy of a GPU rank's KV cache, kept in step, so that a lost rank's cache outlives it.

A CPU rank's cache is itself a file in /dev/shm (rank_store.py), so a rank
that dies leaves it behind. A GPU rank's cache is device memory and dies with
the rank's process. With `gpu_host_copies` on, each GPU rank keeps a mirror of
its cache in such a file: after every step's forward pass, and before the
step's tokens go back to the engine, the slots the step wrote are copied to
the host (a gather on the device, a device-to-host copy, a scatter on the
host, a few layers at a time). A token the engine has seen therefore has its
K/V on the host, and a rank started in a lost rank's place copies the mirror
into its new device cache: the engine then replays only the steps that were
in flight, as with a CPU replacement, instead of recomputing every running
request.

The copy is synchronous on the step's stream: a decode step writes a few MB
per rank (batch 64, 80 layers, one KV head of 128 in bf16: 2.6 MB), a long
prefill more (an 8k-token chunk, 335 MB, gathered at most RECORD_BYTES at a
time so that the device needs no large buffer the KV sizing did not count).
The file's whole size is reserved when it is created (posix_fallocate: a
clear error at start where /dev/shm has no room, rather than a SIGBUS in a
step once it fills up); its pages read as holes until written, and a
restore copies only the pages that were written.
"""
from __future__ import annotations

import errno
import os

import numpy as np
import torch

from raytp.cluster.rank_store import map_kv_cache

SLOT_DIM = 2  # the cache is (layers, 2, slots, kv_heads, head_dim): slots are its third dimension
RECORD_BYTES = 64 * 2**20  # the most a step's gathered slots take on the device at once
RESTORE_CHUNK_BYTES = 64 * 2**20  # host staging for a restore


class KVHostMirror:
    def __init__(self, path: str, shape: tuple[int, ...], dtype: torch.dtype, create: bool):
        """The mirror in the file at `path`: a new, zeroed one (create: its whole size reserved in the file system
        now, ValueError where there is no room) or the one a lost rank left."""
        self.path = path
        try:
            self.host = map_kv_cache(path, shape, dtype, create, reserve=True)  # (layers, 2, slots, kv_heads, head_dim)
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
            raise ValueError(f"gpu_host_copies: the host copy of this rank's KV cache: {err.strerror}: give /dev/shm "
                             "more room (every rank on the node keeps one, beside the shards), lower "
                             "gpu_memory_utilization, or turn gpu_host_copies off") from None

    def record(self, cache: torch.Tensor, slots: np.ndarray) -> None:
        """Copy the device cache's `slots` (those a step just wrote) to the mirror. Runs on the current stream, after
        the step's kernels; returns once the copy is on the host."""
        if len(slots) == 0:
            return
        host_index = torch.from_numpy(slots)  # (n,)
        device_index = host_index.to(cache.device)
        layer_bytes = cache[0, :, :1].nbytes * len(slots)  # one layer's K and V rows of these slots
        step = max(1, RECORD_BYTES // layer_bytes)  # layers per gather
        for first in range(0, cache.shape[0], step):
            layers = slice(first, first + step)
            written = cache[layers].index_select(SLOT_DIM, device_index)  # (layers, 2, n, kv_heads, head_dim)
            self.host[layers].index_copy_(SLOT_DIM, host_index, written.cpu())

    def restore(self, device: torch.device | str) -> torch.Tensor:
        """A device cache holding what the mirror holds (for a rank taking a lost rank's place): zeros, then the
        file's written ranges (SEEK_DATA / SEEK_HOLE), read in chunks; holes are neither read nor allocated."""
        cache = torch.zeros(self.host.shape, dtype=self.host.dtype, device=device)
        flat = cache.view(-1).view(torch.uint8)  # the cache's bytes, in the file's order
        staging = torch.empty(RESTORE_CHUNK_BYTES, dtype=torch.uint8,
                              pin_memory=torch.device(device).type == "cuda")
        with open(self.path, "rb") as f:
            fd, size, pos = f.fileno(), os.fstat(f.fileno()).st_size, 0
            while pos < size:
                try:
                    start = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError:  # ENXIO: no data after pos
                    break
                end = os.lseek(fd, start, os.SEEK_HOLE)
                for offset in range(start, end, RESTORE_CHUNK_BYTES):
                    n = min(RESTORE_CHUNK_BYTES, end - offset)
                    got = os.preadv(fd, [staging[:n].numpy()], offset)
                    if got != n:
                        raise OSError(f"{self.path}: read {got} of {n} bytes at {offset}")
                    flat[offset : offset + n].copy_(staging[:n])  # (synchronous: staging is reused next)
                pos = end
        return cache
