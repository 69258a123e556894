"""What a rank keeps outside its process, so that a replacement starts where it stopped.

A rank that dies takes its process with it, but not these files in /dev/shm
(RAM-backed, one folder per group build):

- its **shard**: the weights it computes with, sliced from the checkpoint and
  packed for its kernels, written once after loading (safetensors). A spare
  that takes the rank's place maps the file and computes with its pages as
  they are, with no copy, instead of slicing the checkpoint and packing again
  (packing alone runs at ~1.4 GB/s; a copy of a 0.5B model's shard took
  0.6-0.7 s, the mapping takes ~0.1 s). A GPU rank's (gpu_host_copies) is a
  host copy, which a replacement copies to its device instead of reading the
  checkpoint;
- its **KV cache**, which a CPU rank maps from a file instead of allocating:
  the replacement maps the same file, so every sequence keeps its cached
  tokens and only the steps that were in flight are computed again. A GPU
  rank's cache is device memory; its host mirror (kv_mirror.py) is the file.

The engine removes the folder with the group (`remove_store`, on the ranks'
node). A replica that dies before it can (killed by Serve, a crashed node
agent) leaves its folder behind: every process that uses a folder marks it
with its pid (`mark_user`), and a new group sweeps folders none of whose users
is alive (`sweep_stale_stores`).
"""
from __future__ import annotations

import errno
import json
import mmap
import os
import shutil
import struct
import uuid

import torch

STORE_ROOT = "/dev/shm"
STORE_PREFIX = "raytp-group-"
# A packed weight's key: the linear's name, then ".packed_" and the kernel it was packed for (raytp, int8, int4);
# a quantized one's scales beside it.
_PACKED = ".packed_"
_SCALES = ".scales"
_PACKED_KERNELS = ("raytp", "int8", "int4")


def new_store_dir(root: str = STORE_ROOT) -> str | None:
    """A fresh folder name for one group build's stores (created by the ranks), or None where root is missing."""
    return os.path.join(root, STORE_PREFIX + uuid.uuid4().hex[:12]) if os.path.isdir(root) else None


def mark_user(store_dir: str) -> None:
    """Record that this process uses the folder (a rank or a spare): the folder is stale once none of them runs."""
    os.makedirs(store_dir, exist_ok=True)
    open(os.path.join(store_dir, f"{os.getpid()}.pid"), "w").close()


def sweep_stale_stores(root: str = STORE_ROOT) -> list[str]:
    """Remove the folders on this node whose every user has exited (a group whose replica died before removing
    them); folders with no user recorded yet are being created and are kept. Returns the folders removed."""
    from raytp.cluster.comm import process_alive

    removed = []
    for name in os.listdir(root) if os.path.isdir(root) else ():
        path = os.path.join(root, name)
        if not name.startswith(STORE_PREFIX):
            continue
        try:
            pids = [int(f[:-4]) for f in os.listdir(path) if f.endswith(".pid")]
        except (OSError, ValueError):
            continue
        if pids and not any(process_alive(pid) for pid in pids):
            remove_store(path)
            removed.append(path)
    return removed


def shard_path(store_dir: str, rank: int) -> str:
    return os.path.join(store_dir, f"rank{rank}.shard.safetensors")


def kv_path(store_dir: str, rank: int) -> str:
    return os.path.join(store_dir, f"rank{rank}.kv")


def save_shard(model: torch.nn.Module, path: str) -> None:
    """Write the rank's parameters and packed weights to `path` (complete or absent: written aside, then renamed)."""
    from raytp.model.layers import PackableLinear

    tensors = {name: p.detach() for name, p in model.named_parameters()}  # a tied weight once
    for name, module in model.named_modules():
        if isinstance(module, PackableLinear) and module.kernel in _PACKED_KERNELS:
            tensors[name + _PACKED + module.kernel] = module.packed
            if module.scales is not None:
                tensors[name + _SCALES] = module.scales
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = f"{path}.{os.getpid()}.partial"
    _write_safetensors(tensors, partial)
    os.replace(partial, path)


