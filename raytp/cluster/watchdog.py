"""How long a step may take before its group is declared hung: a multiple of what steps of its size took lately.

A fixed limit must cover the slowest step any model could take (a minute),
so a hung rank (SIGSTOP, a stuck collective) stalled every stream for that
long. Steps of one size take about the same time, so the limit is
`multiple` x the slowest recent step of the same size class (the same power
of two of tokens) or a larger one, never under `floor_s` (a step may wait
for the one before it) nor over `ceiling_s` (the configured step_timeout_s,
also the limit for a size never measured). The warm-up step of a new group
gives the first measurement of its size, so larger sizes are covered from
the start.
"""
from __future__ import annotations

from collections import defaultdict, deque

from raytp.engine.step import size_class


class StepWatchdog:
    def __init__(self, multiple: float, floor_s: float, ceiling_s: float, window: int = 64):
        self.multiple, self.floor_s, self.ceiling_s = multiple, floor_s, ceiling_s
        self._recent: dict[int, deque[float]] = defaultdict(lambda: deque(maxlen=window))  # class -> seconds

    def observe(self, num_tokens: int, seconds: float) -> None:
        self._recent[size_class(num_tokens)].append(seconds)

    def limit(self, num_tokens: int) -> float:
        """Seconds a step of num_tokens tokens may take."""
        k = size_class(num_tokens)
        # The nearest measured class at or above this one bounds this step from above.
        measured = sorted((c, max(times)) for c, times in self._recent.items() if c >= k and times)
        if not measured:
            return self.ceiling_s
        return min(self.ceiling_s, max(self.floor_s, self.multiple * measured[0][1]))
