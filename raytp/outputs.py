"""What the engine hands back for a request (the offline API and the server share it)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    """One position's log probabilities, from the model's distribution before temperature, penalties and bias."""

    logprob: float  # of the token at this position
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), likeliest first


@dataclass
class CompletionOutput:
    index: int
    text: str  # all text generated so far (stop strings cut off)
    token_ids: list[int]  # all tokens generated so far
    finish_reason: str | None = None  # None while running, then "stop" or "length"
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    logprobs: list[TokenLogprob] | None = None  # one per token of token_ids (params.logprobs set)


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    # For streaming: what this output adds to the previous one of the same request.
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # one per prompt token, the first None
