"""The checks a model gets before anything starts (`raytp serve`, Serve's app builder): its config and tokenizer read,
its shapes against the TP degree, its layers against the pipeline, so that a bad value is one clear error now
instead of ranks or replicas that fail to start."""
from __future__ import annotations

import os

from raytp.config import EngineConfig


def check_model(config: EngineConfig, remote_ok: bool) -> None:
    """Read the model's config (and a GGUF file's tokenizer) here, so that a missing, corrupt or unsupported
    checkpoint is one clear error now (a ValueError: CheckpointError, ModelShapeError, PipelineError). Joining a
    cluster (remote_ok), a path missing here may exist on its nodes."""
    from raytp.engine.tokenizer import Tokenizer
    from raytp.model import cpu_ops
    from raytp.model.llama import check_tp_degree
    from raytp.model.loader import read_model_args
    from raytp.model.pipeline import model_partition
    from raytp.named_models import resolve_model_path

    path = resolve_model_path(config.model)
    if remote_ok and not os.path.exists(path):
        return
    args = read_model_args(path)
    check_tp_degree(args, config.tensor_parallel_size, config.expert_parallel)
    model_partition(args, config.pipeline_parallel_size, config.pipeline_partition)
    Tokenizer.from_dir(path)
    if not remote_ok:  # the ranks run here: so does the quantized op's build
        cpu_ops.check_quantization(config.quantization, config.resolved_device())
