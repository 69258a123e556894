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
each way, then are weighted and added back to their rows. On CPU that is a
loop over the held experts, each through raytp's packed linear op, with the
experts' token counts read on the host. On GPUs where torch's grouped GEMM has
its CUTLASS kernel (bfloat16, compute capability 9 or 10) it is one
`torch.nn.functional.grouped_mm` each way over the experts' weights stacked
once, with the counts kept on the device: no host read, no launch per expert.
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
        self.last_counts = torch.zeros(num_experts, dtype=torch.int64)  # (E,) the last step's pairs per expert, all E
        # Which computation: torch's grouped GEMM where it has a fast kernel for the weights' device and dtype (its
        # fallback elsewhere reads the counts on the host and loops, as the CPU path does with faster matmuls).
        # (Its kernel wants 16-byte aligned rows: widths in multiples of 8 bfloat16 values.)
        self.grouped = grouped_mm_is_fast(self.gate.device, dtype) and hidden_size % 8 == 0 and intermediate % 8 == 0
        self._stacks: tuple[torch.Tensor, torch.Tensor] | None = None  # (E_held, 2I, h), (E_held, h, I): stack_experts

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
        out = self._grouped_experts(x, chosen, weights) if self.grouped else self._expert_loop(x, chosen, weights)
        return self.comm.all_reduce(out) if self.comm.world_size > 1 else out

    def _expert_loop(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Each held expert's tokens through its MLP, one expert at a time: (T, h)."""
        pairs = chosen.reshape(-1)  # (T k,) the expert of each (token, slot) pair
        order = torch.argsort(pairs, stable=True)  # (T k,) pairs grouped by expert
        self.last_counts = torch.bincount(pairs, minlength=self.num_experts)  # (E,) for the expert-load metric
        counts = self.last_counts.tolist()  # pairs per expert (one host read)
        out = torch.zeros_like(x)  # (T, h)
        start = sum(counts[: self.expert_ids.start])
        for expert, n in zip(self.experts, counts[self.expert_ids.start : self.expert_ids.stop]):
            if n:
                picked = order[start : start + n]  # (n,) pairs routed to this expert
                tokens = picked // self.top_k  # (n,) their rows of x
                out.index_add_(0, tokens, expert(x[tokens]) * weights.reshape(-1)[picked].unsqueeze(1))  # (n, h)
            start += n
        return out

    def _grouped_experts(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Every held expert's tokens through its MLP in one grouped GEMM each way, nothing read on the host: (T, h)."""
        gate_up, down = self._stacks or self.stack_experts()
        held = len(self.expert_ids)
        pairs = chosen.reshape(-1)  # (T k,)
        self.last_counts = torch.zeros(self.num_experts, dtype=torch.int64, device=x.device).scatter_add_(
            0, pairs, torch.ones_like(pairs))  # (E,) a fixed size: bincount's size would need a host read
        local = pairs - self.expert_ids.start  # (T k,) the held expert's index, or out of range for another rank's
        is_held = (local >= 0) & (local < held)
        order = torch.argsort(torch.where(is_held, local, held), stable=True)  # (T k,) held pairs first, by expert
        ends = torch.cumsum(self.last_counts[self.expert_ids.start : self.expert_ids.stop], 0).to(torch.int32)  # (held,)
        tokens = order // self.top_k  # (T k,) each sorted pair's row of x
        h = F.grouped_mm(x[tokens], gate_up.transpose(1, 2), offs=ends)  # (T k, 2 I); rows past ends[-1] undefined
        y = F.grouped_mm(silu_mul(h), down.transpose(1, 2), offs=ends)  # (T k, h)
        # Pairs of experts held elsewhere sort last, past ends[-1]: where (not a multiply) drops whatever is there.
        y = torch.where(is_held[order].unsqueeze(1), y * weights.reshape(-1)[order].unsqueeze(1), 0)
        return torch.zeros_like(x).index_add_(0, tokens, y)  # (T, h)

    def stack_experts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Stack the held experts' weights for the grouped GEMM, once (after loading): each expert's weights become
        views of the stacks, so the memory is not doubled and a later copy into them (a restored shard) lands in the
        stacks too."""
        # Ordinary tensors even when called from the model's inference-mode forward: they become the parameters' data,
        # which a restored shard is later copied into.
        with torch.inference_mode(False):
            gate_up = torch.stack([e.gate_up.weight.detach() for e in self.experts])  # (held, 2 I, h)
            down = torch.stack([e.down.weight.detach() for e in self.experts])  # (held, h, I)
        for i, expert in enumerate(self.experts):
            expert.gate_up.weight.data, expert.down.weight.data = gate_up[i], down[i]
        self._stacks = (gate_up, down)
        return self._stacks


def grouped_mm_is_fast(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's grouped GEMM has its fast (CUTLASS) kernel here: bfloat16 on a GPU of compute capability 9 or
    10. Elsewhere torch's fallback reads the groups' sizes on the host and loops over them."""
    return (device.type == "cuda" and dtype == torch.bfloat16 and hasattr(F, "grouped_mm")
            and torch.cuda.get_device_capability(device)[0] in (9, 10))
