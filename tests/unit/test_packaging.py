"""pyproject.toml: the torch range admits only torches raytp runs on, and each CUDA major has its extra."""
import pathlib
import tomllib

import pytest
import torch
from packaging.requirements import Requirement

pytestmark = pytest.mark.timeout(30)

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def requirement(reqs: list[str], name: str) -> Requirement:
    (req,) = [Requirement(r) for r in reqs if Requirement(r).name == name]
    return req


def test_torch_range_starts_at_the_first_sdpa_with_enable_gqa():
    # reference attention calls scaled_dot_product_attention(..., enable_gqa=True): torch 2.4 raises TypeError.
    q, kv = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8)  # (B, H, S, D): 4 query heads share 2 KV heads
    assert torch.nn.functional.scaled_dot_product_attention(q, kv, kv, enable_gqa=True).shape == q.shape
    spec = requirement(PROJECT["dependencies"], "torch").specifier
    assert "2.4.1" not in spec  # no enable_gqa (torch 2.5 added it)
    assert "2.5.0" in spec and "2.13.0" in spec  # 2.13.0: the CPU build README installs


@pytest.mark.parametrize("extra,cupy", [("cuda12", "cupy-cuda12x"), ("cuda13", "cupy-cuda13x")])
def test_one_extra_per_cuda_major(extra, cupy):
    names = {Requirement(r).name for r in PROJECT["optional-dependencies"][extra]}
    assert names == {cupy, "nvidia-ml-py"}
    assert f'".[{extra}]"' in (ROOT / "README.md").read_text()


def test_tests_get_nvidia_ml_py():
    assert requirement(PROJECT["optional-dependencies"]["test"], "nvidia-ml-py")
