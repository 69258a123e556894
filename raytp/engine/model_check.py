"""The checks a model gets before anything starts (`raytp serve`, Serve's app builder, the engine itself): its config
and tokenizer read, its shapes against the TP degree, its layers against the pipeline, its positions against
max_model_len, so that a bad value is one clear error now instead of ranks or replicas that fail to start."""
from __future__ import annotations

import os

from raytp.config import EngineConfig


def checked_model_args(config: EngineConfig, path: str):
    """The model's ModelArgs from its config.json, checked against the engine config: its shapes against the TP
    degree (CheckpointError naming the path), its layers against the pipeline (PipelineError naming the field) and
    max_model_len against its positions (a ValueError naming the field)."""
    from raytp.model.checkpoint_error import CheckpointError
    from raytp.model.llama import ModelShapeError, check_tp_degree
    from raytp.model.loader import read_model_args
    from raytp.model.pipeline import model_partition

    args = read_model_args(path)
    try:
        check_tp_degree(args, config.tensor_parallel_size, config.expert_parallel)
    except ModelShapeError as err:
        raise CheckpointError(f"{path}: {err}") from None
    model_partition(args, config.pipeline_parallel_size, config.pipeline_partition)
    limit = args.max_position_embeddings
    if config.max_model_len is not None and config.max_model_len > limit:
        raise ValueError(f"max_model_len={config.max_model_len} is larger than the model's max_position_embeddings={limit}")
    return args


def check_model(config: EngineConfig, remote_ok: bool) -> None:
    """Read the model's config (and a GGUF file's tokenizer) here, so that a missing, corrupt or unsupported
    checkpoint, or a setting it does not fit, is one clear error now (a ValueError: see checked_model_args).
    Joining a cluster (remote_ok), a path missing here may exist on its nodes."""
    from raytp.engine.tokenizer import Tokenizer
    from raytp.model import cpu_ops
    from raytp.named_models import resolve_model_path

    path = resolve_model_path(config.model)
    if remote_ok and not os.path.exists(path):
        return
    checked_model_args(config, path)
    Tokenizer.from_dir(path)
    if not remote_ok:  # the ranks run here: so does the quantized op's build
        cpu_ops.check_quantization(config.quantization, config.resolved_device())