_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I64": torch.int64,
           "I32": torch.int32, "U8": torch.uint8, "I8": torch.int8}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def _write_safetensors(tensors: dict[str, torch.Tensor], path: str) -> None:
    """safetensors' layout, written one tensor at a time: a GPU rank's shard goes to the host a tensor at a time
    instead of all at once beside the file (safetensors' own save_file copies every tensor to the host first)."""
    header, offset = {}, 0
    for name, t in tensors.items():
        if t.dtype not in _DTYPE_NAMES:
            raise ValueError(f"shard tensor {name}: dtype {t.dtype} has no safetensors name here")
        header[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + t.numel() * t.element_size()]}
        offset = header[name]["data_offsets"][1]
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors pads it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for t in tensors.values():
            if t.numel():
                f.write(t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().data)


def map_shard(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a shard file as views of one shared, pre-faulted mapping of it (safetensors' layout: an
    8-byte header length, a JSON header of dtype, shape and byte range per tensor, then the data)."""
    with open(path, "r+b") as f:  # a shared writable mapping needs a writable file (nobody writes the weights)
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        # MAP_POPULATE maps every page now (the pages are in RAM already), so the first steps take no page faults.
        buf = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
    data_start = 8 + header_len
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = _DTYPES[info["dtype"]]
        count = (end - begin) // torch.empty((), dtype=dtype).element_size()
        flat = torch.frombuffer(buf, dtype=dtype, count=count, offset=data_start + begin) if count else torch.empty(0, dtype=dtype)
        tensors[name] = flat.view(info["shape"])
    return tensors


def load_shard(model: torch.nn.Module, path: str) -> None:
    """Make a freshly built model compute with the shard at `path`, mapped in place (map_shard): parameters, then
    packed weights (a linear whose packing is not in the shard packs itself, as after a checkpoint load). Every
    parameter must be there, with its shape."""
    from raytp.model.layers import PackableLinear

    tensors = map_shard(path)
    params = dict(model.named_parameters())  # a tied weight once: both modules see the new data
    missing = sorted(set(params) - set(tensors))
    if missing:
        raise ValueError(f"shard {path} lacks {len(missing)} parameters, e.g. {missing[:3]}")
    for name, param in params.items():
        if tensors[name].shape != param.shape:
            raise ValueError(f"shard {path}: {name} has shape {list(tensors[name].shape)}, the model {list(param.shape)}")
        if param.device.type == "cpu":
            param.data = tensors[name]  # computes with the file's pages
        else:
            param.data.copy_(tensors[name])  # a GPU model: a copy on its device, into what the model allocated
    for name, module in model.named_modules():
        if not isinstance(module, PackableLinear):
            continue
        kernel = next((k for k in _PACKED_KERNELS if name + _PACKED + k in tensors), None)
        if kernel is not None:
            module.adopt(kernel, tensors[name + _PACKED + kernel], tensors.get(name + _SCALES))
        else:
            module.pack()


def map_kv_cache(path: str, shape: tuple[int, ...], dtype: torch.dtype, create: bool,
                 reserve: bool = False) -> torch.Tensor:
    """The KV cache as a tensor over a shared file: a new, zeroed one (create) or the one a dead rank left. reserve:
    the file system sets the new file's space aside now (OSError ENOSPC where it has no room), so that writing a
    block later cannot fail (on tmpfs that would be a SIGBUS mid-step)."""
    numel = int(torch.Size(shape).numel())
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if create:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:  # (truncates a file left at this path first: its pages go back)
            f.truncate(nbytes)  # a sparse file reads as zeros; pages are taken as blocks are written
            if reserve and nbytes:
                # Asked first: a posix_fallocate that runs out of room keeps what it took on some file systems
                # (ext4 does; tmpfs gives it back).
                stat = os.statvfs(os.path.dirname(path))
                if stat.f_bavail * stat.f_frsize < nbytes:
                    raise OSError(errno.ENOSPC, f"{nbytes / 2**30:.1f} GiB do not fit in {os.path.dirname(path)}, "
                                                f"which has {stat.f_bavail * stat.f_frsize / 2**30:.1f} GiB free")
                os.posix_fallocate(f.fileno(), 0, nbytes)  # (reserved pages still read, and seek, as holes)
    elif os.path.getsize(path) != nbytes:
        raise ValueError(f"KV cache file {path} has {os.path.getsize(path)} bytes, expected {nbytes} for {shape}")
    return torch.from_file(path, shared=True, size=numel, dtype=dtype).view(shape)


def remove_store(store_dir: str) -> None:
    """Remove one group build's folder (idempotent); refuses any other path."""
    if os.path.basename(store_dir).startswith(STORE_PREFIX):
        shutil.rmtree(store_dir, ignore_errors=True)
