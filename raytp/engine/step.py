"""The step protocol between the scheduler (engine side) and the ranks: what a step carries and what comes back.

Plain data, imported by both sides. The engine may send step N+1 before step
N's tokens are back: a sequence whose newest token is still on the ranks is
sent with PREVIOUS_TOKEN in its place, and each rank substitutes the token it
sampled for that request in its last step that had it (every rank samples the
same tokens, so they agree; a pipeline's first stage gets them from its last
stage: cluster/step_memory.py).

Penalties need a sequence's tokens so far. A rank keeps them for the
penalized sequences of its recent steps only (the previous one; a pipeline's
last steps in flight: EngineConfig.steps_remembered), so nothing outlives its
request; the engine sends `history` when a penalized sequence continues
(start > 0) but was in none of them (a prompt chunk that waited for budget),
or was just admitted (what the ranks remember of it from before a preemption
may end short of a cached prefix it now starts after). Decode steps send
nothing extra.

A request under a grammar (structured outputs, forced tool calls) gets its
allowed tokens with each step that samples for it: the engine's matcher
computes them from every token so far, so its next step is sent only once
its previous token is back (AsyncEngine waits for the step in flight).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from raytp.outputs import TokenLogprob
from raytp.sampling import SamplingParams

# In a step's token ids: "the token you sampled for this sequence in your previous step".
PREVIOUS_TOKEN = -1


def size_class(num_tokens: int) -> int:
    """Steps of 2^(k-1) to 2^k - 1 tokens take about as long as each other: they share an estimate (the engine's
    pacing) and a limit (the ranks' watchdog)."""
    return max(1, num_tokens).bit_length()


@dataclass
class SeqStep:
    """One sequence's work in a step: compute `token_ids` at positions start.., then sample one token."""

    token_ids: list[int]  # PREVIOUS_TOKEN: the token sampled for request_id in the last step that had it
    start: int
    block_table: list[int]
    params: SamplingParams
    num_generated: int  # index of the token being sampled in the request's output; seeds its sampler
    request_id: str = ""
    prompt_len: int = 0  # positions before this are the prompt (penalties, prompt logprobs)
    history: list[int] | None = None  # penalized only: the tokens before `start`, when the rank may lack them
    banned_ids: tuple[int, ...] = ()  # may not be sampled now (min_tokens not reached: eos, stop_token_ids)
    prompt_logprobs: bool = False  # return the logprobs of the prompt tokens this chunk predicts
    lookahead: int | None = None  # with prompt_logprobs: the prompt token after token_ids, if any
    # Under a grammar, when this step samples: (ceil(V / 32),) int32, bit b of word w allows token 32w + b. The
    # engine fills it from the request's matcher, so such a row never carries PREVIOUS_TOKEN.
    allowed_tokens: torch.Tensor | None = None


@dataclass
class StepLogprobs:
    """Logprobs a step returns (rank 0's), by the sequence's index in the step."""

    sampled: dict[int, TokenLogprob]  # the sampled token's (params.logprobs set)
    prompt: dict[int, list[TokenLogprob]]  # prompt tokens start+1 .. of a chunk (SeqStep.prompt_logprobs)


@dataclass
class StepResult:
    token_ids: list[int]  # one sampled token per sequence (the same on every rank)
    collective_seconds: float  # time this rank spent inside TP collectives during the step
    step_seconds: float
    logprobs: StepLogprobs | None = None  # only when some sequence asked
    # How long before the rank's previous step ended this one reached it (< 0: the rank waited for it); None where
    # steps are not sent ahead through a transport (the in-process executor).
    lead_seconds: float | None = None
    # Mixtures of experts: the tokens each expert got in this step, averaged over the MoE layers (rank 0's; every
    # rank routes alike). None for dense models.
    expert_tokens: list[float] | None = None
    # Pipeline stages, a rank's: how long it waited for the residual stream from the stage before it (the first
    # stage: for the last stage's tokens), and the bytes it sent to the stage after it.
    stream_wait_seconds: float = 0.0
    stream_sent_bytes: int = 0
    # A pipeline's step (merged): per stage, the seconds it computed (its slowest rank, less the wait for the
    # stream) and the bytes its ranks sent to the next stage.
    stage_compute_seconds: list[float] | None = None
    stage_sent_bytes: list[int] | None = None
