"""StepPacer: when the step loop schedules the next step (a fake clock stands in for time)."""
import asyncio

import pytest

from raytp.engine.pacing import MARGIN_RANGE_S, StepPacer, size_class


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_size_classes_are_powers_of_two():
    assert [size_class(n) for n in (0, 1, 2, 3, 4, 7, 8, 255, 256)] == [1, 1, 2, 2, 3, 3, 4, 8, 9]


def test_unknown_size_schedules_at_once_then_waits_until_margin_before_the_expected_end():
    clock = Clock()
    pacer = StepPacer(margin_s=0.004, clock=clock)
    pacer.sent(8)
    assert pacer.slack() == 0.0  # nothing measured yet: schedule ahead at once, as without pacing
    clock.now += 0.020
    pacer.done()
    assert pacer.estimate(8) == pytest.approx(0.020)
    assert pacer.estimate(9) == pytest.approx(0.020)  # same size class (8-15 tokens)
    assert pacer.estimate(16) is None

    pacer.sent(9)
    clock.now += 0.005
    assert pacer.slack() == pytest.approx(0.020 - 0.004 - 0.005)
    clock.now += 0.030  # overdue: schedule now
    assert pacer.slack() == 0.0


def test_estimates_follow_a_moving_duration_and_a_late_start():
    clock = Clock()
    pacer = StepPacer(margin_s=0.0, clock=clock)
    for took in (0.010, 0.020, 0.020, 0.020, 0.020, 0.020, 0.020, 0.020):
        pacer.sent(4)
        clock.now += took
        pacer.done()
    assert 0.019 < pacer.estimate(4) < 0.020
    # A step sent while another ran starts when that one ends, not when it was sent.
    pacer.sent(4)
    clock.now += 0.002
    pacer.sent(4)  # sent ahead, 2 ms into the running step
    clock.now += 0.018
    pacer.done()  # the first one is back: the ranks are on the second from now
    clock.now += 0.003
    assert pacer.slack() == pytest.approx(pacer.estimate(4) - 0.003)


def test_forget_learns_nothing():
    clock = Clock()
    pacer = StepPacer(clock=clock)
    pacer.sent(32)
    pacer.sent(32)
    clock.now += 5.0
    pacer.forget()
    assert pacer.estimate(32) is None and pacer.slack() == 0.0


def test_wait_for_slot_returns_when_the_step_ends_before_the_estimate():
    async def go():
        clock = Clock()
        pacer = StepPacer(margin_s=0.0, clock=clock)
        pacer.sent(16)
        clock.now += 30.0
        pacer.done()
        pacer.sent(16)  # expected to take 30 s, by the fake clock that stands still
        loop = asyncio.get_running_loop()
        step = loop.create_future()
        loop.call_later(0.05, step.set_result, "tokens")
        t0 = loop.time()
        await pacer.wait_for_slot(step)
        assert step.done() and loop.time() - t0 < 5.0

    asyncio.run(go())


def test_margin_follows_how_early_held_back_steps_reach_the_ranks():
    clock = Clock()
    pacer = StepPacer(margin_s=0.004, clock=clock)
    pacer.sent(8)
    clock.now += 0.020
    pacer.done(lead_seconds=-0.050)  # sent at once (nothing measured yet): says nothing about the margin
    assert pacer.margin_s == 0.004

    async def step_behind_another(lead_seconds: float, ends_early: bool = False) -> None:
        running = asyncio.get_running_loop().create_future()
        if ends_early:
            running.set_result(None)  # its result is back before the margin runs out
        pacer.sent(8)
        ahead = pacer.margin_s + 1e-4  # the loop waits until 0.1 ms (real time) before the margin
        clock.now += 0.020 - ahead
        await pacer.wait_for_slot(running)
        pacer.sent(8)
        clock.now += ahead
        pacer.done()  # 20 ms, as expected
        clock.now += 0.020
        pacer.done(lead_seconds)

    async def run() -> None:
        # Trips of 4 to 8 ms there and back, evenly spread: a step sent `margin` before the loop expects the end
        # arrives margin - trip early (late while the margin is short). The margin settles where one step in five
        # is late: around the trips' 80th percentile, 7.4 ms (it moves up and down by steps: the mean is checked).
        margins = []
        for i in range(400):
            trip = 0.004 + 0.004 * ((i * 7) % 20) / 19
            await step_behind_another(pacer.margin_s - trip)
            margins.append(pacer.margin_s)
        assert 0.0068 < sum(margins[200:]) / 200 < 0.008
        for _ in range(400):  # far too early: it shrinks, never below the floor
            await step_behind_another(0.5)
        assert pacer.margin_s == MARGIN_RANGE_S[0]
        # A step whose predecessor ended before the margin ran out: its lateness is the estimate's, not the margin's.
        await step_behind_another(-0.5, ends_early=True)
        assert pacer.margin_s == MARGIN_RANGE_S[0]
        # The loop held back, then had nothing to send; the next step goes to idle ranks, which wait for it.
        running = asyncio.get_running_loop().create_future()
        pacer.sent(8)
        clock.now += 0.020 - pacer.margin_s - 1e-4
        await pacer.wait_for_slot(running)
        clock.now += pacer.margin_s + 1e-4
        pacer.done()
        pacer.sent(8)
        clock.now += 0.020
        pacer.done(lead_seconds=-0.5)
        assert pacer.margin_s == MARGIN_RANGE_S[0]

    asyncio.run(run())
