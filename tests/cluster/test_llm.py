"""The offline API and the engine on the session's local Ray cluster (CPU).

Greedy tokens through `LLM` at TP=1 and TP=2 equal transformers'
`generate(do_sample=False)`; the engine's continuous batching, KV block
accounting, preemption, seeded sampling, stop strings and stop tokens are
checked through `LLM` and its `EngineCore` (`llm.engine`).

The cluster has 4 CPUs and every rank takes one, so `llms` keeps one LLM
alive at a time and hands it to consecutive tests that ask for the same one:
tests are ordered so that each LLM is built once.
"""
import os
import time

import pytest
import ray
import torch

from raytp import LLM, SamplingParams
from raytp.cluster.group import PlacementError
from raytp.engine.scheduler import SeqStatus
from tests.helpers import load_reference, write_llama, write_qwen2

pytestmark = pytest.mark.timeout(90)

NEW_TOKENS = 16
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
# Token-id prompts of 3, 11 and 29 tokens (the checkpoints' vocab is 128).
PROMPTS = [torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (3, 11, 29)]


class OneLLM:
    """At most one LLM alive at a time; the same key gets the same LLM back."""

    def __init__(self):
        self.key, self.llm = None, None

    def get(self, key: str, model: str, **config) -> LLM:
        if key != self.key:
            self.close()
            # executor_factory=None: the Ray TPGroup, on the session's cluster.
            # No spare ranks: no test here kills a rank (test_elastic.py does).
            self.llm = LLM(model, executor_factory=None, device="cpu", num_spare_ranks=0, **config)
            self.key = key
        return self.llm

    def forget(self) -> None:
        """The test shut the current LLM down itself."""
        self.key, self.llm = None, None

    def close(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
        self.forget()


@pytest.fixture(scope="module")
def llms(ray_cluster):
    pool = OneLLM()
    yield pool
    pool.close()


def hf_greedy(path: str, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    from transformers import GenerationConfig

    ref = load_reference(path)
    # Random checkpoints may emit their eos id (2): greedy must run its full length, as with ignore_eos.
    ref.generation_config.eos_token_id = None
    config = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
    out = []
    for prompt in prompts:
        ids = torch.tensor([prompt])  # (1, S)
        out.append(ref.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)[0, len(prompt):].tolist())
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (path, transformers' greedy tokens for PROMPTS)."""
    tmp = tmp_path_factory.mktemp("llm_ckpts")
    # initializer_range 0.1 (not 0.02): random weights that do not repeat one token forever.
    paths = {
        "llama": write_llama(tmp, seed=11, initializer_range=0.1),  # 4 heads, 2 KV heads (GQA)
        "qwen2": write_qwen2(tmp, seed=12, initializer_range=0.1, tie_word_embeddings=True),
    }
    return {name: (path, hf_greedy(path, PROMPTS, NEW_TOKENS)) for name, path in paths.items()}


def llama_tp2(llms, checkpoints) -> LLM:
    return llms.get("llama-tp2", checkpoints["llama"][0], tensor_parallel_size=2)


def tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


# ---- greedy equals transformers ----------------------------------------------------------


# Qwen2 first and Llama TP=2 last: the engine tests below reuse that LLM.
@pytest.mark.parametrize("name, tp", [("qwen2", 1), ("qwen2", 2), ("llama", 1), ("llama", 2)],
                         ids=["qwen2_tied-tp1", "qwen2_tied-tp2", "llama_gqa-tp1", "llama_gqa-tp2"])
def test_greedy_matches_transformers(llms, checkpoints, name, tp):
    path, expected = checkpoints[name]
    llm = llms.get(f"{name}-tp{tp}", path, tensor_parallel_size=tp)
    assert llm.engine.executor.tp_size == tp
    outs = llm.generate(PROMPTS, GREEDY)  # one batch that mixes prompt lengths
    assert tokens(outs) == expected
    for out, prompt in zip(outs, PROMPTS):
        assert out.finished and out.prompt_token_ids == prompt
        assert out.outputs[0].finish_reason == "length" and out.outputs[0].text == ""  # no tokenizer


# ---- the engine: joining, continuous batching, KV blocks, seeds ----------------------------


def test_request_joining_a_running_batch_gets_its_alone_tokens(llms, checkpoints):
    llm = llama_tp2(llms, checkpoints)
    expected = checkpoints["llama"][1]
    alone = [tokens(llm.generate(p, GREEDY))[0] for p in (PROMPTS[2], PROMPTS[0])]
    assert alone == [expected[2], expected[0]]

    core = llm.engine
    first = core.add_request("join-first", PROMPTS[2], GREEDY)
    for _ in range(3):
        core.step()
    assert len(first.seq.output_token_ids) == 3
    second = core.add_request("join-second", PROMPTS[0], GREEDY)
    core.step()  # the second one's prefill rides along with the first one's decode
    assert {s.request_id for s in core.scheduler.running} == {"join-first", "join-second"}
    while core.has_work():
        core.step()
    assert first.seq.output_token_ids == alone[0]
    assert second.seq.output_token_ids == alone[1]


def test_cached_prefix_gives_transformers_tokens_at_tp2(llms, checkpoints):
    """A request that shares two full blocks with an earlier one starts from the cached blocks (the same block
    ids on both ranks) and still gets transformers' tokens."""
    llm = llama_tp2(llms, checkpoints)
    base = PROMPTS[2] + PROMPTS[1]  # 40 tokens: two full 16-token blocks
    prompts = [base + [5], base[:36] + [6, 7]]
    expected = hf_greedy(checkpoints["llama"][0], prompts, NEW_TOKENS)
    llm.engine.scheduler.take_prefix_stats()  # forget the earlier tests' lookups
    assert [tokens(llm.generate(p, GREEDY))[0] for p in prompts] == expected
    stats = llm.engine.scheduler.take_prefix_stats()
    assert stats.hit_tokens >= 32


def test_short_request_finishes_first(llms, checkpoints):
    core = llama_tp2(llms, checkpoints).engine
    long = core.add_request("cb-long", PROMPTS[1], SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True))
    finished_at, step = {}, 0
    while core.has_work():
        step += 1
        if step == 3:
            short = core.add_request("cb-short", PROMPTS[0], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
        for out in core.step():
            if out.finished:
                finished_at[out.request_id] = step
                if out.request_id == "cb-short":
                    # The long one keeps running through and after the short one's life.
                    assert long.seq.status is SeqStatus.RUNNING and len(long.seq.output_token_ids) == 6
    # Admitted at once (no waiting for the long one): 4 tokens in steps 3, 4, 5, 6.
    assert finished_at == {"cb-short": 6, "cb-long": 64}
    assert len(short.seq.output_token_ids) == 4 and len(long.seq.output_token_ids) == 64
    assert long.seq.finish_reason == short.seq.finish_reason == "length"


def test_kv_blocks_all_free_after_finish_and_abort(llms, checkpoints):
    core = llama_tp2(llms, checkpoints).engine
    blocks = core.scheduler.blocks
    assert blocks.num_free == blocks.num_blocks
    states = [core.add_request(f"kv-{i}", p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
              for i, (p, n) in enumerate(zip(PROMPTS, (8, 40, 16)))]
    # Aborted while waiting: never scheduled, nothing to free.
    never = core.add_request("kv-never", PROMPTS[0], GREEDY)
    core.abort("kv-never")
    assert never.seq.status is SeqStatus.FINISHED and never.seq.block_table == []
    for _ in range(4):
        core.step()
    assert blocks.num_free < blocks.num_blocks
    aborted = states[1].seq
    assert aborted.block_table
    core.abort("kv-1")  # mid-way
    assert aborted.status is SeqStatus.FINISHED and aborted.block_table == [] and len(aborted.output_token_ids) == 4
    core.abort("no-such-request")  # harmless
    seen = set()
    while core.has_work():
        seen |= {out.request_id for out in core.step()}
    assert "kv-1" not in seen and "kv-never" not in seen
    assert len(aborted.output_token_ids) == 4
    assert [len(s.seq.output_token_ids) for s in (states[0], states[2])] == [8, 16]
    assert blocks.num_free == blocks.num_blocks
    assert core.requests == {} and not core.scheduler.running and not core.scheduler.waiting


def test_seeded_sampling_is_reproducible(llms, checkpoints):
    llm = llama_tp2(llms, checkpoints)
    seeded = SamplingParams(max_tokens=NEW_TOKENS, temperature=1.0, seed=42, ignore_eos=True)
    alone = tokens(llm.generate(PROMPTS[0], seeded))[0]
    assert tokens(llm.generate(PROMPTS[0], seeded))[0] == alone
    # In a batch, at another position, next to an unseeded request and one with another seed.
    batch = llm.generate(
        [PROMPTS[1], PROMPTS[2], PROMPTS[0]],
        [SamplingParams(max_tokens=24, temperature=1.0, ignore_eos=True),
         SamplingParams(max_tokens=8, temperature=0.8, top_k=20, seed=7, ignore_eos=True),
         seeded],
    )
    assert tokens(batch)[2] == alone
    other = tokens(llm.generate(PROMPTS[0], SamplingParams(max_tokens=NEW_TOKENS, temperature=1.0, seed=43, ignore_eos=True)))[0]
    assert other != alone
    # Sampling, not greedy: the seeded tokens are not the argmax ones.
    assert alone != checkpoints["llama"][1][0]


# ---- placement ----------------------------------------------------------------------------


def test_placement_failure_is_fast_and_clear(ray_cluster, tmp_path):
    # Shapes allow TP=8 (8 heads, 8 KV heads, intermediate 128), the cluster does not.
    path = write_llama(tmp_path, num_attention_heads=8, num_key_value_heads=8)
    t0 = time.monotonic()
    with pytest.raises(PlacementError) as err:
        LLM(path, device="cpu", tensor_parallel_size=8, min_tensor_parallel_size=8, placement_timeout_s=2)
    assert time.monotonic() - t0 < 10
    msg = str(err.value)
    assert "tensor_parallel_size=8" in msg and "8 CPUs" in msg
    assert f"largest node has {ray_cluster.num_cpus} CPUs" in msg
    # The pending placement group was removed, not left to grab CPUs later.
    states = [pg["state"] for pg in ray.util.placement_group_table().values()]
    assert "PENDING" not in states


# ---- the tiny model (with a tokenizer): preemption, stop strings, stop tokens --------------

TINY_PROMPTS = ["The quick brown fox", "Once upon a time there was", "Science is", "Computers follow instructions"]


def tiny(llms) -> LLM:
    # KV cache for exactly one full-length sequence: 16 blocks x 4 tokens = max_model_len 64.
    return llms.get("tiny-small-kv", "tiny", max_model_len=64, block_size=4, num_kv_blocks=16)


def test_preemption_keeps_greedy_tokens(llms):
    llm = tiny(llms)
    core = llm.engine
    assert core.scheduler.blocks.num_blocks == 16
    greedy = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    seeded = SamplingParams(max_tokens=40, temperature=1.0, seed=5, ignore_eos=True)
    params = [greedy] * 4 + [seeded]
    prompts = TINY_PROMPTS + ["Cooking is"]
    # Alone, each request fits in the cache: the unconstrained run.
    alone = [tokens(llm.generate(p, sp))[0] for p, sp in zip(prompts, params)]
    states = [core.add_request(f"pre-{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params))]
    while core.has_work():
        core.step()
    assert [s.seq.output_token_ids for s in states] == alone
    assert sum(s.seq.num_preemptions for s in states) > 0
    assert core.scheduler.blocks.num_free == 16


def test_stop_string_cuts_output_exactly(llms):
    llm = tiny(llms)
    base = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    orig = llm.generate(TINY_PROMPTS[0], base)[0].outputs[0]
    text = orig.text
    assert len(text) > 12, text
    sub = text[len(text) // 2 : len(text) // 2 + 3]
    cut = text.index(sub)
    out = llm.generate(TINY_PROMPTS[0], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop=[sub]))[0]
    got = out.outputs[0]
    assert got.text == text[:cut]
    assert got.finish_reason == "stop" and got.stop_reason == sub
    assert got.token_ids == orig.token_ids[: len(got.token_ids)] and len(got.token_ids) < len(orig.token_ids)
    # Two stop strings: the earliest match wins, whatever the list order.
    later = text[-3:]
    if text.index(later) > cut:
        got = llm.generate(TINY_PROMPTS[0], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True,
                                                           stop=[later, sub]))[0].outputs[0]
        assert got.text == text[:cut] and got.stop_reason == sub


def test_stop_token_ids_cut_output_exactly(llms):
    llm = tiny(llms)
    base = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    orig = llm.generate(TINY_PROMPTS[1], base)[0].outputs[0]
    ids = orig.token_ids
    # A token that first appears a few tokens in, where the text before it is a clean prefix.
    k = next(i for i in range(3, len(ids)) if ids[i] not in ids[:i] and orig.text.startswith(llm.tokenizer.decode(ids[:i])))
    stop_id = ids[k]
    got = llm.generate(TINY_PROMPTS[1], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True,
                                                       stop_token_ids=[stop_id]))[0].outputs[0]
    # The stop token is the last token id; its text is not in the output (as in vLLM).
    assert got.token_ids == ids[: k + 1]
    assert got.text == llm.tokenizer.decode(ids[:k])
    assert got.finish_reason == "stop" and got.stop_reason == stop_id


# ---- the offline API contract ------------------------------------------------------------


def _gone(pid: int) -> bool:
    """No such process, or a zombie waiting to be reaped (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_offline_api_and_shutdown(llms, ray_cluster):
    llm = tiny(llms)
    outs = llm.generate(["Hello", "The days of the week"], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    assert [o.prompt for o in outs] == ["Hello", "The days of the week"]
    for o in outs:
        c = o.outputs[0]
        assert o.finished and len(c.token_ids) == 5 and isinstance(c.text, str) and c.finish_reason == "length"
        assert c.text == llm.tokenizer.decode(c.token_ids)
    workers = list(llm.engine.executor.workers)
    pids = llm.engine.executor.worker_pids()
    assert len(pids) == 1 and os.getpid() not in pids
    llm.shutdown()
    llms.forget()
    for w in workers:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(w.ping.remote(), timeout=10)
    deadline = time.monotonic() + 15
    while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(_gone(p) for p in pids)
    llm.shutdown()  # a second shutdown is harmless
