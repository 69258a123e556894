"""raytp's TP model vs transformers on random checkpoints (safetensors, and GGUF), at TP = 1, 2 and 4 on CPU (gloo).

For each checkpoint: the prefill logits of a 20-token prompt match
transformers' full-sequence logits (fp32, 1e-4 relative), and 16 greedy
tokens (prefill, then one token per step through the paged cache, block size
4, shuffled block table) equal `generate(do_sample=False)`. TP>1 runs in a
pool of spawned ranks per degree (tests.helpers.RankPool), one pool for the
whole module.
"""
import math

import numpy as np
import pytest
import torch

from raytp.cluster.comm import Communicator, SingleRank
from raytp.model.attention import SeqChunk, build_metadata, select_backend
from raytp.model.loader import load_model
from tests.helpers import (RankPool, load_reference, write_gguf, write_llama, write_mistral, write_mixtral, write_olmoe,
                           write_qwen2, write_qwen3, write_qwen3_moe)

PROMPT_LEN, NEW_TOKENS, BLOCK_SIZE, NUM_BLOCKS = 20, 16, 4, 16
RTOL = 1e-4
CPU = torch.device("cpu")

CASES = {
    "llama_gqa": lambda tmp: write_llama(tmp, seed=1),
    "llama_mqa": lambda tmp: write_llama(tmp, seed=2, num_key_value_heads=1),  # fewer KV heads than TP 2 and 4
    "llama3_rope": lambda tmp: write_llama(
        tmp,
        seed=3,
        rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
        },
    ),
    # Larger weights: with tied embeddings and small ones the greedy path just repeats the last token.
    "qwen2_tied": lambda tmp: write_qwen2(tmp, seed=4, tie_word_embeddings=True, initializer_range=0.2),
    "mistral_window": lambda tmp: write_mistral(tmp, seed=5, sliding_window=8),
    "llama_vocab101": lambda tmp: write_llama(tmp, seed=6, vocab_size=101),
    # llama.cpp's format: GGUF names, permuted Q/K rows, and a different block format in every linear.
    "llama_gguf": lambda tmp: write_gguf(write_llama(tmp, seed=7)),
}
# Qwen3 (QK norm) and mixtures of experts (moe.py): 8 experts, top 2, at every TP degree with the experts sliced
# (expert_parallel false) or whole per rank (true). Wider weights than transformers' default init, so that the
# routing and the greedy tokens are decided by clear margins.
MOE_CASES = {
    "qwen3": lambda tmp: write_qwen3(tmp, seed=8, initializer_range=0.1),
    "mixtral": lambda tmp: write_mixtral(tmp, seed=9, initializer_range=0.1),
    # Qwen3-MoE with its top-k weights renormalised and layer 1's MLP dense (mlp_only_layers).
    "qwen3_moe": lambda tmp: write_qwen3_moe(tmp, seed=10, initializer_range=0.1, norm_topk_prob=True,
                                             mlp_only_layers=[1]),
    # OLMoE: QK norm over all heads at once (an all-reduce of squares at TP > 1), q/k/v clipped.
    "olmoe": lambda tmp: write_olmoe(tmp, seed=12, initializer_range=0.1, clip_qkv=3.0),
}
CASES.update(MOE_CASES)


def rel_err(a, b) -> float:
    """max|a - b| / max|b|"""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max())


def shuffled_blocks(num_blocks: int, seed: int) -> list[int]:
    return torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()


# ---- what every rank runs (module-level so spawned ranks can unpickle it) ----


def prefill_and_greedy(comm: Communicator, path: str, prompt: list[int], new_tokens: int, block_table: list[int],
                       attention: str = "reference", expert_parallel: bool = False):
    """Prefill `prompt`, then decode greedily one token per step. Returns (prefill logits (T, V), tokens)."""
    model = load_model(path, comm, progress=False, attention=select_backend("cpu", attention),
                       expert_parallel=expert_parallel)
    window = model.args.sliding_window
    cache = torch.zeros(model.kv_cache_shape(NUM_BLOCKS * BLOCK_SIZE))

    def step(ids: list[int], start: int) -> torch.Tensor:
        meta = build_metadata([SeqChunk(start, len(ids), block_table)], BLOCK_SIZE, CPU, window)
        return model.compute_logits(model(torch.tensor(ids), meta, cache))  # (len(ids), V)

    prefill_logits = step(prompt, 0)
    logits, tokens = prefill_logits, []
    while True:
        # Rank 0 picks the token and every rank feeds that one (as the engine does).
        token = comm.broadcast(logits[-1].argmax().reshape(1), src=0)
        tokens.append(int(token))
        if len(tokens) == new_tokens:
            return prefill_logits.numpy(), tokens
        logits = step(tokens[-1:], len(prompt) + len(tokens) - 1)


