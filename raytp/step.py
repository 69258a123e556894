"""The step protocol between the scheduler (engine side) and the ranks: what a step carries and what comes back.

Plain data, imported by both sides. The engine may send step N+1 before step
N's tokens are back: a sequence whose newest token is still on the ranks is
sent with PREVIOUS_TOKEN in its place, and each rank substitutes the token it
sampled for that request in its previous step (every rank samples the same
tokens, so they agree).
"""
from __future__ import annotations

from dataclasses import dataclass

from raytp.sampling import SamplingParams

# In a step's token ids: "the token you sampled for this sequence in your previous step".
PREVIOUS_TOKEN = -1


@dataclass
class SeqStep:
    """One sequence's work in a step: compute `token_ids` at positions start.., then sample one token."""

    token_ids: list[int]  # PREVIOUS_TOKEN: the token this rank sampled for request_id in its previous step
    start: int
    block_table: list[int]
    params: SamplingParams
    num_generated: int  # index of the token being sampled in the request's output; seeds its sampler
    request_id: str = ""


@dataclass
class StepResult:
    token_ids: list[int]  # one sampled token per sequence (the same on every rank)
    collective_seconds: float  # time this rank spent inside TP collectives during the step
    step_seconds: float
