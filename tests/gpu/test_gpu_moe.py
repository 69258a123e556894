"""CUDA: a mixture of experts through torch's grouped GEMM (raytp/model/moe.py), against transformers and against
raytp's own loop over experts, with nothing read on the host. Skipped without CUDA."""
import pytest
import torch

from raytp.cluster.comm import SingleRank
from raytp.model.loader import load_model
from raytp.model.moe import MoE, grouped_mm_is_fast
from tests.gpu.test_gpu import DEVICE, raytp_prefill_and_greedy, rel_err, transformers_prefill_and_greedy
from tests.helpers import write_mixtral

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    path = write_mixtral(tmp_path_factory.mktemp("gpu_moe"), hidden_size=256, intermediate_size=512,
                         num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2, vocab_size=1024,
                         initializer_range=0.1, seed=23)
    prompt = torch.randint(0, 1024, (40,), generator=torch.Generator().manual_seed(23)).tolist()
    return path, prompt


def moe_layers(model) -> list[MoE]:
    return [layer.mlp for layer in model.layers if isinstance(layer.mlp, MoE)]


@pytest.mark.timeout(180)
def test_bf16_mixtral_takes_the_grouped_gemm_where_it_is_fast_and_matches_transformers(mixtral):
    path, prompt = mixtral
    fast = grouped_mm_is_fast(torch.device(DEVICE), torch.bfloat16)
    print(f"{torch.cuda.get_device_name()}: grouped GEMM fast path {fast}")
    model = load_model(path, SingleRank(), dtype="bfloat16", device=DEVICE, progress=False)
    assert all(moe.grouped == fast for moe in moe_layers(model))
    logits, _ = raytp_prefill_and_greedy(path, prompt, "bfloat16", 1)
    ref_logits, _ = transformers_prefill_and_greedy(path, prompt, torch.bfloat16, 1)
    err = rel_err(logits, ref_logits)
    print(f"bf16 mixtral cuda: max relative error {err:.2e}")
    assert err < 3e-2


@pytest.mark.timeout(180)
def test_grouped_gemm_equals_the_expert_loop_and_reads_nothing_on_the_host(mixtral):
    path, _ = mixtral
    if not grouped_mm_is_fast(torch.device(DEVICE), torch.bfloat16):
        pytest.skip("torch's grouped GEMM has no fast kernel on this GPU: raytp loops over the experts here")
    model = load_model(path, SingleRank(), dtype="bfloat16", device=DEVICE, progress=False)
    for i, moe in enumerate(moe_layers(model)):
        x = torch.randn(300, model.args.hidden_size, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(i),
                        dtype=torch.bfloat16)
        moe.forward(x)  # the first call stacks the experts' weights (once, after loading)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any host read of a device value now raises
        try:
            grouped = moe.forward(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        counts = moe.last_counts.clone()
        moe.grouped = False
        looped = moe.forward(x)
        moe.grouped = True
        assert torch.equal(counts, moe.last_counts) and int(counts.sum()) == 300 * moe.top_k
        err = rel_err(grouped.float(), looped.float())
        print(f"layer {i}: grouped vs loop max relative error {err:.2e}")
        assert err < 2e-2
