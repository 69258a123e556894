"""The NVLink check against a stand-in NVML that mirrors nvidia-ml-py's names and signatures.

Boxes: 8 GPUs in two NVLink islands (0-3, 4-7), 8 GPUs on PCIe only, and a
machine without a GPU driver (the real pynvml, here). The stand-in's names
and signatures are checked against the installed nvidia-ml-py, and so is
every NVML name raytp's code uses, so a name nvidia-ml-py does not define
(such as nvmlDeviceGetNvLinkRemotePciInfo_v2) fails here, not on the first
NVLink node.
"""
import ast
import inspect
import pathlib

import pytest

from raytp.cluster.topology import TopologyError, check_nvlink, missing_nvlink_pairs

pynvml = pytest.importorskip("pynvml", reason="nvidia-ml-py is in the test extra")

pytestmark = pytest.mark.timeout(30)

RAYTP = pathlib.Path(__file__).resolve().parents[2] / "raytp"


class StandInNVML:
    """The part of pynvml that raytp uses, answering for a box of GPUs named GPU-0.. with `islands` of NVLink."""

    NVML_P2P_CAPS_INDEX_NVLINK = pynvml.NVML_P2P_CAPS_INDEX_NVLINK
    NVML_P2P_STATUS_OK = pynvml.NVML_P2P_STATUS_OK

    class NVMLError(Exception):
        pass

    def __init__(self, islands: list[list[int]]):
        self.island_of = {f"GPU-{g}": i for i, island in enumerate(islands) for g in island}
        self.initialized = 0

    def nvmlInit(self):
        self.initialized += 1

    def nvmlShutdown(self):
        self.initialized -= 1

    def nvmlDeviceGetHandleByUUID(self, uuid):
        if uuid not in self.island_of:
            raise self.NVMLError("Not Found")
        return uuid

    def nvmlDeviceGetP2PStatus(self, device1, device2, p2pIndex):
        assert p2pIndex == self.NVML_P2P_CAPS_INDEX_NVLINK
        same = self.island_of[device1] == self.island_of[device2]
        return self.NVML_P2P_STATUS_OK if same else pynvml.NVML_P2P_STATUS_NOT_SUPPORTED


def two_islands() -> StandInNVML:
    return StandInNVML([[0, 1, 2, 3], [4, 5, 6, 7]])


def pcie_only() -> StandInNVML:
    return StandInNVML([[g] for g in range(8)])


def gpus(*ids: int) -> list[str]:
    return [f"GPU-{g}" for g in ids]


def nvml_names_used_by_raytp() -> set[str]:
    """Every `nvml.X` and `pynvml.X` attribute in raytp's source."""
    names = set()
    for path in RAYTP.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ("nvml", "pynvml"):
                names.add(node.attr)
    return names


def test_every_nvml_name_raytp_uses_exists_in_nvidia_ml_py():
    used = nvml_names_used_by_raytp()
    assert {"nvmlDeviceGetP2PStatus", "nvmlDeviceGetHandleByUUID", "NVML_P2P_CAPS_INDEX_NVLINK"} <= used
    assert sorted(n for n in used if not hasattr(pynvml, n)) == []


def test_the_stand_in_mirrors_nvidia_ml_py():
    for name in nvml_names_used_by_raytp():
        fake, real = getattr(StandInNVML, name), getattr(pynvml, name)
        if callable(real) and not isinstance(real, type):
            params = list(inspect.signature(fake).parameters)[1:]  # without self
            assert params == list(inspect.signature(real).parameters), name
        elif not isinstance(real, type):
            assert fake == real, name


def test_one_island_is_all_nvlink():
    nvml = two_islands()
    assert missing_nvlink_pairs(gpus(0, 1, 2, 3), nvml) == []
    assert missing_nvlink_pairs(gpus(7, 5, 4, 6), nvml) == []
    assert missing_nvlink_pairs(gpus(3), nvml) == []
    assert nvml.initialized == 0  # nvmlShutdown after every nvmlInit


def test_pairs_across_islands_are_missing_by_rank():
    # ranks 0..3 have GPUs 2, 3, 4, 5: ranks 0-1 and 2-3 are NVLinked, across is not
    assert missing_nvlink_pairs(gpus(2, 3, 4, 5), two_islands()) == [(0, 2), (0, 3), (1, 2), (1, 3)]
    assert len(missing_nvlink_pairs(gpus(*range(8)), two_islands())) == 16


def test_pcie_only_box_misses_every_pair():
    assert len(missing_nvlink_pairs(gpus(*range(8)), pcie_only())) == 28
    assert missing_nvlink_pairs(gpus(0, 1), pcie_only()) == [(0, 1)]


def test_check_refuses_naming_ranks_and_gpus():
    with pytest.raises(TopologyError) as err:
        check_nvlink(gpus(3, 4), refuse=True, nvml=two_islands())
    assert "rank 0 (GPU-3) - rank 1 (GPU-4)" in str(err.value) and "require_nvlink" in str(err.value)


def test_check_warns_without_refusing():
    warning = check_nvlink(gpus(0, 1, 4, 5), refuse=False, nvml=two_islands())
    assert "rank 1 (GPU-1) - rank 2 (GPU-4)" in warning and "PCIe" in warning
    assert check_nvlink(gpus(4, 5, 6, 7), refuse=True, nvml=two_islands()) is None


def test_an_nvml_error_means_unknown_not_refused():
    nvml = two_islands()
    warning = check_nvlink(["GPU-0", "MIG-1"], refuse=True, nvml=nvml)
    assert warning.startswith("cannot read the NVLink topology from NVML (Not Found)")
    assert nvml.initialized == 0


def test_real_nvml_without_a_driver_is_unknown():
    # This machine has nvidia-ml-py but no NVIDIA driver: nvmlInit raises NVMLError_LibraryNotFound.
    try:
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        pytest.skip("this machine has an NVIDIA driver")
    except pynvml.NVMLError:
        pass
    warning = check_nvlink(gpus(0, 1), refuse=True)
    assert warning.startswith("cannot read the NVLink topology from NVML")
