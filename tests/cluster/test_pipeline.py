"""Pipeline parallelism on a local multi-node Ray cluster: the session's cluster plus nodes this module adds.

Ray nodes on one host (`ray.cluster_utils.Cluster.add_node` against the
session's head) are told apart by node id. Greedy tokens at (TP, PP) = (1, 2),
(2, 2) and (1, 3) with an uneven partition equal transformers', with every
stage on a node of its own (read from Ray's actor table); concurrent streams
through the async engine's micro-batches, with chunked prefill and a shared
cached prefix, equal them too; a rank of the last stage killed, and a whole
node removed (its stage moves to a spare node), lose no stream and change no
token, the other stage keeping its processes (rebuilt alone, or, with warm
spares, the rank replaced); with no node to move to, the requests get a clear
error and nothing hangs.

Serve is shut down while the extra nodes exist (its proxies would start on
them too, on the same host and port); the next modules start it again.
"""
from __future__ import annotations

import asyncio
import random

import pytest
import ray
import torch

from raytp import LLM, SamplingParams
from raytp.config import EngineConfig
from raytp.engine.engine import AsyncEngine
from raytp.engine.step import PREVIOUS_TOKEN
from raytp.cluster.supervisor import PipelineUnplaceable
from tests.helpers import load_reference, write_llama

pytestmark = pytest.mark.timeout(240)

NUM_LAYERS = 4
NEW_TOKENS = 16
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)


@ray.remote(num_cpus=1)
class _CpuHolder:
    def ready(self) -> bool:
        return True


class ExtraNodes:
    """Nodes added to the session's cluster (2 CPUs each), removed again at the end of the module."""

    def __init__(self):
        from ray.cluster_utils import Cluster

        head = ray._private.worker._global_node
        self.cluster = Cluster(initialize_head=False)
        self.cluster.head_node, self.cluster.redis_address = head, head.redis_address
        self.nodes = []

    def add(self) -> str:
        node = self.cluster.add_node(num_cpus=2)
        self.nodes.append(node)
        return node.node_id

    def remove(self, node_id: str) -> None:
        node = next(n for n in self.nodes if n.node_id == node_id)
        self.nodes.remove(node)
        self.cluster.remove_node(node, allow_graceful=False)

    def close(self) -> None:
        for node in list(self.nodes):
            self.remove(node.node_id)


@pytest.fixture(scope="module")
def extra_nodes(ray_cluster):
    from ray import serve

    serve.shutdown()
    nodes = ExtraNodes()
    nodes.add()
    nodes.add()
    yield nodes
    nodes.close()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_llama(tmp_path_factory.mktemp("pp"), seed=31, num_hidden_layers=NUM_LAYERS)


def _prompts(n: int, shared_prefix: int = 0) -> list[list[int]]:
    rng = random.Random(n)
    prefix = [rng.randrange(3, 128) for _ in range(shared_prefix)]
    return [prefix + [rng.randrange(3, 128) for _ in range(rng.randrange(3, 30))] for _ in range(n)]


def _hf_greedy(path: str, prompts: list[list[int]], new_tokens: int, **settings) -> list[list[int]]:
    from transformers import GenerationConfig

    ref = load_reference(path)
    ref.generation_config.eos_token_id = None  # random weights may emit eos: run the full length, as ignore_eos
    config = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0,
                              **settings)
    return [ref.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                         generation_config=config)[0, len(p):].tolist() for p in prompts]


