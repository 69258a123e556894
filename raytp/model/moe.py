"""Mixture-of-experts MLP (Mixtral, Qwen3-MoE, OLMoE), split across tensor-parallel ranks one of two ways.

Every rank routes every token (the router, `gate`, is replicated): softmax
over the experts' logits, the top k, renormalised to sum to 1 where the
family does (Mixtral always, Qwen3-MoE and OLMoE where `norm_topk_prob`).
Then each rank computes its part of the experts' outputs, weighted, and one
all-reduce sums the parts, as for a dense MLP:

- tensor parallel inside every expert (`expert_parallel` false): each rank
  holds a 1/tp slice of every expert's intermediate columns (Megatron-style,
  like the dense MLP);
- expert parallel (`expert_parallel` true): each rank holds E/tp whole
  experts and computes only the tokens routed to them.

The experts' computation is grouped: the step's (token, expert) pairs are
sorted by expert, and each expert's tokens go through its MLP as one matmul
each way, then are weighted and added back to their rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raytp.cluster.comm import Communicator
from raytp.model.layers import DirectCall, PackableLinear, silu_mul


class Expert(DirectCall):
    """One expert's MLP, or this rank's slice of its intermediate columns: packed like the dense layers' weights."""

    def __init__(self, hidden_size: int, intermediate: int, dtype: torch.dtype):
        super().__init__()
        self.gate_up = PackableLinear(2 * intermediate, hidden_size, dtype)  # gate then up rows
        self.down = PackableLinear(hidden_size, intermediate, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down.matmul(silu_mul(self.gate_up.matmul(x)))  # (n, h) -> (n, 2 I) -> (n, I) -> (n, h)


class MoE(DirectCall):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int, normalize_top_k: bool, experts: range,
                 intermediate: int, dtype: torch.dtype, comm: Communicator):
        """experts: the ones this rank holds; intermediate: the columns of each it holds (all of them, or 1/tp)."""
        super().__init__()
        self.num_experts, self.top_k, self.normalize_top_k = num_experts, top_k, normalize_top_k
        self.expert_ids, self.comm = experts, comm
        self.gate = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=dtype), requires_grad=False)  # (E, h)
        self.experts = nn.ModuleList(Expert(hidden_size, intermediate, dtype) for _ in experts)  # the ones held
        self.last_counts: list[int] = [0] * num_experts  # the last step's tokens per expert (all of them, held or not)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (T, h) -> each token's top-k experts (T, k) and their weights (T, k) in x's dtype."""
        probs = torch.softmax(F.linear(x, self.gate).float(), dim=-1)  # (T, E), in float32 as transformers does
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)  # (T, k)
        if self.normalize_top_k:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return chosen, weights.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (T, h) -> (T, h), all-reduced over the ranks."""
        chosen, weights = self.route(x)  # (T, k) each
        pairs = chosen.reshape(-1)  # (T k,) the expert of each (token, slot) pair
        order = torch.argsort(pairs, stable=True)  # (T k,) pairs grouped by expert
        counts = torch.bincount(pairs, minlength=self.num_experts).tolist()  # pairs per expert (one host read)
        self.last_counts = counts  # for the expert-load metric (LlamaModel.expert_tokens)
        out = torch.zeros_like(x)  # (T, h)
        start = sum(counts[: self.expert_ids.start])
        for expert, n in zip(self.experts, counts[self.expert_ids.start : self.expert_ids.stop]):
            if n:
                picked = order[start : start + n]  # (n,) pairs routed to this expert
                tokens = picked // self.top_k  # (n,) their rows of x
                out.index_add_(0, tokens, expert(x[tokens]) * weights.reshape(-1)[picked].unsqueeze(1))  # (n, h)
            start += n
        return self.comm.all_reduce(out) if self.comm.world_size > 1 else out
