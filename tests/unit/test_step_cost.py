"""The pacing's attention cost learnt from step times (raytp/engine/step_cost.py)."""
from __future__ import annotations

import random

import pytest

from raytp.engine.step_cost import MAX_FACTOR, MIN_CHUNK_STEPS, StepCostModel, chunk_pairs

FLOP_SHARE = 1 / 3072


def steps_of_a_long_prompt_joining(seconds_of, decode_rows: int = 12, chunk: int = 200, prompt: int = 1800):
    """(tokens, pairs, seconds) of steps that decode `decode_rows` streams, some alone, some beside a chunk of a long
    prompt at every depth, timed by seconds_of(tokens, pairs)."""
    steps = []
    for context in range(0, prompt, chunk):
        for tokens, pairs in ((decode_rows, 0.0), (decode_rows + chunk, chunk_pairs(context, chunk, None))):
            steps.append((tokens, pairs, seconds_of(tokens, pairs)))
    return steps


def test_chunk_pairs_are_the_causal_keys_of_each_token_at_most_the_window():
    assert chunk_pairs(0, 1, None) == 1  # a lone token sees itself
    assert chunk_pairs(0, 4, None) == 1 + 2 + 3 + 4
    assert chunk_pairs(100, 4, None) == 4 * 100 + 1 + 2 + 3 + 4
    assert chunk_pairs(100, 4, 8) == 4 * 8


def test_the_flop_share_until_enough_steps_carried_prompt_chunks():
    model = StepCostModel(FLOP_SHARE)
    assert model.cost_per_pair == FLOP_SHARE
    for _ in range(50):  # decode steps alone say nothing of a chunk's attention
        assert model.observe(12, 0.0, 0.013) == FLOP_SHARE
    for i in range(MIN_CHUNK_STEPS - 1):
        assert model.observe(212, chunk_pairs(200 * i, 200, None), 0.05 + i * 0.004) == FLOP_SHARE


def test_the_learnt_cost_is_the_per_pair_time_over_the_per_token_time():
    """Steps timed as 5 ms + 0.1 ms a token + 0.1 us a pair, give or take 3%: a pair costs 1e-3 tokens (3.1x the
    FLOP share)."""
    per_token, per_pair = 1e-4, 1e-7
    model = StepCostModel(FLOP_SHARE)
    rng = random.Random(0)
    for step in steps_of_a_long_prompt_joining(lambda t, p: (0.005 + per_token * t + per_pair * p)
                                               * rng.uniform(0.97, 1.03)):
        cost = model.observe(*step)
    assert cost == pytest.approx(per_pair / per_token, rel=0.15)


@pytest.mark.parametrize("per_pair,expected", [(1e-9, FLOP_SHARE), (1e-5, MAX_FACTOR * FLOP_SHARE)])
def test_the_learnt_cost_stays_between_the_flop_share_and_max_factor_times_it(per_pair, expected):
    model = StepCostModel(FLOP_SHARE)
    for step in steps_of_a_long_prompt_joining(lambda t, p: 0.005 + 1e-4 * t + per_pair * p):
        cost = model.observe(*step)
    assert cost == pytest.approx(expected)


def test_steps_that_do_not_determine_a_per_token_time_keep_the_flop_share():
    """Every step the same length whatever it holds: no positive per-token time, nothing learnt."""
    model = StepCostModel(FLOP_SHARE)
    for step in steps_of_a_long_prompt_joining(lambda t, p: 0.040):
        cost = model.observe(*step)
    assert cost == FLOP_SHARE
