"""Mixtures of experts (raytp/model/moe.py) through the engine, and what is refused before any rank starts.
tests/unit/test_model_tp.py checks the logits and greedy tokens against transformers at TP 1, 2 and 4, with
the experts sliced and whole per rank."""
from __future__ import annotations

import asyncio

import pytest
import torch

from raytp.cluster.executor import LocalExecutor
from raytp.config import EngineConfig
from raytp.engine.engine import AsyncEngine
from raytp.model.checkpoint_error import CheckpointError
from raytp.model.llama import ModelArgs, check_tp_degree
from raytp.sampling import SamplingParams
from tests.helpers import load_reference, write_mixtral, write_qwen3_moe


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return write_mixtral(tmp_path_factory.mktemp("moe"), seed=11, initializer_range=0.1)


@pytest.mark.timeout(120)
def test_the_engine_serves_mixtral_with_transformers_greedy_tokens(mixtral):
    prompts = [[5, 9, 33, 17, 2, 81], [7] * 13, list(range(40, 70))]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

    async def generate():
        engine = AsyncEngine(EngineConfig(model=mixtral, device="cpu", max_num_seqs=4, max_model_len=128),
                             lambda c, p, m: LocalExecutor(c, p, m))
        await engine.start()
        try:
            async def one(i, prompt):
                return [t async for out in engine.generate(prompt, params, f"moe-{i}") for t in out.delta_token_ids]

            return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))  # batched steps
        finally:
            await engine.shutdown()

    ours = asyncio.run(generate())
    ref = load_reference(mixtral)
    ref.generation_config.eos_token_id = None
    for prompt, tokens in zip(prompts, ours):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12,
                               do_sample=False, pad_token_id=0)
        assert tokens == out[0, len(prompt):].tolist()


class StepRecorder:
    """The engine's metrics sink, keeping what it reports of each step (the rest of its events are ignored)."""

    def __init__(self):
        self.expert_tokens, self.steps = [], 0

    def on_step(self, *args):
        self.steps += 1

    def on_expert_tokens(self, per_expert):
        self.expert_tokens.append(per_expert)

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


@pytest.mark.timeout(120)
def test_each_step_reports_the_tokens_each_expert_got(mixtral):
    recorder = StepRecorder()
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)

    async def generate():
        engine = AsyncEngine(EngineConfig(model=mixtral, device="cpu", max_num_seqs=4, max_model_len=64),
                             lambda c, p, m: LocalExecutor(c, p, m), metrics=recorder)
        await engine.start()
        try:
            async def one(i, prompt):
                return [t async for out in engine.generate(prompt, params, f"m-{i}") for t in out.delta_token_ids]

            await asyncio.gather(one(0, list(range(3, 20))), one(1, [9, 8, 7]))
        finally:
            await engine.shutdown()

    asyncio.run(generate())
    assert recorder.steps > 0 and len(recorder.expert_tokens) == recorder.steps  # every step, and only steps
    # Each token goes to 2 experts in every layer, so the per-layer averages sum to 2 x the step's tokens: both
    # prompts (20 tokens) in the first step, then one token per running sequence.
    sums = [sum(per_expert) for per_expert in recorder.expert_tokens]
    assert all(len(per_expert) == 8 for per_expert in recorder.expert_tokens)
    assert sums[0] == 2 * (17 + 3) and set(sums[1:]) <= {2 * 2, 2 * 1}


def test_experts_that_do_not_split_evenly_are_refused_before_any_rank_starts(mixtral, tmp_path):
    config = EngineConfig(model=mixtral, device="cpu", tensor_parallel_size=3, expert_parallel=True)
    with pytest.raises(CheckpointError, match="8 experts are not divisible by tensor_parallel_size=3"):
        AsyncEngine(config, lambda *a: pytest.fail("no executor may be made"))
    qwen = write_qwen3_moe(tmp_path, moe_intermediate_size=30)
    args = ModelArgs.from_hf_config(load_reference(qwen).config.to_dict())
    check_tp_degree(args, 2, expert_parallel=True)  # whole experts: 8 / 2
    with pytest.raises(ValueError, match="experts' intermediate size 30 is not divisible by tensor_parallel_size=4"):
        check_tp_degree(args, 4)


def test_an_moe_family_raytp_does_not_implement_is_refused_by_name():
    cfg = {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "hidden_size": 64,
           "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 128, "intermediate_size": 128}
    with pytest.raises(ValueError, match="unsupported architecture \\['Qwen2MoeForCausalLM'\\]"):
        ModelArgs.from_hf_config(cfg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("held", [range(8), range(2, 6)], ids=["every_expert", "experts_2_to_5"])
def test_the_grouped_gemm_path_equals_the_expert_loop(dtype, held):
    """The GPU's computation (torch's grouped GEMM over stacked weights, counts kept on the device) run here on CPU,
    where torch has the same op, against the CPU's loop over experts: the same output, with every expert held and
    with some held elsewhere (expert parallel: their pairs sort last and must add nothing)."""
    from raytp.cluster.comm import SingleRank
    from raytp.model.moe import MoE

    gen = torch.Generator().manual_seed(3)
    loop = MoE(64, 8, 2, True, held, 48, dtype, SingleRank())
    grouped = MoE(64, 8, 2, True, held, 48, dtype, SingleRank())
    for a, b in zip(loop.parameters(), grouped.parameters()):
        a.data.copy_(torch.randn(a.shape, generator=gen) * 0.2)
        b.data.copy_(a.data)
    assert not loop.grouped  # a CPU module takes the loop
    grouped.grouped = True
    x = torch.randn(37, 64, generator=gen).to(dtype)  # (T, h)
    with torch.inference_mode():  # as the model's forward runs it: the stacks are made here
        grouped(x)
    assert not grouped._stacks[0].is_inference()  # so that a shard can be copied into the weights later
    expected, got = loop(x), grouped(x)
    assert torch.equal(loop.last_counts, grouped.last_counts) and int(grouped.last_counts.sum()) == 37 * 2
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert (got.float() - expected.float()).abs().max() <= tolerance * expected.float().abs().max()
    assert grouped.experts[1].gate_up.weight.data_ptr() == grouped._stacks[0][1].data_ptr()  # views, not copies
