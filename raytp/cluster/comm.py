"""Communicators: the collectives that tensor-parallel ranks use.

One interface, chosen by device and world size:
- `SingleRank`: TP=1, no collective at all.
- `GlooCommunicator`: CPU, a torch.distributed gloo process group of its own
  (never the global default group), rendezvous over a TCPStore on a free port.
- `ShmCommunicator`: CPU ranks on one node (what a STRICT_PACK group is):
  all-reduce and all-gather through shared memory, gloo for the rest.
- `NcclCommunicator`: GPU, cupy.cuda.nccl on torch's current stream (the
  worker runs each step on a stream of its own, never the legacy default
  stream). Rank 0 makes the unique id; the caller hands it to the other ranks
  through Ray.

Every collective is synchronous from the caller's point of view and works in
place where it can, returning the result tensor.

`abort()` may be called from another thread while a collective waits for a
peer that died or hung: the waiting collective and every later one raise
`CollectiveAborted`, so the rank's step fails in milliseconds and the rank
can join a new communicator (a rank is replaced, the survivors stay).
"""
from __future__ import annotations

import contextlib
import datetime
import mmap
import os
import socket
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch


class CollectiveAborted(RuntimeError):
    """The communicator was aborted (a peer died or hung): this collective did not complete. `exited_rank`: the
    peer whose process was seen gone, where one was."""

    def __init__(self, message: str, exited_rank: int | None = None):
        super().__init__(message, exited_rank)  # both in args: the error crosses processes pickled
        self.exited_rank = exited_rank

    def __str__(self) -> str:
        return self.args[0]


class Communicator(ABC):
    rank: int
    world_size: int

    @abstractmethod
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place."""

    @abstractmethod
    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's tensor (same shape on all ranks) along dim."""

    @abstractmethod
    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Copy src's tensor into every rank's tensor, in place."""

    @abstractmethod
    def barrier(self) -> None:
        """Return once every rank has called it."""

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        """Point to point (pipeline stages): tensor to rank dst, which receives it with recv."""
        raise NotImplementedError(f"{type(self).__name__} has no point-to-point send")

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Fill tensor (its shape and dtype as sent) with what rank src sends."""
        raise NotImplementedError(f"{type(self).__name__} has no point-to-point recv")

    def abort(self) -> None:
        """Release a collective blocked on a peer and fail every later one (callable from any thread)."""

    def close(self) -> None:
        pass


class SingleRank(Communicator):
    """TP=1: every collective is the identity."""

    rank, world_size = 0, 1

    def all_reduce(self, tensor):
        return tensor

    def all_gather(self, tensor, dim=-1):
        return tensor

    def broadcast(self, tensor, src=0):
        return tensor

    def barrier(self):
        pass


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct ports free on host right now (the sockets stay open until all are picked)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for sock in socks:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in socks]


@dataclass(frozen=True)
class GlooRendezvous:
    """Where the ranks meet: rank 0's host and a free port on it (picked by rank 0)."""

    host: str
    port: int


def open_store(rendezvous: GlooRendezvous, world_size: int, timeout_s: float = 60.0):
    """Rank 0: the rendezvous' store, listening now (made with the rendezvous, before any rank joins: a rank
    whose connection finds no store yet retries only after ~0.5 s)."""
    import torch.distributed as dist

    return dist.TCPStore(rendezvous.host, rendezvous.port, world_size, True,
                         timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)


class GlooCommunicator(Communicator):
    def __init__(self, rendezvous: GlooRendezvous, rank: int, world_size: int, timeout_s: float = 60.0, store=None):
        """`store`: rank 0's store from open_store, if it made one; otherwise rank 0 hosts one now."""
        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=timeout_s)
        self.rank, self.world_size = rank, world_size
        # Rank 0 hosts the store; the others connect and wait up to the timeout.
        self._store = store or dist.TCPStore(rendezvous.host, rendezvous.port, world_size, rank == 0, timeout=timeout)
        self._pg = dist.ProcessGroupGloo(self._store, rank, world_size, timeout)
        self.aborted = False

    def _group(self):
        # gloo cannot interrupt an operation under way (one whose peer died fails as its socket closes; a hung
        # peer holds it until the timeout): abort() only refuses the operations after it.
        if self.aborted:
            raise CollectiveAborted(f"rank {self.rank}: the communicator was aborted")
        return self._pg

    def all_reduce(self, tensor):
        self._group().allreduce([tensor]).wait()
        return tensor

    def all_gather(self, tensor, dim=-1):
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        self._group().allgather([parts], [tensor]).wait()
        return torch.cat(parts, dim=dim)

    def broadcast(self, tensor, src=0):
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank = src
        self._group().broadcast([tensor], opts).wait()
        return tensor

    def barrier(self):
        self._group().barrier().wait()

    def abort(self):
        self.aborted = True

    def close(self):
        self._pg = None
        self._store = None


