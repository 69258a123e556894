"""NVLink topology check against a made-up 8-GPU box: two NVLink islands, GPUs 0-3 and 4-7."""
import logging

import pytest

from raytp.topology import TopologyError, check_nvlink, missing_nvlink_pairs

pytestmark = pytest.mark.timeout(30)


def two_islands(a: int, b: int) -> bool:
    """NVLink between a and b iff both are in 0-3 or both in 4-7."""
    return a // 4 == b // 4


CROSS = [(2, 4), (2, 5), (3, 4), (3, 5)]


def test_one_island_has_no_missing_pairs():
    assert missing_nvlink_pairs([0, 1, 2, 3], two_islands) == []
    assert missing_nvlink_pairs([7, 5, 4, 6], two_islands) == []
    assert missing_nvlink_pairs([3], two_islands) == []


def test_spanning_islands_reports_the_cross_pairs():
    assert missing_nvlink_pairs([2, 3, 4, 5], two_islands) == CROSS
    # Order of the ids does not matter.
    assert missing_nvlink_pairs([5, 4, 3, 2], two_islands) == CROSS
    assert len(missing_nvlink_pairs(list(range(8)), two_islands)) == 16


def test_check_nvlink_refuses_naming_the_pairs():
    with pytest.raises(TopologyError) as err:
        check_nvlink([2, 3, 4, 5], refuse=True, connected=two_islands)
    msg = str(err.value)
    assert str(CROSS) in msg and "require_nvlink" in msg and "[2, 3, 4, 5]" in msg


def test_check_nvlink_warns_and_returns(caplog):
    with caplog.at_level(logging.WARNING, logger="raytp.topology"):
        assert check_nvlink([2, 3, 4, 5], refuse=False, connected=two_islands) is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(CROSS) in warnings[0].getMessage()


def test_check_nvlink_is_quiet_on_one_island(caplog):
    with caplog.at_level(logging.INFO, logger="raytp.topology"):
        check_nvlink([0, 1, 2, 3], refuse=True, connected=two_islands)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("NVLink-connected" in r.getMessage() for r in caplog.records)


def test_check_nvlink_without_nvml_warns(monkeypatch, caplog):
    # No NVML here (CPU machine): the check says it cannot tell and goes on, even with refuse=True.
    import raytp.topology as topology

    def no_nvml():
        raise ImportError("No module named 'pynvml'")

    monkeypatch.setattr(topology, "nvml_nvlink_connected", no_nvml)
    with caplog.at_level(logging.WARNING, logger="raytp.topology"):
        check_nvlink([0, 4], refuse=True)
    assert any("cannot read the NVLink topology" in r.getMessage() for r in caplog.records)