def batched_vs_separate(comm: Communicator, path: str, prompt_a: list[int], prompt_b: list[int], next_b: int):
    """Sequence A prefills (len(prompt_a) tokens) in the same step as sequence B decodes one token.

    Returns (A's prefill logits, B's decode logits) run separately, and the
    same batched in both orders.
    """
    model = load_model(path, comm, progress=False)
    blocks = shuffled_blocks(NUM_BLOCKS, seed=7)
    table_a, table_b = blocks[:4], blocks[4:10]
    lb = len(prompt_b)

    def run(chunks_ids, cache):
        chunks = [c for c, _ in chunks_ids]
        ids = torch.tensor([t for _, seq in chunks_ids for t in seq])
        meta = build_metadata(chunks, BLOCK_SIZE, CPU, model.args.sliding_window)
        return model.compute_logits(model(ids, meta, cache))  # (T, V)

    def fresh_cache_with_b():
        cache = torch.zeros(model.kv_cache_shape(NUM_BLOCKS * BLOCK_SIZE))
        run([(SeqChunk(0, lb, table_b), prompt_b)], cache)  # B's prompt, already in the cache
        return cache

    chunk_a = (SeqChunk(0, len(prompt_a), table_a), prompt_a)
    chunk_b = (SeqChunk(lb, 1, table_b), [next_b])
    cache = fresh_cache_with_b()
    alone_a = run([chunk_a], cache)
    alone_b = run([chunk_b], fresh_cache_with_b())
    ab = run([chunk_a, chunk_b], fresh_cache_with_b())
    ba = run([chunk_b, chunk_a], fresh_cache_with_b())
    n = len(prompt_a)
    return {
        "alone": (alone_a.numpy(), alone_b.numpy()),
        "a_then_b": (ab[:n].numpy(), ab[n:].numpy()),
        "b_then_a": (ba[1:].numpy(), ba[:1].numpy()),
    }


# ---- fixtures ----


@pytest.fixture(scope="module")
def pools(request):
    """One RankPool per TP degree, shared by the module's tests.

    The pools that the selected tests need start right away, so that their
    ranks boot while this process writes checkpoints and runs transformers.
    """
    needed = {
        item.callspec.params["tp"]
        for item in request.session.items
        if item.module is request.module and hasattr(item, "callspec") and item.callspec.params.get("tp", 1) > 1
    }
    made: dict[int, RankPool] = {world: RankPool(world) for world in sorted(needed)}

    def get(world: int) -> RankPool:
        if world not in made or made[world].closed:
            made[world] = RankPool(world)
        return made[world]

    yield get
    for pool in made.values():
        pool.stop()  # all pools wind down at once
    for pool in made.values():
        pool.close()


def run_on(tp: int, pools, fn, **kwargs):
    """fn's result on rank 0 of a TP group of `tp` ranks (TP=1 runs in this process)."""
    if tp == 1:
        return fn(SingleRank(), **kwargs)
    return pools(tp).run(fn, **kwargs)[0]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """case -> (checkpoint path, prompt, transformers' logits (T, V), transformers' greedy tokens), computed once."""
    from transformers import GenerationConfig

    tmp = tmp_path_factory.mktemp("tp_ckpts")
    cache = {}

    def get(case: str):
        if case not in cache:
            path = CASES[case](tmp)
            ref = load_reference(path)
            gen = torch.Generator().manual_seed(list(CASES).index(case))
            prompt = torch.randint(0, ref.config.vocab_size, (1, PROMPT_LEN), generator=gen)
            with torch.no_grad():
                logits = ref(prompt).logits[0]  # (T, V)
                # transformers 5 fills unset fields of a passed GenerationConfig from the model's
                # (eos_token_id=2 here), and min_new_tokens would mask that token rather than
                # generate it: clear eos on the model so greedy runs its full length unaltered.
                ref.generation_config.eos_token_id = None
                config = GenerationConfig(do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0)
                out = ref.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config)
            tokens = out[0, PROMPT_LEN:].tolist()
            assert len(tokens) == NEW_TOKENS
            cache[case] = (path, prompt[0].tolist(), logits, tokens)
        return cache[case]

    return get


# ---- tests ----


