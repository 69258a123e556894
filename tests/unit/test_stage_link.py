"""The CPU link between pipeline stages: tensors arrive whole in any dtype, and a blocked side is released at once
by an abort (its own or its peer's) or by its peer's exit, never left waiting."""
import threading
import time

import pytest
import torch

from raytp.cluster.comm import CollectiveAborted
from tests.helpers import socket_link_pair


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_stream_arrives_whole(dtype):
    sender, receiver = socket_link_pair()
    try:
        for tokens in (1, 300, 4096):  # a decode step up to a long prefill chunk (4096 x 64 x 4 B = 1 MiB)
            sent = torch.randn(tokens, 64).to(dtype)
            thread = threading.Thread(target=sender.send, args=(sent,))
            thread.start()
            got = receiver.recv(torch.empty(tokens, 64, dtype=dtype))
            thread.join()
            assert torch.equal(got, sent)
    finally:
        sender.close()
        receiver.close()


def test_a_step_of_another_size_is_an_error_not_a_desync():
    sender, receiver = socket_link_pair()
    try:
        sender.send(torch.zeros(3, 8))
        with pytest.raises(RuntimeError, match="sent 96 bytes where this step expects 64"):
            receiver.recv(torch.empty(2, 8))
    finally:
        sender.close()
        receiver.close()


@pytest.mark.parametrize("who", ["receiver", "sender"])
def test_an_abort_on_either_side_releases_a_blocked_recv(who):
    sender, receiver = socket_link_pair()
    errors = []

    def wait():
        try:
            receiver.recv(torch.empty(4, 8))
        except CollectiveAborted as err:
            errors.append(err)

    thread = threading.Thread(target=wait)
    thread.start()
    time.sleep(0.1)  # blocked: its peer is alive and sends nothing (its own step was aborted)
    t0 = time.monotonic()
    (receiver if who == "receiver" else sender).abort()
    thread.join(timeout=5)
    assert not thread.is_alive() and errors and time.monotonic() - t0 < 1.0
    sender.close()
    receiver.close()
