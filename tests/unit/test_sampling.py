"""SamplingParams validation and the sampler: greedy, top-k, top-p, temperature, stateless seeds."""
import math

import pytest
import torch

from raytp.sampling import SamplingParams, sample

pytestmark = pytest.mark.timeout(60)

V = 50


def random_logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3  # (rows, V)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_greedy_is_argmax():
    logits = random_logits(8)
    params = [SamplingParams(temperature=0.0)] * 8
    assert sample(logits, params, [0] * 8, gen()) == logits.argmax(dim=-1).tolist()
    # A tiny temperature counts as greedy too, and so does a seeded greedy request.
    params = [SamplingParams(temperature=1e-7), SamplingParams(temperature=0.0, seed=3)] * 4
    assert sample(logits, params, list(range(8)), gen()) == logits.argmax(dim=-1).tolist()


def test_greedy_accepts_half_precision_logits():
    logits = random_logits(4).to(torch.bfloat16)
    assert sample(logits, [SamplingParams(temperature=0.0)] * 4, [0] * 4, gen()) == logits.float().argmax(-1).tolist()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_top_k_1_equals_greedy(temperature):
    logits = random_logits(16, seed=1)
    params = [SamplingParams(temperature=temperature, top_k=1)] * 16
    for seed in range(5):
        assert sample(logits, params, [0] * 16, gen(seed)) == logits.argmax(dim=-1).tolist()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_tiny_top_p_equals_greedy(temperature):
    logits = random_logits(16, seed=2)
    params = [SamplingParams(temperature=temperature, top_p=1e-6)] * 16
    for seed in range(5):
        assert sample(logits, params, [0] * 16, gen(seed)) == logits.argmax(dim=-1).tolist()


def test_top_k_and_top_p_keep_only_the_head():
    # probs 0.5, 0.3, 0.15, 0.05 (already sorted); the rest impossible.
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(400, 4)  # (400, 4)
    top_k2 = sample(logits, [SamplingParams(top_k=2, seed=9)] * 400, list(range(400)), gen())
    assert set(top_k2) == {0, 1}
    # top_p=0.7: 0.5 alone is short of 0.7, 0.5 + 0.3 reaches it: tokens 0 and 1 stay.
    top_p = sample(logits, [SamplingParams(top_p=0.7, seed=9)] * 400, list(range(400)), gen())
    assert set(top_p) == {0, 1}
    everything = sample(logits, [SamplingParams(seed=9)] * 400, list(range(400)), gen())
    assert set(everything) == {0, 1, 2, 3}


def test_seeded_sampling_is_stateless():
    """Same (seed, index) -> same token, wherever the row sits and whatever else is in the batch."""
    logits = random_logits(6, seed=3)
    row = logits[2]
    params = SamplingParams(temperature=1.0, seed=1234)
    alone = [sample(row.unsqueeze(0), [params], [i], gen(0))[0] for i in range(40)]
    for i in range(40):
        # The row at another position, next to unseeded rows (which draw from the shared
        # generator first) and rows with other seeds; the shared generator in another state.
        batch = torch.stack([logits[0], logits[1], logits[3], row, logits[4]])
        batch_params = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, seed=5),
                        SamplingParams(temperature=1.0), params, SamplingParams(top_k=3)]
        out = sample(batch, batch_params, [i + 3, 0, i, i, 17], gen(100 + i))
        assert out[3] == alone[i]
    # The index matters (the n-th token differs from the m-th), and so does the seed.
    assert len(set(alone)) > 4
    other_seed = [sample(row.unsqueeze(0), [SamplingParams(temperature=1.0, seed=1235)], [i], gen(0))[0]
                  for i in range(40)]
    assert other_seed != alone


def test_unseeded_sampling_uses_the_shared_generator():
    logits = random_logits(4, seed=4)
    params = [SamplingParams(temperature=1.0)] * 4
    draws = lambda g: [tuple(sample(logits, params, [0] * 4, g)) for _ in range(20)]
    assert draws(gen(7)) == draws(gen(7))
    assert draws(gen(7)) != draws(gen(8))


