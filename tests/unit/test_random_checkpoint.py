"""The random benchmark checkpoints (raytp/random_checkpoint.py) are what the loader expects of their configs: every
tensor written has the shape the config implies, and none is missing; the mixture-of-experts shape is a Mixtral."""
from __future__ import annotations

import math

import pytest
import torch

from raytp.model.llama import ModelArgs, expected_shapes
from raytp.random_checkpoint import (RANDOM_LLAMA_SHAPES, llama_layer_weights, llama_num_parameters,
                                     random_llama_config)


@pytest.mark.parametrize("shape", sorted(RANDOM_LLAMA_SHAPES))
def test_each_random_shape_writes_the_tensors_its_config_implies(shape):
    config = random_llama_config(shape)
    args = ModelArgs.from_hf_config(config)
    expected = expected_shapes(args)

    def meta(*size):  # shapes only: nothing is drawn
        return torch.empty(size, device="meta")

    written = {"model.embed_tokens.weight": (args.vocab_size, args.hidden_size), "model.norm.weight": (args.hidden_size,),
               "lm_head.weight": (args.vocab_size, args.hidden_size)}
    for i in range(args.num_layers):
        written.update({k: tuple(v.shape) for k, v in llama_layer_weights(config, i, meta).items()})
    assert written == expected
    assert sum(math.prod(s) for s in expected.values()) == llama_num_parameters(config)


def test_the_moe_shape_is_a_mixtral_of_8_experts_2_per_token():
    args = ModelArgs.from_hf_config(random_llama_config("moe-8x"))
    assert (args.architecture, args.num_experts, args.experts_per_token, args.normalize_top_k) == (
        "MixtralForCausalLM", 8, 2, True)
    assert all(args.is_moe_layer(i) for i in range(args.num_layers))
