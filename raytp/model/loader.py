"""Load a checkpoint onto one TP rank: a Hugging Face directory (safetensors) or a GGUF file.

Each rank reads only the slices it owns (`safe_open(...).get_slice`, or a GGUF
tensor's rows), so its peak memory is about its shard, not the whole model.
Only safetensors and GGUF are read: never pickle.
"""
from __future__ import annotations

import json
import logging
import os
from contextlib import ExitStack

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from raytp.cluster.comm import Communicator
from raytp.model.attention import AttentionBackend
from raytp.model.checkpoint_error import CheckpointError
from raytp.model.gguf_checkpoint import find_gguf, gguf_checkpoint
from raytp.model.layers import vocab_rows_per_rank
from raytp.model.llama import LlamaModel, ModelArgs, check_tp_degree, expected_shapes, weight_plan
from raytp.model.pipeline import Stage

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_hf_config(path: str) -> dict:
    """config.json of a checkpoint directory, or the same read from a GGUF file's metadata."""
    gguf_file = find_gguf(path)
    if gguf_file is not None:
        return gguf_checkpoint(gguf_file).config
    if not os.path.isdir(path):
        raise CheckpointError(f"model path {path!r} is not a directory or a .gguf file (expected a Hugging Face "
                              f"checkpoint directory, a GGUF file, 'tiny' or 'smollm2')")
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise CheckpointError(f"{path!r} is not a Hugging Face checkpoint: it has no config.json")
    with open(config_file) as f:
        return json.load(f)


def checkpoint_dtype(path: str) -> str | None:
    """The dtype the checkpoint's weights were saved in (config.json's torch_dtype, or dtype as transformers 5
    writes it; a GGUF file's tensor types), where it says."""
    config = read_hf_config(path)
    dtype = config.get("torch_dtype") or config.get("dtype")
    return dtype if dtype in DTYPES else None


def read_model_args(path: str) -> ModelArgs:
    try:
        return ModelArgs.from_hf_config(read_hf_config(path))
    except (KeyError, ValueError) as err:
        if isinstance(err, CheckpointError):
            raise
        source = path if find_gguf(path) else os.path.join(path, "config.json")
        raise CheckpointError(f"{source}: {err}") from None


def tensor_files(path: str) -> dict[str, str]:
    """Checkpoint tensor name -> the safetensors file that holds it."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: os.path.join(path, file) for name, file in weight_map.items()}
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}
    pickles = [n for n in os.listdir(path) if n.endswith((".bin", ".pt", ".pth"))]
    hint = f" (found {', '.join(sorted(pickles))}: pickle checkpoints are not loaded, convert them to safetensors)" if pickles else ""
    raise CheckpointError(f"{path!r} has no model.safetensors or model.safetensors.index.json{hint}")


def _tensor_slices(path: str, gguf_file: str | None, stack: ExitStack):
    """name -> a slice handle (get_shape(), [a:b], [:, a:b]) of the checkpoint's tensor, by its Hugging Face name
    (gguf_file: the GGUF file `path` names, if it names one)."""
    if gguf_file is not None:
        return gguf_checkpoint(gguf_file).get_slice
    files = tensor_files(path)
    handles = {}

    def get_slice(name: str):
        file = files.get(name)
        if file is None:
            raise CheckpointError(f"{path}: tensor {name!r} is missing from the checkpoint")
        if file not in handles:
            handles[file] = stack.enter_context(safe_open(file, framework="pt", device="cpu"))
        return handles[file].get_slice(name)

    return get_slice


def load_model(path: str, comm: Communicator, dtype: str = "float32", device: str = "cpu", progress: bool = True,
               attention: AttentionBackend | None = None, pack_weights: bool = True,
               quantization: str = "none", expert_parallel: bool = False, stage: Stage | None = None) -> LlamaModel:
    """Build this rank's shard of the model at `path` and fill it from the checkpoint.

    `attention` is the paged-attention backend (default: the reference);
    `pack_weights` repacks the linear weights for the device's fastest kernel, quantized to int8 with
    quantization "int8" (CPU); `expert_parallel` places an MoE model's experts whole on the ranks (moe.py); `stage`:
    the pipeline stage whose layers this rank computes (default: all of them).
    """
    args = read_model_args(path)
    try:
        check_tp_degree(args, comm.world_size, expert_parallel)
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None
    shapes = expected_shapes(args)
    gguf_file = find_gguf(path)
    config_source = "the GGUF metadata" if gguf_file else "config.json"
    torch_dtype = DTYPES[dtype]
    with torch.device(device):
        model = LlamaModel(args, comm, torch_dtype, attention, expert_parallel, stage)
    plan = weight_plan(args, model.layout, vocab_rows_per_rank(args.vocab_size, comm.world_size), model.stage)
    params = dict(model.named_parameters())

    with ExitStack() as stack, torch.no_grad():
        get_slice = _tensor_slices(path, gguf_file, stack)
        bar = tqdm(plan.items(), desc=f"rank {comm.rank}: loading {os.path.basename(path)}", unit="tensor",
                   disable=not progress or comm.rank != 0)
        for param_name, pieces in bar:
            param = params[param_name]
            for piece in pieces:
                sl = get_slice(piece.name)
                shape = tuple(sl.get_shape())
                if shape != shapes[piece.name]:
                    raise CheckpointError(
                        f"{path}: tensor {piece.name!r} has shape {list(shape)} but {config_source} implies {list(shapes[piece.name])}"
                    )
                part = sl[piece.start : piece.stop] if piece.dim == 0 else sl[:, piece.start : piece.stop]
                param.data.narrow(piece.dim, piece.dst, piece.stop - piece.start).copy_(part.to(torch_dtype))
    if pack_weights:
        model.pack_weights(quantization)
    log.info("rank %d/%d loaded %s (%.1f MiB of weights, %s on %s)", comm.rank, comm.world_size, path,
             weight_bytes(model) / 2**20, dtype, device)
    return model


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights this rank holds (a tied tensor counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total