@dataclass(frozen=True)
class ShmRendezvous:
    """Same-node CPU ranks: gloo for the rare collectives, plus a shared-memory file rank 0 created."""

    gloo: GlooRendezvous
    path: str
    slot_bytes: int


SEGMENT_PREFIX = "raytp-tp-"


def create_shm_rendezvous(host: str, world_size: int, slot_bytes: int = 8 * 2**20,
                          root: str = "/dev/shm") -> ShmRendezvous:
    """Rank 0: create the segment file (in /dev/shm, RAM-backed) before the other ranks open it.

    Rank 0 unlinks it once every rank has it mapped, so a segment still there after its creator exited was left by
    a group that failed while connecting (a rank died first, as in a kill while a group starts): the segment's name
    carries its creator's pid, and each new one sweeps those first. (This assumes the node's ranks share a pid
    namespace with their /dev/shm, as Ray's workers on one node or one Kubernetes pod do.)
    """
    for name in os.listdir(root):
        creator = name[len(SEGMENT_PREFIX):].split("-", 1)[0] if name.startswith(SEGMENT_PREFIX) else ""
        if creator.isdigit() and not process_alive(int(creator)):
            with contextlib.suppress(FileNotFoundError):  # (another group's rank 0 swept it first)
                os.unlink(os.path.join(root, name))
    path = os.path.join(root, f"{SEGMENT_PREFIX}{os.getpid()}-{uuid.uuid4().hex}")
    with open(path, "wb") as f:
        f.truncate(ShmCommunicator.segment_bytes(world_size, slot_bytes))
    return ShmRendezvous(GlooRendezvous(host, free_port(host)), path, slot_bytes)


