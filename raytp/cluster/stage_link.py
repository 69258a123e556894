"""The link between a rank of one pipeline stage and the same rank of the next, on CPU: one TCP connection.

Stage s sends the residual stream after its layers, (tokens, hidden), to
stage s + 1 once per step; the receiver knows the shape and dtype from the
step, so a message is an 8-byte length and the tensor's bytes. Stages are on
different nodes in general, so this goes over the network, not the
shared-memory segment a TP group uses.

Plain TCP rather than a gloo process group: a rank must be able to stop
waiting on its peer at once when the group loses a rank (abort), and gloo
cannot interrupt an operation under way when the peer is alive but will not
send (its own step was aborted). `abort` shuts the socket down, which
releases a send or recv blocked on it from another thread, on this side and
the peer's; a peer that dies closes it too. GPU stages use NCCL instead
(NcclCommunicator.send/recv).
"""
from __future__ import annotations

import socket
import struct

import torch

from raytp.cluster.comm import CollectiveAborted, Communicator, GlooRendezvous

_LENGTH = struct.Struct("<Q")


def listen(host: str) -> tuple[socket.socket, GlooRendezvous]:
    """The sending side: a listening socket on a free port of host, and where the receiver connects."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind((host, 0))
    server.listen(1)
    return server, GlooRendezvous(host, server.getsockname()[1])


class SocketLink(Communicator):
    """A link of two: rank 0 sends (it listened: `server`), rank 1 receives (it connects to `rendezvous`)."""

    def __init__(self, rendezvous: GlooRendezvous, rank: int, timeout_s: float = 60.0,
                 server: socket.socket | None = None):
        self.rank, self.world_size = rank, 2
        if rank == 0:
            server.settimeout(timeout_s)
            try:
                self._sock, _ = server.accept()
            finally:
                server.close()
        else:
            self._sock = socket.create_connection((rendezvous.host, rendezvous.port), timeout=timeout_s)
        self._sock.settimeout(None)  # blocking: a step waits as long as its peer computes; abort() releases it
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.aborted = False

    def send(self, tensor: torch.Tensor, dst: int = 1) -> None:
        data = tensor.detach().contiguous().view(-1).view(torch.uint8).numpy()  # the tensor's bytes, no copy
        # Length and bytes in one call, so a small message (a step's tokens, a decode step's rows) is one segment:
        # the peer is woken once, not once for the length and again for the bytes.
        buffers = [memoryview(_LENGTH.pack(data.nbytes)), memoryview(data).cast("B")]
        try:
            while buffers:
                sent = self._sock.sendmsg(buffers)
                while buffers and sent >= len(buffers[0]):  # a large message may go out over several calls
                    sent -= len(buffers.pop(0))
                if sent:
                    buffers[0] = buffers[0][sent:]
        except OSError as err:
            raise self._failed(err) from None

    def recv(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        assert tensor.is_contiguous()
        header = bytearray(_LENGTH.size)
        self._read_into(memoryview(header))
        (length,) = _LENGTH.unpack(header)
        data = tensor.view(-1).view(torch.uint8).numpy()
        if length != data.nbytes:
            raise RuntimeError(f"stage link: the peer sent {length} bytes where this step expects {data.nbytes}")
        self._read_into(memoryview(data).cast("B"))
        return tensor

    def _read_into(self, view: memoryview) -> None:
        while len(view):
            try:
                n = self._sock.recv_into(view)
            except OSError as err:
                raise self._failed(err) from None
            if n == 0:
                raise self._failed(None)
            view = view[n:]

    def _failed(self, err: OSError | None) -> CollectiveAborted:
        if self.aborted:
            return CollectiveAborted(f"stage link rank {self.rank}: aborted")
        return CollectiveAborted(f"stage link rank {self.rank}: the peer closed the connection ({err or 'EOF'})")

    def abort(self) -> None:
        self.aborted = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # releases a blocked send/recv here, and the peer's
        except OSError:
            pass  # closed already

    def close(self) -> None:
        self.abort()
        self._sock.close()

    def all_reduce(self, tensor):
        raise NotImplementedError("a stage link only sends and receives")

    all_gather = broadcast = all_reduce

    def barrier(self) -> None:
        raise NotImplementedError("a stage link only sends and receives")
