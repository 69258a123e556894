"""CUDA: the NCCL communicator (world size 1) and the model on GPU vs transformers on GPU.

Skipped as a whole without CUDA; the NCCL tests also skip without cupy.
"""
import pytest
import torch

from raytp.cluster.comm import SingleRank
from raytp.model.attention import SeqChunk, build_metadata
from raytp.model.loader import load_model
from tests.helpers import load_reference, write_llama

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

DEVICE = "cuda"
PROMPT_LEN, NEW_TOKENS, BLOCK_SIZE, NUM_BLOCKS = 20, 16, 4, 16


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b|"""
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).abs().max() / b.abs().max())


# ---- NCCL ----


@pytest.fixture
def nccl():
    pytest.importorskip("cupy")
    from raytp.cluster.comm import NcclCommunicator, nccl_unique_id

    comm = NcclCommunicator(nccl_unique_id(), 0, 1)
    yield comm
    comm.close()


@pytest.mark.timeout(120)
def test_nccl_world_of_one(nccl):
    assert (nccl.rank, nccl.world_size) == (0, 1)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int64):
        x = (torch.arange(8, device=DEVICE) * 3).to(dtype)
        expected = x.clone()
        y = nccl.all_reduce(x)
        assert y.data_ptr() == x.data_ptr() and torch.equal(y, expected), dtype
        assert torch.equal(nccl.all_gather(x.view(2, 4), dim=-1), expected.view(2, 4)), dtype
        assert torch.equal(nccl.all_gather(x.view(2, 4), dim=0), expected.view(2, 4)), dtype
        assert torch.equal(nccl.broadcast(x, src=0), expected), dtype
    nccl.barrier()
    torch.cuda.synchronize()
    with pytest.raises(TypeError, match="float64"):
        nccl.all_reduce(torch.zeros(2, dtype=torch.float64, device=DEVICE))


@pytest.mark.timeout(120)
def test_nccl_abort_from_another_thread_then_a_new_communicator_works():
    """The path a replacement takes on GPU: abort() from another thread (ncclCommAbort, as the actor's Ray thread
    does while the step thread is stuck) fails the later collectives with CollectiveAborted, and the same process
    joins a new communicator whose collectives work."""
    pytest.importorskip("cupy")
    import threading

    from raytp.cluster.comm import CollectiveAborted, NcclCommunicator, nccl_unique_id

    first = NcclCommunicator(nccl_unique_id(), 0, 1)
    aborter = threading.Thread(target=first.abort)
    aborter.start()
    aborter.join(30)
    with pytest.raises(CollectiveAborted):
        first.all_reduce(torch.ones(4, device=DEVICE))
    second = NcclCommunicator(nccl_unique_id(), 0, 1)
    x = torch.arange(4.0, device=DEVICE)
    assert torch.equal(second.all_reduce(x.clone()), x)
    torch.cuda.synchronize()
    second.close()


# ---- the model on CUDA ----


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = write_llama(tmp_path_factory.mktemp("gpu"), seed=21)
    prompt = torch.randint(0, 128, (PROMPT_LEN,), generator=torch.Generator().manual_seed(21)).tolist()
    return path, prompt


def raytp_prefill_and_greedy(path: str, prompt: list[int], dtype: str, new_tokens: int):
    """TP=1 on CUDA: prefill logits (T, V) and `new_tokens` greedy tokens through the paged cache."""
    model = load_model(path, SingleRank(), dtype=dtype, device=DEVICE, progress=False)
    cache = torch.zeros(model.kv_cache_shape(NUM_BLOCKS * BLOCK_SIZE), dtype=model.dtype, device=DEVICE)
    table = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(5)).tolist()

    def step(ids: list[int], start: int) -> torch.Tensor:
        meta = build_metadata([SeqChunk(start, len(ids), table)], BLOCK_SIZE, torch.device(DEVICE), model.args.sliding_window)
        return model.compute_logits(model(torch.tensor(ids, device=DEVICE), meta, cache))

    prefill = step(prompt, 0)
    logits, tokens = prefill, []
    while len(tokens) < new_tokens:
        tokens.append(int(logits[-1].argmax()))
        if len(tokens) < new_tokens:
            logits = step(tokens[-1:], len(prompt) + len(tokens) - 1)
    return prefill, tokens


def transformers_prefill_and_greedy(path: str, prompt: list[int], dtype: torch.dtype, new_tokens: int):
    from transformers import GenerationConfig

    ref = load_reference(path, dtype=dtype, device=DEVICE)
    ids = torch.tensor([prompt], device=DEVICE)
    ref.generation_config.eos_token_id = None  # never stop early (see tests/unit/test_model_tp.py)
    config = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        logits = ref(ids).logits[0].float()
        out = ref.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return logits, out[0, len(prompt):].tolist()


@pytest.mark.timeout(180)
def test_fp32_on_cuda_matches_transformers(llama):
    path, prompt = llama
    logits, tokens = raytp_prefill_and_greedy(path, prompt, "float32", NEW_TOKENS)
    ref_logits, ref_tokens = transformers_prefill_and_greedy(path, prompt, torch.float32, NEW_TOKENS)
    err = rel_err(logits, ref_logits)
    print(f"fp32 cuda: max relative error {err:.2e}")
    assert err < 1e-3
    assert tokens == ref_tokens


@pytest.mark.timeout(180)
def test_bf16_on_cuda_close_to_transformers(llama):
    path, prompt = llama
    logits, _ = raytp_prefill_and_greedy(path, prompt, "bfloat16", 1)
    ref_logits, _ = transformers_prefill_and_greedy(path, prompt, torch.bfloat16, 1)
    assert logits.dtype == torch.float32 and logits.shape == ref_logits.shape
    err = rel_err(logits, ref_logits)
    agree = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
    print(f"bf16 cuda: max relative error {err:.2e}, argmax agreement {agree:.0%}")
    assert err < 2e-2
    assert agree >= 0.8