def _stage_nodes(executor) -> list[set[str]]:
    """For each stage, the nodes its ranks run on, from Ray's actor table (by process id)."""
    pids = executor.worker_pids()
    node_of = {a["Pid"]: a["Address"]["NodeID"] for a in ray._private.state.actors().values() if a["State"] == "ALIVE"}
    tp = executor.tp_size
    return [{node_of[pid] for pid in pids[s * tp : (s + 1) * tp]} for s in range(len(pids) // tp)]


def _wait_for_every_cpu_free(timeout_s: float = 30.0) -> None:
    """Until Ray's view has every CPU free again: a placement group's resources come back from its node a moment
    after Ray calls it removed, and SPREAD places only over the CPUs free at the time."""
    import time

    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.monotonic() < deadline:
        time.sleep(0.1)


@pytest.mark.parametrize("tp, pp, partition", [(1, 2, None), (2, 2, None), (1, 3, [1, 2, 1])])
def test_greedy_tokens_equal_transformers_with_a_node_per_stage(extra_nodes, checkpoint, tp, pp, partition):
    prompts = _prompts(3)
    _wait_for_every_cpu_free()
    llm = LLM(checkpoint, executor_factory=None, device="cpu", tensor_parallel_size=tp, pipeline_parallel_size=pp,
              pipeline_partition=partition, cpus_per_rank=1, num_spare_ranks=0)
    try:
        stages = _stage_nodes(llm.engine.executor)
        outs = llm.generate(prompts, GREEDY)
    finally:
        llm.shutdown()
    assert [len(nodes) for nodes in stages] == [1] * pp  # a stage's ranks share a node
    assert len(set.union(*stages)) == pp  # ... and no other stage's
    assert [o.outputs[0].token_ids for o in outs] == _hf_greedy(checkpoint, prompts, NEW_TOKENS)


class StageRecorder:
    """The engine's metrics sink, keeping what it reports of each step and the prefix cache's hits."""

    def __init__(self):
        self.stages, self.steps, self.prefix_hits = [], 0, 0

    def on_step(self, *args):
        self.steps += 1

    def on_stages(self, compute_seconds, sent_bytes):
        self.stages.append((compute_seconds, sent_bytes))

    def on_prefix_cache(self, queried, hits):
        self.prefix_hits += hits

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def _engine(checkpoint: str, metrics=None, **overrides) -> AsyncEngine:
    config = dict(model=checkpoint, device="cpu", pipeline_parallel_size=2, cpus_per_rank=1, num_spare_ranks=0,
                  max_model_len=128, placement_timeout_s=5, step_timeout_s=20)
    return AsyncEngine(EngineConfig.parse({**config, **overrides}), metrics=metrics)


async def _streams(engine: AsyncEngine, prompts: list[list[int]], params: SamplingParams, during=None):
    """Every prompt streamed at once; `during(engine)` runs once every stream has a token. -> each stream's tokens
    (from its deltas: a repeated or missing token would show) or the exception it ended with."""
    started: set[int] = set()

    async def stream(i: int, prompt: list[int]):
        tokens = []
        async for out in engine.generate(prompt, params, f"s{i}"):
            tokens.extend(out.delta_token_ids)
            started.add(i)
        return tokens

    tasks = [asyncio.create_task(stream(i, p)) for i, p in enumerate(prompts)]
    if during is not None:
        while len(started) < len(prompts):
            await asyncio.sleep(0.01)
        await during(engine)
    return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=120)


def _run(engine: AsyncEngine, prompts, params, during=None, after=None):
    """Start the engine (and wait for its spare ranks), stream the prompts (see _streams), call after(engine) while
    it still runs, shut it down."""
    async def main():
        await engine.start()
        try:
            spares = engine.core.config.num_spare_ranks * engine.core.config.pipeline_parallel_size
            if spares:  # they come up a few seconds after the group
                assert await asyncio.to_thread(engine.core.executor.spares_ready, 120) == spares
            results = await _streams(engine, prompts, params, during)
            if after is not None:
                await asyncio.to_thread(after, engine)
            return results
        finally:
            await engine.shutdown()

    return asyncio.run(main())


def test_micro_batches_with_chunked_prefill_and_a_cached_prefix_equal_transformers(extra_nodes, checkpoint):
    """Two micro-batches taking turns, four steps in flight (each micro-batch's next step queued at the first
    stage, its tokens coming from the last stage directly), prompts prefilled in chunks of at most 16 tokens, and
    sequences that share a 20-token prefix (computed once, then read from the cache)."""
    prompts = _prompts(8, shared_prefix=20)
    recorder = StageRecorder()
    engine = _engine(checkpoint, max_num_batched_tokens=16, metrics=recorder)
    submit, running, most, ahead = engine.core.executor.submit, set(), [0], [0]

    def counting_submit(seqs):  # how many steps were in flight at once, and rows sent before their token was back
        step = submit(seqs)
        running.add(step)
        most[0] = max(most[0], len(running))
        ahead[0] += sum(PREVIOUS_TOKEN in s.token_ids for s in seqs)
        step.add_done_callback(running.discard)
        return step

    engine.core.executor.submit = counting_submit
    results = _run(engine, prompts, GREEDY)
    assert results == _hf_greedy(checkpoint, prompts, NEW_TOKENS)
    assert most[0] == 4
    assert ahead[0] > 8 * NEW_TOKENS // 4  # most decode rows went out before their previous token was back
    assert recorder.prefix_hits >= 16 * 7  # the shared prefix's full blocks, for all but the first sequence
    # Every step reports each stage's compute time, and the bytes stage 0 sent: its tokens' residual stream.
    assert len(recorder.stages) == recorder.steps > 0
    hidden_bytes = load_reference(checkpoint).config.hidden_size * 4  # float32
    for seconds, sent in recorder.stages:
        assert len(seconds) == 2 and min(seconds) > 0
        assert len(sent) == 1 and sent[0] > 0 and sent[0] % hidden_bytes == 0


def test_penalized_micro_batches_equal_transformers(extra_nodes, checkpoint):
    """A repetition penalty needs every token so far on the last stage, where a micro-batch's step follows its
    previous one by two steps and its newest token comes as PREVIOUS_TOKEN: the ranks keep each sequence's history
    over the steps in flight, and the tokens equal transformers' with the same penalty."""
    prompts = _prompts(6)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, repetition_penalty=1.8)
    results = _run(_engine(checkpoint), prompts, params)
    assert results == _hf_greedy(checkpoint, prompts, NEW_TOKENS, repetition_penalty=1.8)



