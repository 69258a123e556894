"""When to schedule the next step: just before the running one ends.

The step loop sends step N+1 to the ranks before step N is done, so that the
ranks go straight from one to the next. Scheduling N+1 the moment N starts
(as the loop used to) fixes its batch a whole step early: a request that
arrives while N runs waits for N and for N+1, which was already sent without
it, and only then gets its prefill, about one step of time to first token
lost at every arrival. So the loop waits until N is expected to be
`margin_s` from its end and schedules N+1 then. The expectation is the
duration recently measured for steps of about the same size (same power of
two of tokens); a size with no measurement yet, or a step that ends early,
is scheduled at once, as before.

The margin is learnt: it must cover the trip of a step to the ranks and of the
result back (the loop sees a step end when its result is back), which over
Ray on a loaded 2-core machine took 1.5-5 ms each way. Ranks that get steps
through a transport say how early each one arrived (StepResult.lead_seconds,
< 0 if they waited for it). After each step that the loop held back until
the margin ran out (the running step still running), the margin grows a
little if the step was late and shrinks a quarter as much if it was not: it
settles where one held-back step in five is late. (Every ms of margin
costs a request that arrives meanwhile up to a step of waiting, so the margin
tracks a quantile of the trip rather than its worst case; a mean would be
pulled up by the rare step whose duration was misjudged by tens of ms.)
"""
from __future__ import annotations

import asyncio
import time
from collections import deque

from raytp.engine.step import size_class

# The margin to start from (and the in-process executor's, whose ranks do not report their lead): what the next step
# needs before the ranks can start it, scheduling, the send to every rank and their unpacking (~1 ms in-process).
# Ranks that wait this long for a step lose as much as they would have without scheduling ahead; being early costs
# only the wait described above.
DEFAULT_MARGIN_S = 0.004
EWMA_WEIGHT = 0.3  # of the newest measurement: tracks the slow growth of attention cost as contexts grow
MARGIN_UP_S, MARGIN_DOWN_S = 0.0004, 0.0001  # after a late / a timely held-back step: 1 in 5 late at equilibrium
MARGIN_RANGE_S = (0.001, 0.030)


class StepPacer:
    """Measures how long steps take on the ranks and says how long the loop may wait before scheduling the next.

    The loop tells it when it sends a step and when a step's result is back; which step the ranks are on, and since
    when, follows: a step sent while none is out starts when sent, one sent behind another when that one's result
    is back."""

    def __init__(self, margin_s: float = DEFAULT_MARGIN_S, clock=time.monotonic):
        self.margin_s, self._clock = margin_s, clock
        self._seconds: dict[int, float] = {}  # size class -> smoothed duration
        # The steps sent and not back, oldest (running) first: (tokens, whether the margin decided when it was sent)
        self._sent: deque[tuple[int, bool]] = deque()
        self._running_since: float | None = None
        self._held_back = False  # the loop waited out the margin before scheduling the step it sends next

    def estimate(self, num_tokens: int) -> float | None:
        return self._seconds.get(size_class(num_tokens))

    def sent(self, num_tokens: int) -> None:
        """The loop sent a step of num_tokens tokens to the ranks."""
        if not self._sent:
            self._running_since = self._clock()
        self._sent.append((num_tokens, self._held_back))
        self._held_back = False

    def done(self, lead_seconds: float | None = None) -> None:
        """The oldest step's result is here: learn its duration, and from how early it reached the ranks (if
        they say) the margin; the ranks went on to the next one, if sent."""
        now = self._clock()
        num_tokens, held_back = self._sent.popleft()
        k, took = size_class(num_tokens), now - self._running_since
        old = self._seconds.get(k)
        self._seconds[k] = took if old is None else (1 - EWMA_WEIGHT) * old + EWMA_WEIGHT * took
        self._running_since = now if self._sent else None
        if not self._sent:  # a hold-back that sent nothing is over: the next step goes to idle ranks
            self._held_back = False
        if held_back and lead_seconds is not None:  # only then did the margin decide when it was sent
            low, high = MARGIN_RANGE_S
            self.margin_s = min(high, max(low, self.margin_s + (MARGIN_UP_S if lead_seconds < 0 else -MARGIN_DOWN_S)))

    def forget(self) -> None:
        """The steps sent were discarded (their group failed): nothing to learn from them."""
        self._sent.clear()
        self._running_since = None
        self._held_back = False

    def slack(self) -> float:
        """Seconds the loop can still wait before scheduling the next step (0: schedule now)."""
        if not self._sent:
            return 0.0
        expected = self.estimate(self._sent[0][0])
        if expected is None:
            return 0.0
        return max(0.0, self._running_since + expected - self.margin_s - self._clock())

    async def wait_for_slot(self, running: asyncio.Future) -> None:
        """Wait until the running step is about to end, or ended."""
        delay = self.slack()
        if delay > 0:
            done, _ = await asyncio.wait({running}, timeout=delay)
            # Only if the wait ran out did the margin decide when the next step goes (a step that ended early says
            # its estimate was long, not that the margin was short).
            self._held_back = not done