@pytest.mark.timeout(180)
@pytest.mark.parametrize("attention", ["reference", "cpu"])
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("case", [c for c in CASES if c not in MOE_CASES])
def test_matches_transformers(case, tp, attention, references, pools):
    path, prompt, ref_logits, ref_tokens = references(case)
    n_blocks = math.ceil((PROMPT_LEN + NEW_TOKENS) / BLOCK_SIZE)
    table = shuffled_blocks(NUM_BLOCKS, seed=tp)[:n_blocks]
    assert table != sorted(table)
    logits, tokens = run_on(tp, pools, prefill_and_greedy, path=path, prompt=prompt, new_tokens=NEW_TOKENS, block_table=table,
                            attention=attention)
    assert logits.shape == tuple(ref_logits.shape)
    err = rel_err(logits, ref_logits)
    print(f"{case} tp={tp} {attention}: max relative error {err:.2e}")
    assert err < RTOL, f"{case} at TP={tp} with {attention} attention: relative error {err:.2e}"
    assert tokens == ref_tokens


@pytest.mark.timeout(180)
@pytest.mark.parametrize("expert_parallel", [False, True])
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("case", list(MOE_CASES))
def test_qwen3_and_mixtures_of_experts_match_transformers(case, tp, expert_parallel, references, pools):
    if expert_parallel and (tp == 1 or case == "qwen3"):
        pytest.skip("the same split as expert_parallel false (one rank, or no experts)")
    path, prompt, ref_logits, ref_tokens = references(case)
    n_blocks = math.ceil((PROMPT_LEN + NEW_TOKENS) / BLOCK_SIZE)
    table = shuffled_blocks(NUM_BLOCKS, seed=tp)[:n_blocks]
    logits, tokens = run_on(tp, pools, prefill_and_greedy, path=path, prompt=prompt, new_tokens=NEW_TOKENS,
                            block_table=table, attention="cpu", expert_parallel=expert_parallel)
    err = rel_err(logits, ref_logits)
    logprob_err = float((torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), -1)
                         - torch.log_softmax(ref_logits.double(), -1)).abs().max())
    print(f"{case} tp={tp} expert_parallel={expert_parallel}: max relative error {err:.2e}, logprobs {logprob_err:.2e}")
    assert err < RTOL, f"{case} at TP={tp}, expert_parallel={expert_parallel}: relative error {err:.2e}"
    assert logprob_err < 2e-3
    assert tokens == ref_tokens


def test_sliding_window_is_exercised(references):
    """The Mistral case only tests the window if the window changes the logits."""
    path, prompt, ref_logits, _ = references("mistral_window")
    ref = load_reference(path)
    ref.config.sliding_window = None
    with torch.no_grad():
        unwindowed = ref(torch.tensor([prompt])).logits[0]
    print(f"window 8: positions 8+ differ from unwindowed by {rel_err(unwindowed[8:], ref_logits[8:]):.2e} relative")
    assert rel_err(unwindowed[:8], ref_logits[:8]) < 1e-6  # within the window: the same
    assert rel_err(unwindowed[8:], ref_logits[8:]) > 1e-3  # past it: different


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tp", [1, 2])
def test_batch_prefill_and_decode_match_separate(tp, references, pools):
    path = references("llama_gqa")[0]
    gen = torch.Generator().manual_seed(11)
    prompt_a = torch.randint(0, 128, (7,), generator=gen).tolist()
    prompt_b = torch.randint(0, 128, (13,), generator=gen).tolist()
    out = run_on(tp, pools, batched_vs_separate, path=path, prompt_a=prompt_a, prompt_b=prompt_b, next_b=5)
    alone_a, alone_b = out["alone"]
    assert alone_a.shape == (7, 128) and alone_b.shape == (1, 128)
    for order in ("a_then_b", "b_then_a"):
        a, b = out[order]
        print(f"batch tp={tp} {order}: relative error A {rel_err(a, alone_a):.2e}, B {rel_err(b, alone_b):.2e}")
        assert rel_err(a, alone_a) < 1e-5, order
        assert rel_err(b, alone_b) < 1e-5, order
    # And B's decode equals transformers on B's whole sequence.
    ref = load_reference(path)
    with torch.no_grad():
        ref_b = ref(torch.tensor([prompt_b + [5]])).logits[0, -1:]
        ref_a = ref(torch.tensor([prompt_a])).logits[0]
    assert rel_err(alone_b, ref_b) < RTOL
    assert rel_err(alone_a, ref_a) < RTOL
    assert np.isfinite(alone_a).all()
