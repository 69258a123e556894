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


def _row_seed(seed: int, index: int) -> int:
    # Mix seed and token index into one 63-bit value (splitmix-style constants).
    return (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 1) & 0x7FFF_FFFF_FFFF_FFFF


def _filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """logits: (S, V) float32; top_k: (S,) int (<= 0: off); top_p: (S,) float -> (S, V), dropped entries -inf.

    Top-k first, then top-p over what top-k kept (a token is dropped when the
    tokens before it, in descending order, already reach top_p; the first
    always stays).
    """
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (S, V)
    rank = torch.arange(logits.shape[-1], device=logits.device).unsqueeze(0)  # (1, V)
    drop = (top_k.unsqueeze(1) > 0) & (rank >= top_k.unsqueeze(1))  # (S, V) in sorted order
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)  # (S, V)
    drop |= (probs.cumsum(dim=-1) - probs) >= top_p.unsqueeze(1)
    return logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))


def _filter_top_k(logits: torch.Tensor, top_k: torch.Tensor, largest_k: int) -> torch.Tensor:
    """Top-k alone: one topk of the largest k instead of a sort of the whole vocabulary."""
    largest_k = min(largest_k, logits.shape[-1])
    top = torch.topk(logits, largest_k, dim=-1).values  # (S, largest_k), descending
    kth = top.gather(1, (top_k.clamp(1, largest_k) - 1).unsqueeze(1))  # (S, 1)
    kth = kth.masked_fill((top_k <= 0).unsqueeze(1), float("-inf"))  # top_k off: keep everything
    return logits.masked_fill(logits < kth, float("-inf"))


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    num_generated: list[int],
    generator: torch.Generator,
) -> list[int]:
    """logits: (B, V) -> B token ids, computed on the logits' device; only the B ids reach the host.

    Greedy rows take the argmax. The others are sampled in one batch by the
    Gumbel-max trick (argmax of logits / temperature plus Gumbel noise is an
    exact draw from their softmax), after top-k / top-p filtering. Each row's
    noise comes from a generator seeded from (seed, num_generated[i]): a
    seeded request's n-th token does not depend on the rest of the batch or on
    which rank (or rebuilt group) samples it. Unseeded rows draw their seed
    from `generator`, which every rank advances alike.
    """
    out = logits.argmax(dim=-1)  # (B,)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return out.tolist()
    device = logits.device
    picked = [params[i] for i in rows]
    index = torch.tensor(rows, device=device)  # (S,)
    x = logits.index_select(0, index).float()  # (S, V)
    x /= torch.tensor([p.temperature for p in picked], device=device).unsqueeze(1)
    top_k = torch.tensor([p.top_k for p in picked], device=device)  # (S,)
    if any(p.top_p < 1.0 for p in picked):
        x = _filter_top_k_top_p(x, top_k, torch.tensor([p.top_p for p in picked], device=device))
    elif any(p.top_k > 0 for p in picked):
        x = _filter_top_k(x, top_k, max(p.top_k for p in picked))
    noise = torch.empty_like(x)  # (S, V) uniform in (0, 1), one seeded stream per row
    for j, (i, p) in enumerate(zip(rows, picked)):
        seed = p.seed if p.seed is not None else int(torch.randint(2**62, (1,), generator=generator))
        row_gen = torch.Generator(device=device).manual_seed(_row_seed(seed, num_generated[i]))
        noise[j].uniform_(generator=row_gen)
    gumbel = -torch.log(-torch.log(noise.clamp_(min=1e-20)))  # (S, V)
    out[index] = (x + gumbel).argmax(dim=-1)
    return out.tolist()