class ShmCommunicator(Communicator):
    """CPU ranks on one node: all-reduce and all-gather through shared memory.

    gloo over loopback costs about a millisecond per small all-reduce, more
    than a small model's layer. Here each rank copies its tensor into its own
    slot of a shared segment, publishes a sequence number, waits until every
    rank has published, and sums (or concatenates) the slots in rank order, so
    every rank gets bit-identical results. Slots alternate between two sets by
    sequence parity: a rank can only be one collective ahead of the slowest
    (it waits for everyone at each one), so it never overwrites a slot that is
    still being read. Tensors larger than a slot, broadcast and barrier go to gloo.
    Relies on x86's store ordering (data stores are visible before the flag store).

    The segment's first cache line is the abort word: abort() on any rank sets
    it, and every rank's wait (each polls it) raises CollectiveAborted, at once
    and from then on. So the engine releases the survivors of a dead rank by
    asking any one of them. A rank also aborts by itself when a peer it waits
    for has exited (each rank's process id is beside its flag): a killed rank
    fails its peers' step within milliseconds, before Ray has noticed.
    """

    _FLAG_STRIDE = 8  # int64s per flag: one cache line each, no false sharing

    @classmethod
    def segment_bytes(cls, world_size: int, slot_bytes: int) -> int:
        return (1 + world_size) * cls._FLAG_STRIDE * 8 + 2 * world_size * slot_bytes

    def __init__(self, rendezvous: ShmRendezvous, rank: int, world_size: int, timeout_s: float = 60.0, store=None):
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        # A waiting rank spins a little before it yields its core: with a core per rank, the peers are running and
        # arrive within microseconds. With more ranks than the node's cores (cpus_per_rank < 1), a peer may be the
        # one waiting for this core: yield at once (SmolLM2 at TP=3 on 2 cores: 11-12 -> 17 tokens/s, one stream).
        self._spins_before_yield = 200 if world_size <= (os.cpu_count() or 1) else 0
        self.gloo = GlooCommunicator(rendezvous.gloo, rank, world_size, timeout_s, store)
        self.slot_bytes = rendezvous.slot_bytes
        with open(rendezvous.path, "r+b") as f:
            self._mmap = mmap.mmap(f.fileno(), self.segment_bytes(world_size, self.slot_bytes))
        words = np.frombuffer(self._mmap, dtype=np.int64, count=(1 + world_size) * self._FLAG_STRIDE)
        self._abort_word = words[:1]  # (1,): nonzero once any rank aborted
        self._flags = words[self._FLAG_STRIDE :: self._FLAG_STRIDE]  # (world,): each rank's last published sequence
        self._pids = words[self._FLAG_STRIDE + 1 :: self._FLAG_STRIDE]  # (world,): each rank's process id
        self._pids[rank] = os.getpid()
        self.gloo.barrier()  # everyone has it mapped (and its pid written): the name is no longer needed
        if rank == 0:
            os.unlink(rendezvous.path)
        flag_bytes = words.nbytes
        data = torch.frombuffer(self._mmap, dtype=torch.uint8, offset=flag_bytes, count=2 * world_size * self.slot_bytes)
        self._slots = data.view(2, world_size, self.slot_bytes)  # (parity, rank, bytes)
        self._seq = 0

    def _exchange(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """Publish tensor and wait for everyone's: (world, *shape) view of all ranks' tensors, or None if too big."""
        tensor = tensor.contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes > self.slot_bytes:
            return None
        if self._abort_word[0]:
            raise CollectiveAborted(f"rank {self.rank}: the communicator was aborted")
        self._seq += 1
        slots = self._slots[self._seq % 2]  # (world, bytes)
        slots[self.rank, :nbytes].copy_(tensor.view(-1).view(torch.uint8))
        self._flags[self.rank] = self._seq
        self._wait_all(self._seq)
        return slots[:, :nbytes].view(tensor.dtype).view(self.world_size, *tensor.shape)

    def _wait_all(self, seq: int) -> None:
        spins, deadline = 0, None
        while self._flags.min() < seq:
            if self._abort_word[0]:
                raise CollectiveAborted(f"rank {self.rank}: the communicator was aborted in collective {seq}")
            spins += 1
            if spins > self._spins_before_yield:
                # Peers not there yet: let them run, if they wait for this core.
                os.sched_yield()
                if deadline is None:
                    deadline = time.monotonic() + self.timeout_s
                elif spins % 1024 == 0:
                    self._check_peers(seq)
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"rank {self.rank}: peers did not reach collective {seq} within {self.timeout_s}s")

    def _check_peers(self, seq: int) -> None:
        """Abort (for every rank) if a peer that has not reached collective `seq` has exited."""
        for rank in np.flatnonzero(self._flags < seq):
            pid = int(self._pids[rank])
            if not process_alive(pid):
                self.abort()
                raise CollectiveAborted(f"rank {self.rank}: peer rank {rank} (pid {pid}) exited before collective {seq}",
                                        int(rank))

    def all_reduce(self, tensor):
        parts = self._exchange(tensor)
        if parts is None:
            return self.gloo.all_reduce(tensor)
        total = parts[0].clone()
        for r in range(1, self.world_size):  # rank order: identical sums on every rank
            total += parts[r]
        tensor.copy_(total)
        return tensor

    def all_gather(self, tensor, dim=-1):
        parts = self._exchange(tensor)
        if parts is None:
            return self.gloo.all_gather(tensor, dim)
        return torch.cat(parts.unbind(0), dim=dim)

    def broadcast(self, tensor, src=0):
        return self.gloo.broadcast(tensor, src)

    def barrier(self):
        self.gloo.barrier()

    def abort(self):
        if self._abort_word is not None:
            self._abort_word[0] = 1
        self.gloo.abort()

    def close(self):
        self._flags = self._slots = self._abort_word = None
        self.gloo.close()


