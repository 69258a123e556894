"""What a prompt chunk's attention costs against its linears, learnt from the steps the ranks ran.

The scheduler paces a step that carries running streams by charging each prompt-chunk token 1 + cost_per_pair x
(keys it attends to) of the step's token budget (scheduler.py), so that a chunk deep into a long prompt is shorter and
its step takes no longer than one near the prompt's start. The model's FLOP share (ModelArgs.attention_cost_per_pair:
a query-key pair's multiply-adds over a token's in the linears) assumes attention runs at the linears' speed; the
kernels do not. On a Xeon with AMX, bench-58m in bfloat16, a chunk's pair took 3.5x its FLOP share, and the chunks
deep into an 1,800-token prompt made their steps 45% longer than the first one (57 against 39 ms, beside 12 streams).

So the engine fits the ranks' step seconds over the recent steps by least squares,

    seconds ~ fixed + per_token x tokens + per_pair x chunk_pairs,

and, once that many of them carried prompt chunks, uses per_pair / per_token, kept between the FLOP share and
MAX_FACTOR times it (a noisy or ill-determined fit cannot take the pacing far from the model's arithmetic). The fit
follows whatever the machine does: other kernels, another dtype, a neighbour taking memory bandwidth.
"""
from __future__ import annotations

from collections import deque

import numpy as np

WINDOW = 256  # recent steps fitted
MIN_CHUNK_STEPS = 8  # steps with prompt chunks before the fit replaces the FLOP share
MAX_FACTOR = 8.0  # the learnt cost at most this many times the FLOP share


def chunk_pairs(context: int, n: int, sliding_window: int | None) -> float:
    """Query-key pairs of n prompt tokens after `context` computed ones (causal: on average a token sees context +
    (n + 1) / 2 keys; at most sliding_window)."""
    keys = context + (n + 1) / 2
    if sliding_window is not None:
        keys = min(keys, sliding_window)
    return n * keys


class StepCostModel:
    def __init__(self, flop_share: float):
        self.flop_share = flop_share
        self.cost_per_pair = flop_share
        self._steps: deque[tuple[int, float, float]] = deque(maxlen=WINDOW)  # (tokens, chunk pairs, seconds)

    def observe(self, tokens: int, pairs: float, seconds: float) -> float:
        """A step of `tokens` tokens whose prompt chunks had `pairs` query-key pairs took `seconds` on the ranks;
        returns the cost per pair to pace the next steps with."""
        self._steps.append((tokens, pairs, seconds))
        self.cost_per_pair = self._fit()
        return self.cost_per_pair

    def _fit(self) -> float:
        steps = np.array(self._steps, dtype=np.float64)  # (S, 3)
        if self.flop_share <= 0 or np.count_nonzero(steps[:, 1]) < MIN_CHUNK_STEPS:
            return self.flop_share
        design = np.column_stack([np.ones(len(steps)), steps[:, 0], steps[:, 1]])  # (S, 3)
        scale = np.abs(design).max(axis=0)  # columns of comparable size: pairs run to 1e5 and more, tokens to 1e2
        coef, *_ = np.linalg.lstsq(design / scale, steps[:, 2], rcond=None)
        per_token, per_pair = coef[1] / scale[1], coef[2] / scale[2]
        if not (per_token > 0 and per_pair > 0):
            return self.flop_share
        return float(np.clip(per_pair / per_token, self.flop_share, MAX_FACTOR * self.flop_share))
