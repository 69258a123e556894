"""Shared test helpers: random-weight Hugging Face checkpoints and a shard-only communicator.

Every `write_*` function writes a real checkpoint directory with transformers'
`save_pretrained` (safetensors) and returns its path. Defaults are tiny
(hidden 64, 2 layers, 4 heads, 2 KV heads, intermediate 128, vocab 128,
256 positions); any config field can be overridden by keyword. Weights are
seeded, and the parameters transformers initializes to constants (norm
weights, biases) are randomized too, so a test notices when one of them is
dropped or misplaced.

transformers is imported inside the functions only, so that processes spawned
by tests (which import this module to find their target) start quickly.
"""
from __future__ import annotations

import os

import torch

from raytp.cluster.comm import Communicator

SMALL = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=128,
    max_position_embeddings=256,
)


def _unique_dir(tmp, name: str) -> str:
    base = os.path.join(str(tmp), name)
    path, n = base, 1
    while os.path.exists(path):
        n += 1
        path = f"{base}-{n}"
    return path


def write_checkpoint(
    tmp,
    config_cls,
    model_cls,
    *,
    seed: int = 0,
    name: str | None = None,
    max_shard_size: str | int | None = None,
    **overrides,
) -> str:
    """Write a random-weight checkpoint of `model_cls(config_cls(**SMALL, **overrides))` under `tmp`; return its path.

    `name` is the directory name (default: the model type, made unique);
    `max_shard_size` (e.g. "20KB") makes a sharded checkpoint with
    model.safetensors.index.json.
    """
    config = config_cls(**{**SMALL, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            elif "norm" in pname:
                p.copy_(1.0 + torch.randn(p.shape, generator=gen) * 0.1)
    path = _unique_dir(tmp, name or config.model_type)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    return path


def write_llama(tmp, **overrides) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    return write_checkpoint(tmp, LlamaConfig, LlamaForCausalLM, **overrides)


def write_qwen2(tmp, **overrides) -> str:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return write_checkpoint(tmp, Qwen2Config, Qwen2ForCausalLM, **overrides)


def write_mistral(tmp, **overrides) -> str:
    from transformers import MistralConfig, MistralForCausalLM

    return write_checkpoint(tmp, MistralConfig, MistralForCausalLM, **overrides)


def write_qwen3(tmp, **overrides) -> str:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return write_checkpoint(tmp, Qwen3Config, Qwen3ForCausalLM, **{"head_dim": 16, **overrides})


# Mixture of experts: 8 experts, 2 per token, every layer sparse unless told otherwise.
def write_mixtral(tmp, **overrides) -> str:
    from transformers import MixtralConfig, MixtralForCausalLM

    return write_checkpoint(tmp, MixtralConfig, MixtralForCausalLM,
                            **{"num_local_experts": 8, "num_experts_per_tok": 2, **overrides})


def write_qwen3_moe(tmp, **overrides) -> str:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    return write_checkpoint(tmp, Qwen3MoeConfig, Qwen3MoeForCausalLM,
                            **{"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "head_dim": 16,
                               "decoder_sparse_step": 1, "mlp_only_layers": [], **overrides})


def write_olmoe(tmp, **overrides) -> str:
    from transformers import OlmoeConfig, OlmoeForCausalLM

    return write_checkpoint(tmp, OlmoeConfig, OlmoeForCausalLM,
                            **{"num_experts": 8, "num_experts_per_tok": 2, "eos_token_id": 1, "pad_token_id": 0,
                               **overrides})


# GGUF tensor types write_gguf uses by default: every kind of block format the llama.cpp files use that the gguf
# package can also write (K-quants it only reads), so one checkpoint exercises them all.
GGUF_TYPES = {"attn_q": "Q8_0", "attn_k": "Q4_0", "attn_v": "Q4_1", "attn_output": "Q5_0", "ffn_gate": "F16",
              "ffn_up": "BF16", "ffn_down": "Q5_1", "token_embd": "Q8_0", "output": "F32"}


def write_gguf(hf_dir: str, types: dict[str, str] | None = None, architecture: str = "llama") -> str:
    """Convert the Llama checkpoint at `hf_dir` to `<hf_dir>.gguf` the way llama.cpp's converter lays it out (GGUF
    names, Q/K rows permuted for its rotary convention, weights quantized per `types`); returns the file's path.
    Tests load it with transformers as the reference, which undoes all of it on its own."""
    import json

    import gguf
    import numpy as np
    from safetensors.torch import load_file

    types = {**GGUF_TYPES, **(types or {})}
    with open(os.path.join(hf_dir, "config.json")) as f:
        cfg = json.load(f)
    weights = load_file(os.path.join(hf_dir, "model.safetensors"))
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    out = hf_dir.rstrip("/") + ".gguf"
    w = gguf.GGUFWriter(out, architecture)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg.get("rope_theta") or cfg.get("rope_parameters", {}).get("rope_theta", 10000.0))
    w.add_vocab_size(cfg["vocab_size"])

    def permute(t: torch.Tensor, n_heads: int) -> torch.Tensor:  # HF -> llama.cpp row order, per head
        return t.reshape(n_heads, 2, t.shape[0] // n_heads // 2, -1).swapaxes(1, 2).reshape(t.shape)

    def add(name: str, kind: str, t: torch.Tensor) -> None:
        qtype = gguf.GGMLQuantizationType[types.get(kind, "F32") if t.dim() == 2 else "F32"]
        data = t.float().numpy()
        if qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, data)
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, data.astype(np.float16))
        else:
            try:
                blocks = gguf.quants.quantize(data, qtype)
            except NotImplementedError:  # a type the gguf package only reads: zero blocks of the right size
                blocks = np.zeros(gguf.quants.quant_shape_to_byte_shape(data.shape, qtype), dtype=np.uint8)
            w.add_tensor(name, blocks, raw_dtype=qtype)

    add("token_embd.weight", "token_embd", weights["model.embed_tokens.weight"])
    add("output_norm.weight", "norm", weights["model.norm.weight"])
    if "lm_head.weight" in weights:
        add("output.weight", "output", weights["lm_head.weight"])
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", "norm", weights[p + "input_layernorm.weight"])
        add(f"blk.{i}.ffn_norm.weight", "norm", weights[p + "post_attention_layernorm.weight"])
        add(f"blk.{i}.attn_q.weight", "attn_q", permute(weights[p + "self_attn.q_proj.weight"], heads))
        add(f"blk.{i}.attn_k.weight", "attn_k", permute(weights[p + "self_attn.k_proj.weight"], kv_heads))
        add(f"blk.{i}.attn_v.weight", "attn_v", weights[p + "self_attn.v_proj.weight"])
        add(f"blk.{i}.attn_output.weight", "attn_output", weights[p + "self_attn.o_proj.weight"])
        for kind, hf in (("ffn_gate", "gate_proj"), ("ffn_up", "up_proj"), ("ffn_down", "down_proj")):
            add(f"blk.{i}.{kind}.weight", kind, weights[p + f"mlp.{hf}.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def load_reference(path: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """The transformers model at `path` (a checkpoint directory or a GGUF file), in eval mode (the reference raytp
    is compared with)."""
    from transformers import AutoModelForCausalLM

    if path.endswith(".gguf"):
        model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path), dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(device).eval()


class ShardOnly(Communicator):
    """Rank `rank` of `world` for building a shard in-process; any collective raises.

    Loading a checkpoint never communicates, so this lets a test build every
    rank's shard without starting processes.
    """

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def _no(self, *args, **kwargs):
        raise RuntimeError(f"ShardOnly(rank={self.rank}, world={self.world_size}) does not communicate")

    all_reduce = all_gather = broadcast = barrier = _no


def _rank_loop(rank: int, world: int, port: int, jobs, results, timeout_s: float) -> None:
    """A spawned rank: join the gloo group, then run `fn(comm, **kwargs)` for each job until None."""
    import traceback

    from raytp.cluster.comm import GlooCommunicator, GlooRendezvous

    torch.set_num_threads(1)  # ranks share few cores; one thread each avoids oversubscription
    try:
        comm = GlooCommunicator(GlooRendezvous("127.0.0.1", port), rank, world, timeout_s=timeout_s)
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
        return
    while (job := jobs.get()) is not None:
        fn, kwargs = job
        try:
            results.put((rank, True, fn(comm, **kwargs)))
        except BaseException:
            results.put((rank, False, traceback.format_exc()))
            return  # peers may be stuck in a collective: this group is done
    comm.close()


class RankPool:
    """`world` spawned processes joined in one gloo group, kept for many jobs.

    `run(fn, **kwargs)` calls `fn(comm, **kwargs)` on every rank (fn must be a
    module-level function, its result picklable: prefer lists or numpy arrays
    to tensors) and returns the results by rank. A rank that raises fails the
    call with its traceback, and the pool is closed: make a new one.
    """

    def __init__(self, world: int, timeout_s: float = 60.0):
        import torch.multiprocessing as mp

        from raytp.cluster.comm import free_port

        ctx = mp.get_context("spawn")
        self.world, self.timeout_s, self.closed = world, timeout_s, False
        port = free_port()
        self._jobs = [ctx.Queue() for _ in range(world)]
        self._results = ctx.Queue()
        self._procs = [
            ctx.Process(target=_rank_loop, args=(r, world, port, self._jobs[r], self._results, timeout_s), daemon=True)
            for r in range(world)
        ]
        for p in self._procs:
            p.start()

    def run(self, fn, timeout_s: float = 120.0, **kwargs) -> list:
        import queue
        import time

        assert not self.closed, "this RankPool was closed after a failure; make a new one"
        for q in self._jobs:
            q.put((fn, kwargs))
        out, deadline = {}, time.monotonic() + timeout_s
        while len(out) < self.world:
            try:
                rank, ok, value = self._results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                alive = [p.is_alive() for p in self._procs]
                self.close()
                raise TimeoutError(f"{fn.__name__} did not finish on all {self.world} ranks in {timeout_s}s (alive: {alive})")
            if not ok:
                self.close()
                raise AssertionError(f"rank {rank}/{self.world} failed in {fn.__name__}:\n{value}")
            out[rank] = value
        return [out[r] for r in range(self.world)]

    def stop(self) -> None:
        """Ask the ranks to leave (without waiting for them: see join)."""
        if not self.closed:
            self.closed = True
            for q in self._jobs:
                q.put(None)

    def close(self, grace_s: float = 1.0) -> None:
        """Stop, wait up to `grace_s` for the ranks to exit, then terminate the ones still running."""
        import time

        self.stop()
        deadline = time.monotonic() + grace_s
        for p in self._procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in self._procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)


def socket_link_pair():
    """Two ends of a real TCP stage link on this host (raytp.cluster.stage_link): (sender, receiver)."""
    import threading

    from raytp.cluster.stage_link import SocketLink, listen

    server, rendezvous = listen("127.0.0.1")
    receiver = {}
    t = threading.Thread(target=lambda: receiver.setdefault("link", SocketLink(rendezvous, 1, timeout_s=10)))
    t.start()
    sender = SocketLink(rendezvous, 0, timeout_s=10, server=server)
    t.join()
    return sender, receiver["link"]
