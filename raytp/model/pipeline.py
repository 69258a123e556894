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


def partition_layers(num_layers: int, pipeline_parallel_size: int, partition: list[int] | None = None) -> list[Stage]:
    """The stages of a pipeline over num_layers layers: the explicit partition (layers per stage) where given,
    else as even as possible (the first stages get the extra layers: the last one also computes the LM head)."""
    pp = pipeline_parallel_size
    if pp < 1:
        raise PipelineError(f"pipeline_parallel_size={pp} must be at least 1")
    if pp > num_layers:
        raise PipelineError(f"pipeline_parallel_size={pp} is larger than the model's {num_layers} layers: "
                            f"every stage needs at least one")
    if partition is None:
        base, extra = divmod(num_layers, pp)
        partition = [base + (s < extra) for s in range(pp)]
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
