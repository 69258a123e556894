"""Pipeline stages: which decoder layers each stage of a replica owns.

A replica is `pipeline_parallel_size` stages of `tensor_parallel_size` ranks
each. Stage s computes layers [start, stop); the first stage also owns the
embedding, the last one the final norm and the LM head (and the embedding too
where the head is tied to it). Between stages goes the residual stream after
the stage's last layer, (tokens, hidden), which every rank of the stage holds
whole after its all-reduces.
"""
from __future__ import annotations

from dataclasses import dataclass


class PipelineError(ValueError):
    """The pipeline settings do not fit the model (the message names the field and its value)."""


@dataclass(frozen=True)
class Stage:
    index: int  # 0 .. count - 1
    count: int  # stages in the pipeline
    start: int  # first decoder layer it computes
    stop: int  # one past its last layer

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.count - 1

    @property
    def num_layers(self) -> int:
        return self.stop - self.start

    @classmethod
    def whole(cls, num_layers: int) -> "Stage":
        """The one stage of a model that is not pipelined."""
        return cls(0, 1, 0, num_layers)


def partition_layers(num_layers: int, pipeline_parallel_size: int, partition: list[int] | None = None,
                     layer_costs: list[float] | None = None, head_cost: float = 0.0) -> list[Stage]:
    """The stages of a pipeline over num_layers layers: the explicit partition (layers per stage) where given,
    else balanced_partition over the layers' costs (default: equal) and the LM head's, which the last stage
    computes besides its layers."""
    pp = pipeline_parallel_size
    if pp < 1:
        raise PipelineError(f"pipeline_parallel_size={pp} must be at least 1")
    if pp > num_layers:
        raise PipelineError(f"pipeline_parallel_size={pp} is larger than the model's {num_layers} layers: "
                            f"every stage needs at least one")
    if partition is None:
        partition = balanced_partition(layer_costs or [1.0] * num_layers, pp, head_cost)
    elif len(partition) != pp:
        raise PipelineError(f"pipeline_partition={partition} has {len(partition)} stages where "
                            f"pipeline_parallel_size={pp}")
    elif min(partition) < 1 or sum(partition) != num_layers:
        raise PipelineError(f"pipeline_partition={partition} must give every stage at least one layer and sum to "
                            f"the model's {num_layers} layers (it sums to {sum(partition)})")
    stages, start = [], 0
    for index, layers in enumerate(partition):
        stages.append(Stage(index, pp, start, start + layers))
        start += layers
    return stages


# The LM head's share of a serving workload's steps: it runs on the sampled rows only, every row of a decode step
# but one row of a whole prompt, so it costs its weights' worth in decode steps and next to nothing in prefill.
# Where prompts and outputs are about as long (the burst that pipeline_throughput.py measures), it is half.
LM_HEAD_SHARE = 0.5


def model_partition(args, pipeline_parallel_size: int, partition: list[int] | None = None) -> list[Stage]:
    """partition_layers for a model (ModelArgs): a layer's cost is its weights, which set its time in a decode step
    (read once) and in prefill (its FLOPs per token) alike; the last stage also computes the LM head (vocab x
    hidden: in a small model several layers' worth, 3.9 of the 87m shape's), at LM_HEAD_SHARE of its weights.
    87m on 2 stages: [4, 2] (counting the whole head, [5, 1] left the first stage 5/6 of every prompt's work and
    ran 5-10% slower on a burst of 32; benchmarks/results/pipeline)."""
    costs = [float(args.layer_weights(i)) for i in range(args.num_layers)]
    return partition_layers(args.num_layers, pipeline_parallel_size, partition, costs,
                            LM_HEAD_SHARE * args.vocab_size * args.hidden_size)


def balanced_partition(layer_costs: list[float], stages: int, head_cost: float = 0.0) -> list[int]:
    """Layers per stage, contiguous, at least one each, such that the costliest stage (the last one's head_cost
    included) is as cheap as it can be: the pipeline runs at the pace of its slowest stage. Between partitions
    equally good at that, the more even one (the smaller sum of squared stage costs)."""
    n = len(layer_costs)
    prefix = [0.0]
    for c in layer_costs:
        prefix.append(prefix[-1] + c)
    # best[s][i]: (max stage cost, sum of squared stage costs) of the best split of the first i layers into s stages.
    worst = (float("inf"), float("inf"))
    best = [[worst] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = (0.0, 0.0)
    for s in range(1, stages + 1):
        for i in range(s, n + 1):
            extra = head_cost if (s == stages and i == n) else 0.0
            for j in range(i - 1, s - 2, -1):  # this stage takes layers [j, i), the shortest first: ties favour earlier stages
                stage = prefix[i] - prefix[j] + extra
                before = best[s - 1][j]
                cost = (max(before[0], stage), before[1] + stage * stage)
                if cost < best[s][i]:
                    best[s][i], cut[s][i] = cost, j
    sizes, i = [], n
    for s in range(stages, 0, -1):
        j = cut[s][i]
        sizes.append(i - j)
        i = j
    return sizes[::-1]


def moe_layers_per_stage(args, stages: list[Stage]) -> list[int]:
    """How many mixture-of-experts layers each stage computes (all zero for a dense model): what
    merge_expert_tokens weights each stage's expert load by."""
    return [sum(map(args.is_moe_layer, range(s.start, s.stop))) for s in stages]


def merge_expert_tokens(per_stage: list[list[float] | None], moe_layers: list[int]) -> list[float] | None:
    """The tokens each expert got in a step, averaged over every MoE layer of the model, from each stage's average
    over its own MoE layers (`moe_layers` of them; a stage with none reports nothing that counts). None for a dense
    model."""
    total = sum(moe_layers)
    if not total:
        return None
    counted = [(tokens, n) for tokens, n in zip(per_stage, moe_layers) if n]
    return [sum(tokens[e] * n for tokens, n in counted) / total for e in range(len(counted[0][0]))]
