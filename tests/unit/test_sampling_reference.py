"""Penalties, logit_bias, min_tokens and logprobs through the whole engine, against transformers, at TP 1 and 2.

The oracle applies vLLM's formulas (vllm/model_executor/layers/utils.py
apply_penalties; the v1 sampler's order: min_tokens ban, logit_bias, then
repetition, frequency and presence penalties) one token at a time to
transformers' logits of the full sequence. raytp runs the real engine
(scheduler, step protocol, every rank's sampler); TP 2 runs its two ranks in
a pool of spawned processes joined by gloo (tests.helpers.RankPool), with
prompts prefilled in chunks (a 16-token step budget) so that the ranks' token
history and the prompt-logprob lookahead cross steps.
"""
from __future__ import annotations

import asyncio
import math
from collections import Counter

import pytest
import torch

from raytp.config import EngineConfig
from raytp.cluster.executor import Executor, GroupFailure, LocalExecutor, choose_num_kv_blocks
from raytp.llm import LLM
from raytp.sampling import SamplingParams
from raytp.engine.step import StepResult
from raytp.cluster.worker import TimedCommunicator, TPWorker
from tests.helpers import RankPool, load_reference, write_llama

pytestmark = pytest.mark.timeout(300)

PROMPTS = [torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (7, 40)]
NEW_TOKENS = 10
LOGPROB_TOL = 2e-3

# ---- TP 2 without Ray: each spawned rank keeps one TPWorker ---------------------------------------

_RANK_WORKER: dict[str, TPWorker] = {}


def _rank_start(comm, path: str, num_blocks: int, block_size: int) -> int:
    worker = TPWorker(comm.rank, comm.world_size, "cpu", "float32")
    worker.comm = TimedCommunicator(comm)
    worker.load(path)
    capacity = worker.max_kv_blocks(block_size, 0.9, [block_size])  # (the profile step is for CUDA)
    worker.init_kv_cache(num_blocks, block_size)
    _RANK_WORKER["w"] = worker
    return capacity


def _rank_execute(comm, seqs) -> StepResult:
    return _RANK_WORKER["w"].execute(seqs)


class PoolExecutor(Executor):
    """The Executor interface over a RankPool: every rank runs the real TPWorker.execute; they must agree."""

    def __init__(self, config: EngineConfig, model_path: str, max_model_len: int, pool: RankPool):
        self.config, self.model_path, self.max_model_len, self.pool = config, model_path, max_model_len, pool
        self.tp_size, self.num_kv_blocks, self.dtype = pool.world, 0, "float32"

    def start(self, tp_size: int) -> None:
        assert tp_size == self.pool.world
        self.num_kv_blocks = choose_num_kv_blocks(self.config, self.max_model_len, 10**6)
        self.pool.run(_rank_start, path=self.model_path, num_blocks=self.num_kv_blocks,
                      block_size=self.config.block_size)

    def execute(self, seqs):
        results = self.pool.run(_rank_execute, seqs=seqs)
        assert all(r.token_ids == results[0].token_ids for r in results), "ranks sampled different tokens"
        return results[0]

    def submit(self, seqs):
        return asyncio.get_running_loop().run_in_executor(None, self.execute, seqs)

    def worker_pids(self):
        return []

    def check_health(self):
        pass

    def shutdown(self):
        pass


# ---- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = write_llama(tmp_path_factory.mktemp("penalties"), seed=11, initializer_range=0.2)
    return path, load_reference(path)


@pytest.fixture(scope="module")
def pool():
    made = RankPool(2)
    yield made
    made.close()


@pytest.fixture(scope="module")
def llms(checkpoint, pool):
    """tp -> an LLM on the checkpoint (TP 1 in this process, TP 2 on the pool); 16-token steps force chunking."""
    path, _ = checkpoint
    settings = dict(device="cpu", dtype="float32", block_size=4, max_model_len=128, max_num_batched_tokens=16)

    def local(config, model_path, max_len):
        return LocalExecutor(config, model_path, max_len, num_threads=1)

    def pooled(config, model_path, max_len):
        return PoolExecutor(config, model_path, max_len, pool)

    made = {1: LLM(path, executor_factory=local, **settings),
            2: LLM(path, executor_factory=pooled, tensor_parallel_size=2, **settings)}
    yield made
    for llm in made.values():
        llm.shutdown()


# ---- the oracle ----------------------------------------------------------------------------------


