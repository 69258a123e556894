"""Mapping the GPU ids Ray gives a rank to a torch device index: indices, UUIDs, MIG ids."""
import pytest

from raytp.cluster.devices import GpuIdError, cuda_device_index

pytestmark = pytest.mark.timeout(30)

UUID_A = "GPU-8f1c2a3b-1111-2222-3333-444455556666"
UUID_B = "GPU-0d9e8f7a-aaaa-bbbb-cccc-ddddeeeeffff"
MIG = "MIG-5c6b7a89-0123-4567-89ab-cdef01234567"


def test_ray_narrows_cuda_visible_devices_to_the_rank_s_gpu():
    assert cuda_device_index(["3"], "3") == 0
    assert cuda_device_index([UUID_B], UUID_B) == 0
    assert cuda_device_index([MIG], MIG) == 0


def test_position_in_cuda_visible_devices_not_the_id():
    assert cuda_device_index(["6"], "4,6,7") == 1
    assert cuda_device_index([UUID_B], f"{UUID_A},{UUID_B}") == 1
    assert cuda_device_index([MIG], f"{UUID_A}, {MIG}") == 1


def test_without_cuda_visible_devices_an_index_is_the_device():
    assert cuda_device_index(["5"], None) == 5


def test_without_cuda_visible_devices_a_uuid_cannot_be_placed():
    for gpu in (UUID_A, MIG):
        with pytest.raises(GpuIdError, match="CUDA_VISIBLE_DEVICES is not set"):
            cuda_device_index([gpu], None)


def test_an_id_missing_from_cuda_visible_devices_is_a_clear_error():
    with pytest.raises(GpuIdError, match=r"GPU 'GPU-0d9e.*not in CUDA_VISIBLE_DEVICES='GPU-8f1c"):
        cuda_device_index([UUID_B], UUID_A)


def test_one_gpu_per_rank():
    with pytest.raises(GpuIdError, match=r"runs on one GPU, but Ray gave it 2"):
        cuda_device_index(["0", "1"], "0,1")


def test_outside_ray_the_first_visible_device():
    assert cuda_device_index([], None) == 0
    assert cuda_device_index([], "2,3") == 0


def test_a_rank_s_calls_run_with_its_gpu_current_on_the_thread_that_runs_them(monkeypatch, tmp_path):
    """CUDA's current device is per thread, and Ray runs a rank's calls on threads of its own: every call that
    touches the device enters the rank's GPU itself (here a CPU rank posing as one on GPU 3)."""
    import contextlib
    import threading

    import torch

    from raytp.cluster.worker import TPWorker, throwaway_steps
    from tests.helpers import write_llama

    entered = []

    @contextlib.contextmanager
    def device(index):
        entered.append((threading.current_thread().name, index))
        yield

    monkeypatch.setattr(torch.cuda, "device", device)
    worker = TPWorker(0, 1, "cpu", "float32")
    worker.cuda_index = 3
    path = write_llama(tmp_path)
    calls = [("init_communicator", (None,)), ("load", (path,)), ("init_kv_cache", (4, 16)),
             ("execute", (throwaway_steps([5], 16),)), ("shutdown", ())]
    for i, (name, args) in enumerate(calls):
        thread = threading.Thread(target=getattr(worker, name), args=args, name=f"ray-pool-{i}")
        thread.start()
        thread.join()
    assert entered == [(f"ray-pool-{i}", 3) for i in range(len(calls))]