def process_alive(pid: int) -> bool:
    """Whether process `pid` (on this node) still runs: a killed one that is not reaped yet is a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _cupy_nccl():
    """cupy's NCCL binding, or an error that says which extra installs the cupy of this torch's CUDA."""
    try:
        from cupy.cuda import nccl
    except ImportError as err:
        major = (torch.version.cuda or "12").split(".")[0]
        raise ImportError(f"NCCL needs cupy built for CUDA {major} (torch {torch.__version__} uses CUDA "
                          f"{torch.version.cuda}): pip install 'raytp[cuda{major}]' ({err})") from err
    return nccl


def nccl_unique_id() -> tuple:
    """Made by rank 0 and handed to the other ranks (through Ray) before NcclCommunicator()."""
    return _cupy_nccl().get_unique_id()


_NCCL_DTYPES = {
    torch.float32: "NCCL_FLOAT32",
    torch.float16: "NCCL_FLOAT16",
    torch.bfloat16: "NCCL_BFLOAT16",
    torch.int32: "NCCL_INT32",
    torch.int64: "NCCL_INT64",
}


class NcclCommunicator(Communicator):
    def __init__(self, unique_id: tuple, rank: int, world_size: int):
        nccl = _cupy_nccl()
        import cupy

        self.rank, self.world_size = rank, world_size
        self._nccl = nccl
        self._device = torch.device("cuda", torch.cuda.current_device())
        with cupy.cuda.Device(self._device.index):
            # ncclCommInitRank blocks until every rank has joined; the timeout is
            # enforced by the caller (TPGroup waits on the init calls with
            # timeout_s and kills the workers when it passes).
            self._comm = nccl.NcclCommunicator(world_size, unique_id, rank)
        # NCCL connects the ranks and allocates its buffers at the first collective: do one now, so that
        # neither lands in the first served step, and the KV cache is sized with NCCL's memory already taken.
        self.barrier()

    def _live(self):
        if self._comm is None:
            raise CollectiveAborted(f"rank {self.rank}: the NCCL communicator was aborted")
        return self._comm

    def _dtype(self, tensor: torch.Tensor) -> int:
        try:
            return getattr(self._nccl, _NCCL_DTYPES[tensor.dtype])
        except KeyError:
            raise TypeError(f"NCCL communicator does not support dtype {tensor.dtype}") from None

    @staticmethod
    def _stream() -> int:
        # Collectives go on torch's current stream so they order with the compute around them.
        return torch.cuda.current_stream().cuda_stream

    def all_reduce(self, tensor):
        assert tensor.is_contiguous()
        self._live().allReduce(
            tensor.data_ptr(), tensor.data_ptr(), tensor.numel(), self._dtype(tensor), self._nccl.NCCL_SUM, self._stream()
        )
        return tensor

    def all_gather(self, tensor, dim=-1):
        tensor = tensor.contiguous()
        out = torch.empty((self.world_size, *tensor.shape), dtype=tensor.dtype, device=tensor.device)
        self._live().allGather(tensor.data_ptr(), out.data_ptr(), tensor.numel(), self._dtype(tensor), self._stream())
        # out: (world, *shape) -> concatenated along dim
        return torch.cat(out.unbind(0), dim=dim)

    def broadcast(self, tensor, src=0):
        assert tensor.is_contiguous()
        self._live().broadcast(
            tensor.data_ptr(), tensor.data_ptr(), tensor.numel(), self._dtype(tensor), src, self._stream()
        )
        return tensor

    def send(self, tensor, dst):
        tensor = tensor.contiguous()
        self._live().send(tensor.data_ptr(), tensor.numel(), self._dtype(tensor), dst, self._stream())

    def recv(self, tensor, src):
        assert tensor.is_contiguous()
        self._live().recv(tensor.data_ptr(), tensor.numel(), self._dtype(tensor), src, self._stream())
        return tensor

    def barrier(self):
        one = torch.ones(1, device=self._device)
        self.all_reduce(one)
        torch.cuda.current_stream().synchronize()

    def abort(self):
        # ncclCommAbort from another thread releases a collective stuck on a dead peer (the step's stream then
        # fails); later collectives on this communicator fail too. The rank joins a new one.
        self.close()

    def close(self):
        # Abort, not destroy: teardown usually follows a failure, and ncclCommDestroy waits for peers
        # (a dead one: forever); ncclCommAbort frees this rank's resources and returns. With nothing
        # in flight (a planned shutdown) the two do the same.
        if getattr(self, "_comm", None) is not None:
            self._comm.abort()
            self._comm = None