def vllm_processed(logits: torch.Tensor, prompt: list[int], output: list[int], p: SamplingParams,
                   stop_ids: list[int]) -> torch.Tensor:
    """vLLM's processing of one row of logits (V,), token by token as its docs state it."""
    x = logits.double().clone()
    if len(output) < p.min_tokens:
        x[stop_ids] = -math.inf
    for token, bias in p.logit_bias.items():
        x[token] += bias
    for token in set(prompt) | set(output):
        x[token] = x[token] / p.repetition_penalty if x[token] > 0 else x[token] * p.repetition_penalty
    for token, count in Counter(output).items():
        x[token] -= p.frequency_penalty * count + p.presence_penalty
    return x


def reference_greedy(model, prompt: list[int], p: SamplingParams, n: int) -> list[int]:
    output: list[int] = []
    for _ in range(n):
        with torch.inference_mode():
            logits = model(torch.tensor([prompt + output])).logits[0, -1]  # (V,)
        output.append(int(vllm_processed(logits, prompt, output, p, p.stop_token_ids).argmax()))
    return output


PENALTIES = {
    "presence": dict(presence_penalty=1.5),
    "frequency": dict(frequency_penalty=0.8),
    "repetition": dict(repetition_penalty=1.7),
    "repetition_below_1": dict(repetition_penalty=0.6),
    "all_three": dict(presence_penalty=-0.5, frequency_penalty=1.2, repetition_penalty=1.3),
    "logit_bias": dict(logit_bias={5: 3.0, 17: -100.0, 99: 2.5}),
}


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("case", list(PENALTIES))
def test_greedy_with_penalties_equals_vllm_formulas(case, tp, checkpoint, llms):
    _, model = checkpoint
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, **PENALTIES[case])
    outs = llms[tp].generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, outs):
        assert out.outputs[0].token_ids == reference_greedy(model, prompt, params, NEW_TOKENS)
    # The penalties change something here (else the test would prove little), except a bias on unused tokens.
    plain = llms[tp].generate(PROMPTS, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
    assert [o.outputs[0].token_ids for o in outs] != [o.outputs[0].token_ids for o in plain]


@pytest.mark.parametrize("tp", [1, 2])
def test_logit_bias_plus_100_forces_its_token(tp, llms):
    for temperature in (0.0, 1.0):
        params = SamplingParams(max_tokens=6, temperature=temperature, seed=3, logit_bias={42: 100.0})
        assert all(o.outputs[0].token_ids == [42] * 6 for o in llms[tp].generate(PROMPTS, params))


@pytest.mark.parametrize("tp", [1, 2])
def test_min_tokens_holds_back_stop_tokens(tp, checkpoint, llms):
    _, model = checkpoint
    plain = llms[tp].generate(PROMPTS[0], SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))[0]
    stop = plain.outputs[0].token_ids[0]  # the token greedy decoding would stop on at once
    early = llms[tp].generate(PROMPTS[0], SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0,
                                                         stop_token_ids=[stop]))[0]
    assert early.outputs[0].token_ids == [stop] and early.outputs[0].finish_reason == "stop"
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, stop_token_ids=[stop], min_tokens=4)
    held = llms[tp].generate(PROMPTS[0], params)[0].outputs[0].token_ids
    expected = reference_greedy(model, PROMPTS[0], params, NEW_TOKENS)
    if stop in expected[4:]:
        expected = expected[: expected.index(stop, 4) + 1]
    assert held == expected and stop not in held[:4]


@pytest.mark.parametrize("tp", [1, 2])
def test_logprobs_equal_transformers_log_softmax(tp, checkpoint, llms):
    """Sampled and prompt logprobs (and the top 5) are transformers' log-softmax, before penalties and temperature."""
    _, model = checkpoint
    params = SamplingParams(max_tokens=6, temperature=0.8, seed=1, presence_penalty=1.0, logprobs=5, prompt_logprobs=5)
    for prompt, out in zip(PROMPTS, llms[tp].generate(PROMPTS, params)):
        tokens = prompt + out.outputs[0].token_ids
        with torch.inference_mode():
            expected = torch.log_softmax(model(torch.tensor([tokens])).logits[0].double(), dim=-1)  # (T, V)
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
        positions = list(out.prompt_logprobs[1:]) + list(out.outputs[0].logprobs)  # tokens 1 .. T-1
        assert len(positions) == len(tokens) - 1
        for pos, lp in enumerate(positions, start=1):
            row = expected[pos - 1]
            assert abs(lp.logprob - float(row[tokens[pos]])) < LOGPROB_TOL, pos
            top_values, _ = torch.topk(row, 5)
            assert [round(v, 6) for _, v in lp.top] == sorted((round(v, 6) for _, v in lp.top), reverse=True)
            assert max(abs(v - float(e)) for (_, v), e in zip(lp.top, top_values)) < LOGPROB_TOL
            assert all(abs(v - float(row[t])) < LOGPROB_TOL for t, v in lp.top)


