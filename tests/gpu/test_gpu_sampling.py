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
    # 128k logits rounded to bf16 may tie at the maximum: top_k=1 may take any of the tied tokens.
    rounded = logits.bfloat16()
    bf16 = sample(rounded, [SamplingParams(top_k=1, seed=1)] * 8, [0] * 8, torch.Generator())
    assert all(rounded[i, t] == rounded[i].max() for i, t in enumerate(bf16))


def test_penalties_bias_ban_and_logprobs_on_cuda_equal_cpu():
    from raytp.sampling import RowContext, gather_logprobs, process_logits

    logits = torch.randn(4, 128256, generator=torch.Generator().manual_seed(1)) * 3  # (B, V) on the CPU
    params = [SamplingParams(temperature=0.0, presence_penalty=1.0, frequency_penalty=0.5, repetition_penalty=1.3,
                             logit_bias={5: 3.0, 128000: -100.0}), SamplingParams(temperature=0.0)] * 2
    contexts = [RowContext(prompt_ids=[1, 2, 3, 128255], output_ids=[9, 9, 4], banned_ids=(7, 11)), RowContext()] * 2
    on_cpu, on_gpu = process_logits(logits, params, contexts), process_logits(logits.cuda(), params, contexts)
    assert on_gpu.is_cuda and torch.allclose(on_gpu.cpu(), on_cpu, atol=1e-5)
    tokens = sample(logits.cuda(), params, [0] * 4, torch.Generator(), contexts)
    assert tokens == sample(logits, params, [0] * 4, torch.Generator(), contexts)
    cpu_lp, gpu_lp = gather_logprobs(logits, tokens, 5), gather_logprobs(logits.cuda(), tokens, 5)
    for a, b in zip(cpu_lp, gpu_lp):
        assert abs(a.logprob - b.logprob) < 1e-4 and [t for t, _ in a.top] == [t for t, _ in b.top]


def test_grammar_mask_on_cuda_equals_cpu():
    """The packed bitmask a step carries (CPU int32) is unpacked on the logits' device; the masked logits and the
    tokens equal the CPU's, and only tokens the mask allows are sampled."""
    from raytp.sampling import RowContext, process_logits
    from raytp.engine.structured import apply_token_bitmask, bitmask_words

    vocab = 128256
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(2)) * 3  # (B, V) on the CPU
    mask = torch.randint(-2**31, 2**31 - 1, (bitmask_words(vocab),), dtype=torch.int32,
                         generator=torch.Generator().manual_seed(3))  # random allowed tokens
    params = [SamplingParams(temperature=0.0, logit_bias={5: 100.0}), SamplingParams(temperature=0.0),
              SamplingParams(temperature=1.0, seed=4)]
    contexts = [RowContext(allowed_tokens=mask), RowContext(), RowContext(allowed_tokens=mask)]
    on_cpu, on_gpu = process_logits(logits, params, contexts), process_logits(logits.cuda(), params, contexts)
    assert torch.equal(on_gpu.cpu().isinf(), on_cpu.isinf()) and torch.allclose(on_gpu.cpu(), on_cpu)
    allowed = torch.zeros(1, vocab)
    apply_token_bitmask(allowed, [0], [mask])
    tokens = sample(logits.cuda(), params, [0] * 3, torch.Generator(), contexts)
    # The greedy rows equal the CPU's; the seeded row draws from CUDA's generator, which is not the CPU's: the same
    # seed gives the same token again on CUDA, one the mask allows.
    assert tokens[:2] == sample(logits, params, [0] * 3, torch.Generator(), contexts)[:2]
    assert tokens == sample(logits.cuda(), params, [0] * 3, torch.Generator(), contexts)
    assert allowed[0, tokens[0]] == 0 and allowed[0, tokens[2]] == 0
