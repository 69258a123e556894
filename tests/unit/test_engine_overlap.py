"""The AsyncEngine schedules step N+1 before step N's tokens are back (no Ray: one rank in this process).

The workers then never wait for the engine. Tokens must still be exactly
transformers' greedy tokens, including for requests that join mid-run, stop on
a stop token a step earlier than the engine expected, or are aborted while two
steps are in flight.
"""
import asyncio
import threading

import pytest
import torch

from raytp.config import EngineConfig
from raytp.engine.engine import AsyncEngine
from raytp.cluster.executor import LocalExecutor
from raytp.sampling import SamplingParams
from tests.helpers import load_reference, write_llama

pytestmark = pytest.mark.timeout(120)

PROMPTS = [torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 17, 9, 30)]
MAX_TOKENS = [12, 5, 20, 8]


class CountingExecutor(LocalExecutor):
    """A LocalExecutor that records how many steps were submitted and not yet finished at each submit."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.unfinished, self.depths, self.lock = 0, [], threading.Lock()

    def submit(self, seqs):
        with self.lock:
            self.unfinished += 1
            self.depths.append(self.unfinished)
        return super().submit(seqs)

    def execute(self, seqs):
        try:
            return super().execute(seqs)
        finally:
            with self.lock:
                self.unfinished -= 1


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = write_llama(tmp_path_factory.mktemp("overlap"))
    model = load_reference(path)
    model.generation_config.eos_token_id = None
    refs = []
    for prompt, n in zip(PROMPTS, MAX_TOKENS):
        with torch.inference_mode():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        refs.append(out[0, len(prompt):].tolist())
    return path, refs


def run(path, coro_fn, **config):
    async def main():
        executors = []

        def factory(config, model_path, max_len):
            executors.append(CountingExecutor(config, model_path, max_len, num_threads=1))
            return executors[-1]

        settings = dict(model=path, device="cpu", dtype="float32", block_size=4, max_model_len=128)
        engine = AsyncEngine(EngineConfig(**{**settings, **config}), factory)
        await engine.start()
        try:
            return await coro_fn(engine), executors[0], engine
        finally:
            await engine.shutdown()

    return asyncio.run(main())


async def tokens_of(engine, prompt, params, rid, delay=0.0):
    await asyncio.sleep(delay)
    final = None
    async for out in engine.generate(prompt, params, rid):
        final = out
    return final.outputs[0].token_ids


def test_pipelined_steps_give_transformers_tokens(checkpoint):
    path, refs = checkpoint

    async def go(engine):
        # The later requests join while the first ones decode.
        return await asyncio.gather(*(
            tokens_of(engine, p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), f"r{i}", delay=0.02 * i)
            for i, (p, n) in enumerate(zip(PROMPTS, MAX_TOKENS))))

    outputs, executor, engine = run(path, go)
    assert outputs == refs
    assert max(executor.depths) == 2  # the next step was sent while one was running
    assert engine.core.scheduler.blocks.num_free == engine.core.scheduler.blocks.num_blocks


def test_stop_token_and_abort_while_steps_are_in_flight(checkpoint):
    path, refs = checkpoint
    stop_at = refs[2][6]  # request 2's 7th token
    first_stop = refs[2].index(stop_at)

    async def go(engine):
        stopped = asyncio.create_task(tokens_of(
            engine, PROMPTS[2], SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=[stop_at]), "stop"))
        full = asyncio.create_task(tokens_of(
            engine, PROMPTS[0], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True), "full"))
        aborted = engine.generate(PROMPTS[3], SamplingParams(max_tokens=90, temperature=0.0, ignore_eos=True), "gone")
        for _ in range(3):
            await anext(aborted)
        await aborted.aclose()  # aborts it with steps in flight
        return await stopped, await full

    (stopped, full), _, engine = run(path, go)
    assert stopped == refs[2][: first_stop + 1]  # the stop token's id is kept, nothing after it
    assert full == refs[0]
    assert engine.core.requests == {}
    assert engine.core.scheduler.blocks.num_free == engine.core.scheduler.blocks.num_blocks


def test_preemption_with_steps_in_flight_keeps_the_tokens(checkpoint):
    # 12 blocks of 4 tokens: the four requests (5+12, 17+5, 9+20 and 30+8 tokens at the end) do not fit
    # together, so sequences are preempted, some while a step in flight still samples their token.
    path, refs = checkpoint
    preempted = []

    async def go(engine):
        sched = engine.core.scheduler
        preempt = sched._preempt

        def counting_preempt(seq):
            preempted.append((seq.request_id, seq.num_pending))
            preempt(seq)

        sched._preempt = counting_preempt
        return await asyncio.gather(*(
            tokens_of(engine, p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), f"p{i}")
            for i, (p, n) in enumerate(zip(PROMPTS, MAX_TOKENS))))

    outputs, _, engine = run(path, go, num_kv_blocks=12, max_model_len=48)
    assert outputs == refs
    assert any(pending for _, pending in preempted), preempted  # preempted with its token still on the worker
    assert engine.core.scheduler.blocks.num_free == 12


@pytest.mark.parametrize("attention", ["cpu", "reference"])
def test_chunked_prefill_gives_transformers_tokens(checkpoint, attention):
    """A 16-token step budget: every prompt but the shortest is computed in chunks over several steps, alongside
    the other requests' decode rows, with steps sent ahead; the tokens are still transformers' greedy tokens."""
    path, refs = checkpoint
    steps = []

    async def go(engine):
        schedule = engine.core.scheduler.schedule

        def recording_schedule():
            batch = schedule()
            steps.append([(s.seq.request_id, len(s.token_ids), s.samples) for s in batch])
            return batch

        engine.core.scheduler.schedule = recording_schedule
        return await asyncio.gather(*(
            tokens_of(engine, p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), f"c{i}")
            for i, (p, n) in enumerate(zip(PROMPTS, MAX_TOKENS))))

    outputs, _, engine = run(path, go, max_num_batched_tokens=16, attention_backend=attention)
    assert outputs == refs
    assert all(sum(n for _, n, _ in step) <= 16 for step in steps)
    chunks = [(rid, n) for step in steps for rid, n, samples in step if not samples]
    assert {rid for rid, _ in chunks} >= {"c1", "c3"}  # the 17- and 30-token prompts were chunked
    assert engine.core.scheduler.blocks.num_free == engine.core.scheduler.blocks.num_blocks


# Prompts that share the 30-token prompt's first 28 or 20 tokens (7 and 5 blocks of 4), and one repeated whole.
SHARED_PREFIX = [PROMPTS[3][:28] + [7, 8], PROMPTS[3][:28] + [9], PROMPTS[3][:20] + [10, 11, 12], PROMPTS[3][:28] + [7, 8]]


@pytest.fixture(scope="module")
def shared_prefix_refs(checkpoint):
    model = load_reference(checkpoint[0])
    model.generation_config.eos_token_id = None
    refs = []
    for prompt in SHARED_PREFIX:
        with torch.inference_mode():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=6, min_new_tokens=6, do_sample=False)
        refs.append(out[0, len(prompt):].tolist())
    return refs


@pytest.mark.parametrize("caching", [True, False], ids=["prefix-caching", "no-caching"])
def test_cached_prefixes_give_transformers_tokens(checkpoint, shared_prefix_refs, caching):
    """Requests that share a prefix with a running or finished one skip the cached blocks (or, with caching off,
    compute them again): the tokens are transformers' greedy tokens either way."""
    async def go(engine):
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        first = await tokens_of(engine, SHARED_PREFIX[0], params, "first")  # computes and caches the prefix
        rest = await asyncio.gather(*(tokens_of(engine, p, params, f"s{i}", delay=0.02 * i)
                                      for i, p in enumerate(SHARED_PREFIX[1:])))
        return [first, *rest]

    outputs, _, engine = run(checkpoint[0], go, enable_prefix_caching=caching, max_num_batched_tokens=16)
    assert outputs == shared_prefix_refs
    stats = engine.core.scheduler.prefix_stats
    assert stats.queried_tokens == sum(map(len, SHARED_PREFIX))
    assert stats.hit_tokens == (28 + 20 + 28 if caching else 0)
    assert engine.core.scheduler.blocks.num_free == engine.core.scheduler.blocks.num_blocks
