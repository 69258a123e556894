"""Sampling parameters and the sampler that turns logits into token ids.

Seeded sampling is stateless: the generator for a request's n-th token is
seeded from (seed, n), so the same seed gives the same tokens whatever else is
in the batch, and a request resumed after a group rebuild continues exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Below this temperature sampling is greedy (argmax), as in vLLM.
_GREEDY_EPS = 1e-5


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0): all tokens
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disabled) or an integer >= 0, got {self.top_k!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS


def _seeded_generator(seed: int, index: int) -> torch.Generator:
    # Mix seed and token index into one 63-bit value (splitmix-style constants).
    mixed = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 1) & 0x7FFF_FFFF_FFFF_FFFF
    return torch.Generator().manual_seed(mixed)


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits: (V,) float32 -> (V,) with filtered-out entries set to -inf."""
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p (keeps at least one).
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    num_generated: list[int],
    generator: torch.Generator,
) -> list[int]:
    """logits: (B, V) -> B token ids.

    num_generated[i] is how many tokens request i already has (the index of the
    token being sampled), used to seed its generator. `generator` serves the
    unseeded requests.
    """
    out = logits.argmax(dim=-1).tolist()  # greedy for every row, on the logits' device: only B ids reach the host
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if not sampled:
        return out
    rows = logits[sampled].float().cpu()  # (S, V): only the rows that sample come to the host
    for row, i in zip(rows, sampled):
        p = params[i]
        row = _filter_top_k_top_p(row / p.temperature, p.top_k, p.top_p)
        probs = torch.softmax(row, dim=-1)  # (V,)
        gen = generator if p.seed is None else _seeded_generator(p.seed, num_generated[i])
        out[i] = int(torch.multinomial(probs, 1, generator=gen).item())
    return out
