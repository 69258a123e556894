"""Pipeline stages in-process: the layer partition, and a model split into stages against transformers.

Each stage is loaded on its own (only its layers, its KV cache) and the
residual stream goes from one to the next as the ranks send it; the last
stage's logits must equal transformers' for the whole prompt, and the greedy
tokens through the paged cache must equal generate(), as for the unsplit
model (test_model_tp.py).
"""
import pytest
import torch

from raytp.cluster.comm import SingleRank
from raytp.model.attention import SeqChunk, build_metadata
from raytp.model.loader import load_model
from raytp.model.pipeline import (PipelineError, Stage, balanced_partition, merge_expert_tokens, model_partition,
                                  moe_layers_per_stage, partition_layers)
from tests.helpers import load_reference, write_llama, write_qwen2, write_qwen3_moe

BLOCK_SIZE, NUM_BLOCKS, PROMPT_LEN, NEW_TOKENS = 4, 16, 12, 8


def test_even_partition_gives_the_first_stages_the_extra_layers():
    assert [(s.start, s.stop) for s in partition_layers(7, 3)] == [(0, 3), (3, 5), (5, 7)]
    stages = partition_layers(4, 2, [1, 3])
    assert [(s.index, s.start, s.stop, s.first, s.last) for s in stages] == [(0, 0, 1, True, False),
                                                                            (1, 1, 4, False, True)]
    assert partition_layers(4, 1) == [Stage.whole(4)]


def test_the_default_partition_balances_the_layers_with_the_lm_head_share_on_the_last_stage():
    from raytp.model.llama import ModelArgs
    from raytp.random_checkpoint import random_llama_config

    # 87m: 6 layers of 6.3M weights, and an LM head of 24.6M (32,000 x 768) on the last stage, half of which counts
    # (it runs on decode rows, not on prompts): [4, 2] is the most even (25.2M against 12.6M + 12.3M).
    args = ModelArgs.from_hf_config(random_llama_config("87m"))
    assert args.layer_weights(0) == 6_291_456
    assert [s.num_layers for s in model_partition(args, 2)] == [4, 2]
    # 0.5b: 16 layers of 25.2M, a head of 49.2M (two layers' worth): [8, 8] (201M against 201M + 24.6M).
    assert [s.num_layers for s in model_partition(ModelArgs.from_hf_config(random_llama_config("0.5b")), 2)] == [8, 8]
    assert [s.num_layers for s in model_partition(args, 2, [3, 3])] == [3, 3]  # an explicit partition is kept
    # Equal costs and no head: as even as possible, the earlier stages taking the extra layers.
    assert balanced_partition([1.0] * 7, 3) == [3, 2, 2]
    assert balanced_partition([1.0] * 30, 2, head_cost=2.0) == [16, 14]
    # Uneven layers (a dense layer among MoE layers): the costliest stage is as cheap as it can be.
    assert balanced_partition([1.0, 5.0, 5.0, 5.0], 2) == [2, 2]


@pytest.mark.parametrize("pp, partition, field", [
    (5, None, "pipeline_parallel_size=5"),  # more stages than layers
    (2, [1, 1, 2], "pipeline_partition=[1, 1, 2]"),  # a partition for 3 stages
    (2, [1, 2], "pipeline_partition=[1, 2]"),  # sums to 3 of 4 layers
    (2, [0, 4], "pipeline_partition=[0, 4]"),  # an empty stage
])
def test_a_partition_that_does_not_fit_the_model_names_the_field(pp, partition, field):
    with pytest.raises(PipelineError) as err:
        partition_layers(4, pp, partition)
    assert field in str(err.value)


def _stages(path: str, partition: list[int]):
    args_layers = sum(partition)
    stages = partition_layers(args_layers, len(partition), partition)
    models = [load_model(path, SingleRank(), progress=False, stage=s) for s in stages]
    caches = [torch.zeros(m.kv_cache_shape(NUM_BLOCKS * BLOCK_SIZE)) for m in models]
    return models, caches


def _run(models, caches, ids: list[int], start: int, block_table: list[int]) -> torch.Tensor:
    """One step through every stage, the stream handed on as the ranks send it -> logits (T, V)."""
    meta = build_metadata([SeqChunk(start, len(ids), block_table)], BLOCK_SIZE, torch.device("cpu"), None)
    stream = None
    for model, cache in zip(models, caches):
        stream = model(torch.tensor(ids) if model.stage.first else None, meta, cache, stream)
    return models[-1].compute_logits(stream)


@pytest.mark.parametrize("writer, partition", [
    (lambda tmp: write_llama(tmp, seed=21, num_hidden_layers=4), [1, 3]),
    (lambda tmp: write_llama(tmp, seed=22, num_hidden_layers=4), [2, 1, 1]),
    # Tied embeddings: the last stage holds the embedding as its LM head.
    (lambda tmp: write_qwen2(tmp, seed=23, num_hidden_layers=4, tie_word_embeddings=True, initializer_range=0.2), [2, 2]),
])
def test_stages_chained_equal_transformers(tmp_path, writer, partition):
    path = writer(tmp_path)
    models, caches = _stages(path, partition)
    # Each stage holds only its own layers, and only the ends hold the embedding and the head.
    assert [len(m.layers) for m in models] == partition
    assert models[0].lm_head is None and models[-1].norm is not None
    assert all(m.embed_tokens is None for m in models[1:-1])
    assert [c.shape[0] for c in caches] == partition
    ref = load_reference(path)
    prompt = torch.randint(0, ref.config.vocab_size, (PROMPT_LEN,), generator=torch.Generator().manual_seed(1)).tolist()
    table = list(range(NUM_BLOCKS))[::-1]
    logits = _run(models, caches, prompt, 0, table)
    with torch.no_grad():
        expected = ref(torch.tensor([prompt])).logits[0]
    assert float((logits - expected).abs().max() / expected.abs().max()) < 1e-4
    tokens = [int(logits[-1].argmax())]
    while len(tokens) < NEW_TOKENS:
        tokens.append(int(_run(models, caches, tokens[-1:], PROMPT_LEN + len(tokens) - 1, table)[-1].argmax()))
    generated = ref.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, PROMPT_LEN:]
    assert tokens == generated.tolist()


def test_a_pipelined_mixture_of_experts_reports_the_whole_models_expert_load(tmp_path):
    """Each stage averages its experts' tokens over its own MoE layers; merged by their counts (layer 0 dense
    here, so the stages hold 1 and 2 MoE layers), they are the whole model's average over all of them."""
    path = write_qwen3_moe(tmp_path, seed=24, num_hidden_layers=4, mlp_only_layers=[0])
    models, caches = _stages(path, [2, 2])
    whole = load_model(path, SingleRank(), progress=False)
    prompt = torch.randint(0, whole.args.vocab_size, (PROMPT_LEN,), generator=torch.Generator().manual_seed(2)).tolist()
    table = list(range(NUM_BLOCKS))
    _run(models, caches, prompt, 0, table)
    _run([whole], [torch.zeros(whole.kv_cache_shape(NUM_BLOCKS * BLOCK_SIZE))], prompt, 0, table)
    moe_layers = moe_layers_per_stage(whole.args, [m.stage for m in models])
    assert moe_layers == [1, 2]
    merged = merge_expert_tokens([m.expert_tokens() for m in models], moe_layers)
    assert merged == pytest.approx(whole.expert_tokens())
    assert sum(merged) == pytest.approx(PROMPT_LEN * whole.args.experts_per_token)
    assert merge_expert_tokens([None, None], [0, 0]) is None  # a dense model