LONG = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)


def test_a_killed_rank_of_the_last_stage_is_rebuilt_alone_and_loses_no_stream(extra_nodes, checkpoint):
    import os
    import signal

    prompts = _prompts(16)
    pids = {}

    async def kill_last_stage(engine):
        pids["before"] = await asyncio.to_thread(engine.core.executor.worker_pids)
        os.kill(pids["before"][-1], signal.SIGKILL)

    engine = _engine(checkpoint, tensor_parallel_size=1)  # no spare: the stage is rebuilt, the first one kept
    results = _run(engine, prompts, LONG, during=kill_last_stage,
                   after=lambda engine: pids.update(after=engine.core.executor.worker_pids()))
    assert results == _hf_greedy(checkpoint, prompts, LONG.max_tokens)
    assert engine.core.supervisor.recoveries == {"rebuild": 1}
    assert pids["after"][0] == pids["before"][0] and pids["after"][1] != pids["before"][1]


def _hold_head_cpus() -> list:
    """Take every CPU of the head node, so that the stages go on the added nodes."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    head = ray.get_runtime_context().get_node_id()
    cpus = int(next(n for n in ray.nodes() if n["NodeID"] == head)["Resources"]["CPU"])
    holders = [_CpuHolder.options(scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False)).remote()
               for _ in range(cpus)]
    ray.get([h.ready.remote() for h in holders])
    return holders


def _lose_node(extra_nodes: ExtraNodes, node_id: str, pids: list[int]) -> None:
    """A node lost as a machine is: its raylet removed and, with it, its ranks' processes (pids). Cluster.remove_node
    stops only the raylet; its workers notice later, and may finish every stream first (seen on a fast machine)."""
    import os
    import signal

    extra_nodes.remove(node_id)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_removed_node_moves_its_stage_to_a_spare_node_then_without_one_the_error_is_clear(extra_nodes, checkpoint):
    holders = _hold_head_cpus()
    try:
        extra_nodes.add()  # 3 added nodes of 2 CPUs, 2 stages of 2 ranks of 1 CPU: one node to spare
        prompts = _prompts(16)
        seen = {}

        async def remove_a_stage_node(engine):
            stages = await asyncio.to_thread(_stage_nodes, engine.core.executor)
            seen["pids"] = await asyncio.to_thread(engine.core.executor.worker_pids)
            seen["before"] = set.union(*stages)
            seen["removed"] = next(iter(stages[1]))
            seen["spare"] = {n.node_id for n in extra_nodes.nodes} - seen["before"]
            _lose_node(extra_nodes, seen["removed"], seen["pids"][2:])

        def after(engine):
            seen["after"] = set.union(*_stage_nodes(engine.core.executor))
            seen["pids_after"] = engine.core.executor.worker_pids()

        engine = _engine(checkpoint, tensor_parallel_size=2)
        results = _run(engine, prompts, LONG, during=remove_a_stage_node, after=after)
        assert results == _hf_greedy(checkpoint, prompts, LONG.max_tokens)
        assert engine.core.supervisor.recoveries == {"rebuild": 1}
        assert seen["after"] == seen["before"] - {seen["removed"]} | seen["spare"]  # the lost stage went to the spare
        assert seen["pids_after"][:2] == seen["pids"][:2]  # the first stage was kept

        # Two nodes of 2 CPUs left, both used by the pipeline: removing one leaves its stage nowhere to go.
        async def remove_without_spare(engine):
            stages = await asyncio.to_thread(_stage_nodes, engine.core.executor)
            pids = await asyncio.to_thread(engine.core.executor.worker_pids)
            _lose_node(extra_nodes, next(iter(stages[0])), pids[:2])

        engine = _engine(checkpoint, tensor_parallel_size=2, min_tensor_parallel_size=2, placement_timeout_s=2,
                         init_timeout_s=20)
        results = _run(engine, prompts, LONG, during=remove_without_spare)
        assert all(isinstance(r, RuntimeError) for r in results), results
        assert "pipeline cannot be placed" in str(results[0]) and "pipeline_parallel_size=2" in str(results[0])
        assert engine.failed is not None
    finally:
        for h in holders:
            ray.kill(h)


def test_a_pipeline_larger_than_the_cluster_is_a_clear_error(extra_nodes, checkpoint):
    with pytest.raises(PipelineUnplaceable) as err:
        LLM(checkpoint, executor_factory=None, device="cpu", tensor_parallel_size=4, pipeline_parallel_size=2,
            num_spare_ranks=0, placement_timeout_s=2, min_tensor_parallel_size=4)
    assert "tensor_parallel_size=4" in str(err.value) and "pipeline_parallel_size=2" in str(err.value)


def test_a_partition_that_does_not_fit_the_model_is_refused_before_any_rank_starts(extra_nodes, checkpoint):
    with pytest.raises(ValueError, match=r"pipeline_partition=\[1, 2\]"):
        LLM(checkpoint, executor_factory=None, device="cpu", pipeline_parallel_size=2, pipeline_partition=[1, 2])
    with pytest.raises(ValueError, match=r"pipeline_parallel_size=5 is larger than the model's 4 layers"):
        LLM(checkpoint, executor_factory=None, device="cpu", pipeline_parallel_size=5)


@pytest.mark.parametrize("spare_up", [True, False], ids=["spare", "no_spare_up"])
def test_a_killed_rank_of_a_stage_is_replaced_and_every_other_rank_keeps_everything(extra_nodes, checkpoint, spare_up):
    """TP=2 x PP=2 with a warm spare per stage: a rank of the second stage killed mid-stream is replaced by its
    stage's spare (its shard and KV cache from the stage's store in /dev/shm), or, its spare killed first, by a rank
    started in its place that maps them (the path a GPU rank with gpu_host_copies takes, having no spare); every
    other rank keeps its process, no computed token is thrown away, and every stream ends as without the fault."""
    import os
    import signal

    prompts = _prompts(16)
    seen = {}

    async def kill_a_second_stage_rank(engine):
        seen["before"] = await asyncio.to_thread(engine.core.executor.worker_pids)
        if not spare_up:
            for spare in engine.core.executor.spares[1].handles:
                ray.kill(spare, no_restart=True)
        os.kill(seen["before"][3], signal.SIGKILL)  # stage 1, rank 1

    engine = _engine(checkpoint, tensor_parallel_size=2, num_spare_ranks=1)
    results = _run(engine, prompts, LONG, during=kill_a_second_stage_rank,
                   after=lambda engine: seen.update(after=engine.core.executor.worker_pids()))
    assert results == _hf_greedy(checkpoint, prompts, LONG.max_tokens)
    assert engine.core.supervisor.recoveries == {"replace": 1}
    assert engine.core.recomputed_tokens == 0
    assert seen["after"][:3] == seen["before"][:3] and seen["after"][3] != seen["before"][3]
