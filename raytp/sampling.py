"""Sampling parameters and the sampler that turns logits into token ids.

Seeded sampling is stateless: the generator for a request's n-th token is
seeded from (seed, n), so the same seed gives the same tokens whatever else is
in the batch, and a request resumed after a group rebuild continues exactly.

The logits go through vLLM's steps in vLLM's order: min_tokens' ban and
logit_bias, then the penalties (repetition, frequency, presence), then
temperature, top-k / top-p and the draw. Logprobs come from the logits as the
model gave them, before any of these (vLLM's default `raw_logprobs`).
"""
from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import torch

from raytp.model import cpu_ops
from raytp.outputs import TokenLogprob
from raytp.engine.structured import StructuredOutputs, apply_token_bitmask

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
    min_tokens: int = 0  # eos and stop_token_ids cannot be sampled before this many tokens
    presence_penalty: float = 0.0  # subtracted once from each token already in the output
    frequency_penalty: float = 0.0  # times each token's count in the output, subtracted
    repetition_penalty: float = 1.0  # tokens in prompt or output: positive logits / it, negative ones * it
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    logprobs: int | None = None  # the sampled token's logprob plus this many top ones
    prompt_logprobs: int | None = None  # each prompt token's logprob (the first: none) plus this many top ones
    structured_outputs: StructuredOutputs | None = None  # the output must match this grammar (JSON schema / object)

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
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        self.logit_bias = dict(self.logit_bias or {})
        if any(not -100.0 <= b <= 100.0 for b in self.logit_bias.values()):
            raise ValueError(f"logit_bias values must be in [-100, 100], got {self.logit_bias!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or not 0 <= value <= 20):
                raise ValueError(f"{name} must be an integer in [0, 20], got {value!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def penalized(self) -> bool:
        """Whether sampling needs the sequence's tokens so far."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


@dataclass
class RowContext:
    """What a row's sampling needs besides its params: its tokens so far (only when penalized), the token ids
    it may not sample (eos and stop_token_ids while min_tokens is not reached) and, under a grammar, the packed
    bitmask of the only tokens it may sample (structured.py)."""

    prompt_ids: list[int] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)
    banned_ids: Collection[int] = ()
    allowed_tokens: torch.Tensor | None = None  # (ceil(V / 32),) int32


_NO_CONTEXT = RowContext()


def _row_seed(seed: int, index: int) -> int:
    # Mix seed and token index into one 63-bit value (splitmix-style constants).
    return (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 1) & 0x7FFF_FFFF_FFFF_FFFF


# How many of the largest logits top-p looks among (torch.topk), in turn, before it sorts a row's whole vocabulary: a
# nucleus as small as real models' usually is is found without the sort (one of 32 rows of a 49,152-token
# vocabulary took 110 ms here; the topk of 256 5 ms, of 4,096 17 ms).
TOP_P_CANDIDATES = (256, 4096)


def _filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """logits: (S, V) float32; top_k: (S,) int (<= 0: off); top_p: (S,) float -> (S, V), dropped entries -inf.

    Top-k first, then top-p over what top-k kept (a token is dropped when the
    tokens before it, in descending order, already reach top_p; the first
    always stays). Among the largest logits first (_top_p_among_largest), the
    rows it cannot decide among more of them, then the rest sorted
    (_filter_top_k_top_p_sorted).
    """
    out = torch.full_like(logits, float("-inf"))
    rows = torch.arange(logits.shape[0], device=logits.device)  # (R,) the rows not decided yet
    sort = torch.zeros(0, dtype=torch.long, device=logits.device)  # rows that no number of candidates here decides
    for i, k in enumerate(TOP_P_CANDIDATES):
        kept, decided, reach = _top_p_among_largest(logits[rows], top_k[rows], top_p[rows], k)
        out[rows[decided]] = kept[decided]
        if i + 1 < len(TOP_P_CANDIDATES):
            # Sorted at once: a row that even the next candidates would leave short of top_p (reach: a bound), or
            # whose candidates hold less than half of it (its nucleus likely runs far past the next ones too: a flat
            # row, where looking among them first made the filter 1.4x slower than the sort alone).
            mass, bound = reach(TOP_P_CANDIDATES[i + 1])
            hopeless = ~decided & ((bound < top_p[rows]) | (mass < top_p[rows] / 2))
            sort = torch.cat([sort, rows[hopeless]])
            decided |= hopeless
        rows = rows[~decided]
        if len(rows) == 0:
            break
    rows = torch.cat([sort, rows])
    if len(rows):
        out[rows] = _filter_top_k_top_p_sorted(logits[rows], top_k[rows], top_p[rows])
    return out


def _top_p_among_largest(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, k: int):
    """_filter_top_k_top_p among each row's k largest logits -> (filtered (R, V), decided (R,) bool, reach). A row's
    probabilities there are exact (normalised by the log-sum-exp of what top-k keeps: the whole row, or its top_k
    largest when they are all among the k), so where its kept tokens end among them the cut is the sort's; a row
    is not decided where its top_k goes past them (short of the vocabulary) or its kept tokens may. reach(n): (R,)
    the probability the k largest hold, and (R,) the most that the n largest could (then n - k more at most the
    k-th's each)."""
    R, V = logits.shape
    k = min(k, V)
    kept_by_k = torch.where(top_k > 0, top_k.clamp(max=V), V)  # (R,) tokens top-k keeps
    values, indices = torch.topk(logits, k, dim=-1)  # (R, k), descending
    in_k = torch.arange(k, device=logits.device).unsqueeze(0) < kept_by_k.unsqueeze(1)  # (R, k)
    # The sums in float64, as the sort's; log_z in float32 (a float64 copy of the whole rows would double the cost):
    # the cut is the sort's unless the mass before a token is within float32 rounding (~1e-7) of top_p.
    log_z = torch.where(kept_by_k >= V, torch.logsumexp(logits, dim=-1),
                        torch.logsumexp(values.masked_fill(~in_k, float("-inf")), dim=-1))  # (R,)
    probs = torch.exp(values.double() - log_z.double().unsqueeze(1)).masked_fill(~in_k, 0.0)  # (R, k) float64
    keep = in_k & ((probs.cumsum(dim=-1) - probs) < top_p.unsqueeze(1))  # (R, k), a prefix of each row
    kept = torch.full_like(logits, float("-inf")).scatter_(1, indices, values.masked_fill(~keep, float("-inf")))
    undecided = ((kept_by_k > k) & (kept_by_k < V)) | (keep[:, -1] & (kept_by_k > k))  # (R,)
    mass, smallest = probs.sum(dim=-1), probs[:, -1]  # (R,)
    return kept, ~undecided, lambda n: (mass, mass + (n - k) * smallest)


def _filter_top_k_top_p_sorted(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """_filter_top_k_top_p over the whole sorted vocabulary."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (S, V)
    rank = torch.arange(logits.shape[-1], device=logits.device).unsqueeze(0)  # (1, V)
    drop = (top_k.unsqueeze(1) > 0) & (rank >= top_k.unsqueeze(1))  # (S, V) in sorted order
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(sorted_logits.double(), dim=-1)  # (S, V) float64: the mass before each token to ~1e-16
    drop |= (probs.cumsum(dim=-1) - probs) >= top_p.unsqueeze(1)
    return logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))


def _filter_top_k(logits: torch.Tensor, top_k: torch.Tensor, largest_k: int) -> torch.Tensor:
    """Top-k alone: one topk of the largest k instead of a sort of the whole vocabulary."""
    largest_k = min(largest_k, logits.shape[-1])
    top = torch.topk(logits, largest_k, dim=-1).values  # (S, largest_k), descending
    kth = top.gather(1, (top_k.clamp(1, largest_k) - 1).unsqueeze(1))  # (S, 1)
    kth = kth.masked_fill((top_k <= 0).unsqueeze(1), float("-inf"))  # top_k off: keep everything
    return logits.masked_fill(logits < kth, float("-inf"))


def _bin_counts(rows: list[list[int]], vocab: int, device) -> torch.Tensor:
    """Token id lists -> (R, V) float counts, built on `device` (padded with id V, whose column is dropped)."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), vocab, dtype=torch.long)  # (R, L)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    counts = torch.zeros(len(rows), vocab + 1, device=device)  # (R, V + 1)
    counts.scatter_add_(1, ids.to(device), torch.ones(ids.shape, device=device))
    return counts[:, :vocab]


def process_logits(logits: torch.Tensor, params: list[SamplingParams],
                   contexts: list[RowContext] | None = None) -> torch.Tensor:
    """logits: (B, V) -> (B, V) float32 after the grammar's mask, min_tokens' ban, logit_bias and the penalties
    (vLLM's order and formulas); the input is not changed. Only rows that ask for one of these pay for it."""
    contexts = contexts if contexts is not None else [_NO_CONTEXT] * len(params)
    if not any(c.banned_ids or c.allowed_tokens is not None or p.logit_bias or p.penalized
               for p, c in zip(params, contexts)):
        return logits.float()
    x = logits.float().clone()  # (B, V)
    device, vocab = x.device, x.shape[-1]
    masked = [i for i, c in enumerate(contexts) if c.allowed_tokens is not None]
    if masked:
        apply_token_bitmask(x, masked, [contexts[i].allowed_tokens for i in masked])
    for i, (p, ctx) in enumerate(zip(params, contexts)):
        if ctx.banned_ids:
            x[i, list(ctx.banned_ids)] = float("-inf")
        if p.logit_bias:
            x[i, list(p.logit_bias)] += torch.tensor(list(p.logit_bias.values()), device=device)
    rows = [i for i, p in enumerate(params) if p.penalized]
    if not rows:
        return x
    picked = [params[i] for i in rows]
    index = torch.tensor(rows, device=device)  # (P,)
    y = x.index_select(0, index)  # (P, V)
    output_counts = _bin_counts([contexts[i].output_ids for i in rows], vocab, device)  # (P, V)
    output_mask = output_counts > 0
    seen = output_mask | (_bin_counts([contexts[i].prompt_ids for i in rows], vocab, device) > 0)  # (P, V)
    repetition = torch.tensor([p.repetition_penalty for p in picked], device=device).unsqueeze(1)  # (P, 1)
    repetition = torch.where(seen, repetition, torch.ones_like(y))  # (P, V): 1 where the token was not seen
    y = torch.where(y > 0, y / repetition, y * repetition)
    y -= torch.tensor([p.frequency_penalty for p in picked], device=device).unsqueeze(1) * output_counts
    y -= torch.tensor([p.presence_penalty for p in picked], device=device).unsqueeze(1) * output_mask
    x[index] = y
    return x


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    num_generated: list[int],
    generator: torch.Generator,
    contexts: list[RowContext] | None = None,
) -> list[int]:
    """logits: (B, V) -> B token ids, computed on the logits' device; only the B ids reach the host.

    The logits first go through process_logits (ban, bias, penalties;
    `contexts` carry the rows' tokens and banned ids). Greedy rows then take the argmax. The others are
    sampled in one batch by the Gumbel-max trick (argmax of logits /
    temperature plus Gumbel noise is an exact draw from their softmax), after
    top-k / top-p filtering. A seeded row's noise comes from a generator seeded
    from (seed, num_generated[i]): a seeded request's n-th token does not
    depend on the rest of the batch or on which rank (or rebuilt group)
    samples it. The unseeded rows' noise is one draw (one kernel, whatever
    their number) from a generator seeded from `generator`, which every rank
    advances alike.
    """
    logits = process_logits(logits, params, contexts)  # (B, V) float32
    out = _argmax_rows(logits)  # (B,)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return out.tolist()
    device = logits.device
    picked = [params[i] for i in rows]
    index = torch.tensor(rows, device=device)  # (S,)
    x = logits.index_select(0, index)  # (S, V), a copy
    x /= torch.tensor([p.temperature for p in picked], device=device).unsqueeze(1)
    top_k = torch.tensor([p.top_k for p in picked], device=device)  # (S,)
    if any(p.top_p < 1.0 for p in picked):
        x = _filter_top_k_top_p(x, top_k, torch.tensor([p.top_p for p in picked], device=device))
    elif any(p.top_k > 0 for p in picked):
        x = _filter_top_k(x, top_k, max(p.top_k for p in picked))
    noise = torch.empty_like(x)  # (S, V) uniform in (0, 1)
    unseeded = [j for j, p in enumerate(picked) if p.seed is None]
    if unseeded:  # one draw for all of them (one kernel), from a seed every rank takes alike from `generator`
        step_gen = torch.Generator(device=device).manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        if len(unseeded) == len(picked):
            noise.uniform_(generator=step_gen)
        else:
            noise[unseeded] = torch.empty(len(unseeded), x.shape[1], device=device).uniform_(generator=step_gen)
    for j, (i, p) in enumerate(zip(rows, picked)):  # a seeded row: its own stream, from (seed, token index)
        if p.seed is not None:
            row_gen = torch.Generator(device=device).manual_seed(_row_seed(p.seed, num_generated[i]))
            noise[j].uniform_(generator=row_gen)
    gumbel = -torch.log(-torch.log(noise.clamp_(min=1e-20)))  # (S, V)
    out[index] = _argmax_rows(x + gumbel)
    return out.tolist()


def _argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x: (B, V) -> (B,) each row's first largest index: raytp's vectorised op for float32 on the CPU (torch's
    argmax runs near scalar speed there: 0.43 ms for 16 rows of 32,000), torch's elsewhere."""
    if x.is_cpu and x.dtype == torch.float32 and x.stride(-1) == 1 and (op := cpu_ops.rowwise_op()) is not None:
        return op.argmax_rows(x)
    return x.argmax(dim=-1)


def gather_logprobs(logits: torch.Tensor, token_ids: list[int], num_top: int) -> list[TokenLogprob]:
    """logits: (N, V) as the model gave them; token_ids: N -> each token's logprob and the num_top likeliest
    (log-softmax in float32 on the logits' device; N * (num_top + 1) numbers reach the host)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
    ids = torch.tensor(token_ids, dtype=torch.long, device=logits.device).unsqueeze(1)  # (N, 1)
    chosen = logprobs.gather(1, ids).squeeze(1).tolist()  # N
    if num_top == 0:
        return [TokenLogprob(lp) for lp in chosen]
    values, indices = torch.topk(logprobs, num_top, dim=-1)  # (N, num_top)
    return [TokenLogprob(lp, list(zip(i, v))) for lp, i, v in zip(chosen, indices.tolist(), values.tolist())]