def test_penalized_sampling_survives_a_rebuild(checkpoint, llms):
    """Seeded, penalized sampling gives the same tokens when the group is rebuilt mid-request (the ranks' token
    history is rebuilt from the engine's tokens, the seeds are per token)."""
    llm = llms[1]
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=9, frequency_penalty=1.0, repetition_penalty=1.2)
    expected = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
    core = llm.engine
    for i, prompt in enumerate(PROMPTS):
        core.add_request(f"rebuilt-{i}", prompt, params)
    finals, steps = {}, 0
    while len(finals) < len(PROMPTS):
        for out in core.step():
            if out.finished:
                finals[out.request_id] = out.outputs[0].token_ids
        steps += 1
        if steps == 6:
            core.recover(GroupFailure("test: rebuild mid-request"), [])  # TP=1 has no spare: the group is rebuilt
    assert [finals[f"rebuilt-{i}"] for i in range(len(PROMPTS))] == expected


def test_a_rank_without_the_history_gets_it_with_the_step(llms):
    """A penalized sequence that continues (start > 0) without having been in the rank's previous step (a chunk
    that waited, or a prefix-cache hit) gets its earlier tokens in SeqStep.history, and samples as if it had run
    without a gap; the engine decides that from the steps it sent last (the ranks remember those)."""
    from raytp.engine.scheduler import ScheduledSeq, Sequence
    from raytp.engine.step import SeqStep

    core = llms[1].engine
    worker = core.executor.worker
    prompt = PROMPTS[1]  # 40 tokens, in chunks of 20
    params = SamplingParams(max_tokens=4, temperature=0.0, presence_penalty=2.0, repetition_penalty=2.0)
    table = list(range(10))  # 10 blocks of 4: free while the engine is idle

    def chunk(start, history=None):
        return SeqStep(prompt[start : start + 20], start, table, params, 0, "history-test", prompt_len=len(prompt),
                       history=history)

    worker.execute([chunk(0)])
    straight = worker.execute([chunk(20)]).token_ids
    worker.execute([chunk(0)])
    worker.execute([SeqStep([5, 6], 0, [20], SamplingParams(temperature=0.0), 0, "other")])  # the rank forgets
    with pytest.raises(RuntimeError, match="without its history"):
        worker.execute([chunk(20)])
    worker.execute([chunk(0)])
    worker.execute([SeqStep([5, 6], 0, [20], SamplingParams(temperature=0.0), 0, "other")])
    assert worker.execute([chunk(20, history=prompt[:20])]).token_ids == straight

    seq = Sequence("resumed", list(prompt), params)
    core._recent_steps.clear()
    (step,) = core.to_steps([ScheduledSeq(seq, prompt[20:], 20, 0)])
    assert step.history == prompt[:20]
    (step,) = core.to_steps([ScheduledSeq(seq, prompt[20:], 20, 0)])  # it was in the step sent last
    assert step.history is None
    # Admitted again (preempted, then a cached prefix lets it start at 20): what the ranks remember of it may end
    # short of that, so the history comes with the step.
    (step,) = core.to_steps([ScheduledSeq(seq, prompt[20:], 20, 0, admitted=True)])
    assert step.history == prompt[:20]


def test_penalties_with_steps_scheduled_ahead(checkpoint):
    """The AsyncEngine sends step N+1 before step N's token is back (PREVIOUS_TOKEN): the ranks' token history
    takes the token they sampled, so penalties still equal the reference."""
    from raytp.engine.engine import AsyncEngine

    path, model = checkpoint
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, **PENALTIES["all_three"])

    async def main():
        config = EngineConfig(model=path, device="cpu", dtype="float32", block_size=4, max_model_len=128,
                              max_num_batched_tokens=16)
        engine = AsyncEngine(config, lambda c, p, m: LocalExecutor(c, p, m, num_threads=1))
        await engine.start()
        try:
            async def one(i, prompt):
                async for out in engine.generate(prompt, params, f"ahead-{i}"):
                    pass
                return out.outputs[0].token_ids
            return await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS)))
        finally:
            await engine.shutdown()

    for prompt, tokens in zip(PROMPTS, asyncio.run(main())):
        assert tokens == reference_greedy(model, prompt, params, NEW_TOKENS)
