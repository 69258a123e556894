"""CUDA: the batched sampler on the logits' device (skipped without CUDA)."""
import pytest
import torch

from raytp.sampling import SamplingParams, sample

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_sampling_on_cuda_logits():
    logits = torch.randn(8, 128256, generator=torch.Generator().manual_seed(0)).cuda()
    greedy = [SamplingParams(temperature=0.0)] * 8
    assert sample(logits, greedy, [0] * 8, torch.Generator()) == logits.argmax(-1).tolist()
    seeded = [SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=i) for i in range(8)]
    first = sample(logits, seeded, list(range(8)), torch.Generator())
    assert sample(logits, seeded, list(range(8)), torch.Generator().manual_seed(99)) == first
    bf16 = sample(logits.bfloat16(), [SamplingParams(top_k=1, seed=1)] * 8, [0] * 8, torch.Generator())
    assert bf16 == logits.bfloat16().float().argmax(-1).tolist()