@pytest.mark.parametrize(
    "temperature, expected",
    [
        (1.0, 0.75),  # softmax([0, log 3]) = (1/4, 3/4)
        (0.5, 0.90),  # 3**2 / (1 + 3**2)
        (2.0, math.sqrt(3) / (1 + math.sqrt(3))),  # about 0.634
    ],
)
def test_temperature_distribution(temperature, expected):
    n = 4000
    logits = torch.tensor([0.0, math.log(3.0)]).expand(n, 2)  # (n, 2)
    # One seeded request's first n tokens.
    tokens = sample(logits, [SamplingParams(temperature=temperature, seed=2024)] * n, list(range(n)), gen())
    freq = sum(tokens) / n
    assert expected - 0.03 <= freq <= expected + 0.03, freq


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=2.5), "max_tokens"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(stop=[""]), "stop"),
    ],
)
def test_sampling_params_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field) as err:
        SamplingParams(**kwargs)
    # The message also shows the bad value.
    assert repr(next(iter(kwargs.values()))) in str(err.value)


def test_sampling_params_defaults_and_normalization():
    p = SamplingParams(stop="###")
    assert p.stop == ["###"] and p.stop_token_ids == [] and p.max_tokens == 16 and not p.greedy
    assert SamplingParams(temperature=0.0).greedy
    assert SamplingParams(top_k=0).top_k == 0 and SamplingParams(top_k=-1).top_k == -1


def test_mixed_filters_in_one_batch():
    """Rows with top-k, top-p, both and neither sampled together: each keeps its own head."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(400, 4)  # (400, 4)
    kinds = [SamplingParams(top_k=2, seed=1), SamplingParams(top_p=0.7, seed=2),
             SamplingParams(top_k=3, top_p=0.6, seed=3), SamplingParams(seed=4)]
    params = [kinds[i % 4] for i in range(400)]
    out = sample(logits, params, list(range(400)), gen())
    assert set(out[0::4]) == {0, 1} and set(out[1::4]) == {0, 1}
    assert set(out[2::4]) == {0, 1} and set(out[3::4]) == {0, 1, 2, 3}


@pytest.mark.parametrize("scale", [8.0, 3.0, 0.05], ids=["peaked", "medium", "flat"])
def test_top_p_among_candidates_keeps_what_the_sort_keeps(scale):
    """On a real vocabulary's size, top-p (with and without top-k) looks among the largest logits first; its kept
    tokens are the full sort's, both where the nucleus ends among them (peaked rows) and where it does not (flat
    rows: the sort decides), whether the first candidates or the next decide."""
    from raytp.sampling import TOP_P_CANDIDATES, _filter_top_k_top_p, _filter_top_k_top_p_sorted

    first, last = TOP_P_CANDIDATES[0], TOP_P_CANDIDATES[-1]
    vocab, rows = 49_152, 8
    logits = torch.randn(rows, vocab, generator=gen(7)) * scale  # (rows, vocab)
    top_k = torch.tensor([-1, 0, 40, first, first + 1, 5000, -1, 3])
    top_p = torch.tensor([0.9, 0.5, 0.95, 0.99, 0.99, 0.8, 1e-6, 0.7])
    fast = _filter_top_k_top_p(logits, top_k, top_p)
    assert torch.equal(fast, _filter_top_k_top_p_sorted(logits, top_k, top_p))
    kept = torch.isfinite(fast).sum(dim=1)
    assert kept[6] == 1 and kept[7] <= 3 and kept[2] <= 40
    # Row 0 (top-p alone): its nucleus among the first candidates, among the last, or past them.
    assert {8.0: kept[0] < first, 3.0: first < kept[0] < last, 0.05: kept[0] > last}[scale]
