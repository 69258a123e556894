"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2), written once for any TP degree.

Each rank builds the same module tree with shard-sized weights. Per decoder
layer there are exactly two all-reduces: one in the attention's output
projection and one in the MLP's down projection (both RowParallelLinear).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from raytp.cluster.comm import Communicator
from raytp.model.attention import AttentionBackend, AttentionMetadata
from raytp.model.moe import MoE
from raytp.model.pipeline import Stage
from raytp.model.layers import (
    ColumnParallelLinear,
    DirectCall,
    PackableLinear,
    ParallelLMHead,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                           "MixtralForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM")
# Mixture-of-experts families: where a layer's experts live in the checkpoint, and the names of an expert's
# gate, up and down projections.
MOE_NAMES = {"MixtralForCausalLM": ("block_sparse_moe", "w1", "w3", "w2"),
             "Qwen3MoeForCausalLM": ("mlp", "gate_proj", "up_proj", "down_proj"),
             "OlmoeForCausalLM": ("mlp", "gate_proj", "up_proj", "down_proj")}


class ModelShapeError(ValueError):
    """The checkpoint's shapes and the TP degree do not fit together."""


@dataclass(frozen=True)
class ModelArgs:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: dict = field(hash=False)
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    sliding_window: int | None
    # RMSNorm of the queries and keys before the rotary embedding: "head" over each head (Qwen3), "full" over all
    # of the query heads and all of the key heads at once (OLMoE); "" none.
    qk_norm: str = ""
    clip_qkv: float | None = None  # OLMoE: q, k and v clamped to +-clip_qkv after the norm
    # Mixture of experts (0 experts: every layer's MLP is dense).
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    normalize_top_k: bool = False  # the top-k routing weights renormalised to sum to 1
    dense_layers: tuple[int, ...] = ()  # layers whose MLP is dense in an MoE model (Qwen3-MoE's mlp_only_layers)

    def is_moe_layer(self, layer: int) -> bool:
        return self.num_experts > 0 and layer not in self.dense_layers

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(
                f"unsupported architecture {archs or cfg.get('model_type')!r}; raytp supports {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {cfg['hidden_act']!r} (only silu)")
        heads = cfg["num_attention_heads"]
        # transformers >= 5 writes `rope_parameters`; older versions rope_theta + rope_scaling.
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        rope.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
        attention_bias = bool(cfg.get("attention_bias", False))
        is_qwen2 = arch == "Qwen2ForCausalLM"
        window = cfg.get("sliding_window")
        if arch.startswith("Qwen") and not cfg.get("use_sliding_window", False):
            window = None
        moe = {}
        if arch in MOE_NAMES:
            experts = cfg.get("num_local_experts") or cfg.get("num_experts")
            step = cfg.get("decoder_sparse_step") or 1
            dense = tuple(i for i in range(cfg["num_hidden_layers"])
                          if i in (cfg.get("mlp_only_layers") or []) or (i + 1) % step)
            moe = dict(num_experts=experts, experts_per_token=cfg["num_experts_per_tok"],
                       moe_intermediate_size=cfg.get("moe_intermediate_size") or cfg["intermediate_size"],
                       normalize_top_k=arch == "MixtralForCausalLM" or bool(cfg.get("norm_topk_prob")),
                       dense_layers=dense)
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope=rope,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=is_qwen2 or attention_bias,
            o_bias=attention_bias and not is_qwen2,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            sliding_window=window,
            qk_norm="head" if arch.startswith("Qwen3") else "full" if arch == "OlmoeForCausalLM" else "",
            clip_qkv=cfg.get("clip_qkv"),
            **moe,
        )

    def linear_weights(self, intermediate: int) -> int:
        """Weights of a decoder layer's linears (q, k, v, o; gate, up, down) with an MLP `intermediate` wide."""
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return self.hidden_size * (2 * q + 2 * kv) + 3 * self.hidden_size * intermediate

    def layer_weights(self, layer: int) -> int:
        """Weights of decoder layer `layer`: what a decode step reads for it. An MoE layer's experts all count (a
        batch of any size routes to most of them): as one MLP of all their columns."""
        if self.is_moe_layer(layer):
            return self.linear_weights(self.num_experts * self.moe_intermediate_size)
        return self.linear_weights(self.intermediate_size)

    def attention_cost_per_pair(self) -> float:
        """A query-key pair's attention work (QK and PV over every query head: 2 * heads * head_dim multiply-adds
        per layer) as a fraction of a token's work in the linear layers: what one more token of context costs a
        prompt chunk's token, in tokens (bench-58m: 3.3e-4, so a token at 3,000 of context costs twice one at 0)."""
        return 2 * self.num_heads * self.head_dim / self.linear_weights(self.intermediate_size)


@dataclass(frozen=True)
class TPLayout:
    """Which heads and rows rank `rank` of `world` owns."""

    rank: int
    world: int
    heads: int  # query heads on this rank
    head_start: int
    kv_heads: int  # KV heads on this rank
    kv_head_start: int
    intermediate: int  # MLP columns on this rank
    experts: range = range(0)  # MoE: the experts this rank holds
    expert_intermediate: int = 0  # MoE: the columns of each held expert on this rank
    expert_col_start: int = 0  # MoE: where they start in the expert's intermediate columns

    @classmethod
    def of(cls, args: ModelArgs, rank: int, world: int, expert_parallel: bool = False) -> "TPLayout":
        check_tp_degree(args, world, expert_parallel)
        heads = args.num_heads // world
        if world <= args.num_kv_heads:
            kv_heads, kv_start = args.num_kv_heads // world, rank * (args.num_kv_heads // world)
        else:
            # More ranks than KV heads: each rank keeps the one KV head its query heads use.
            kv_heads, kv_start = 1, rank // (world // args.num_kv_heads)
        inter = args.intermediate_size // world
        if expert_parallel:  # whole experts: E / world of them
            per_rank = args.num_experts // world
            experts, expert_inter = range(rank * per_rank, (rank + 1) * per_rank), args.moe_intermediate_size
            col_start = 0
        else:  # a slice of every expert
            experts, expert_inter = range(args.num_experts), args.moe_intermediate_size // world
            col_start = rank * expert_inter
        return cls(rank, world, heads, rank * heads, kv_heads, kv_start, inter, experts, expert_inter, col_start)


def check_tp_degree(args: ModelArgs, world: int, expert_parallel: bool = False) -> None:
    """Raise ModelShapeError naming the numbers when `world` cannot shard this model (its experts whole per rank
    with expert_parallel, else a slice of each on every rank)."""
    problems = []
    if args.num_heads % world:
        problems.append(f"num_attention_heads={args.num_heads} is not divisible by tensor_parallel_size={world}")
    kv = args.num_kv_heads
    if world <= kv and kv % world:
        problems.append(f"num_key_value_heads={kv} is not divisible by tensor_parallel_size={world}")
    if world > kv and world % kv:
        problems.append(f"tensor_parallel_size={world} is not a multiple of num_key_value_heads={kv}")
    has_dense = args.num_experts == 0 or len(args.dense_layers) > 0
    if has_dense and args.intermediate_size % world:
        problems.append(f"intermediate_size={args.intermediate_size} is not divisible by tensor_parallel_size={world}")
    if args.num_experts and expert_parallel and args.num_experts % world:
        problems.append(f"with expert_parallel the {args.num_experts} experts are not divisible by "
                        f"tensor_parallel_size={world}")
    if args.num_experts and not expert_parallel and args.moe_intermediate_size % world:
        problems.append(f"the experts' intermediate size {args.moe_intermediate_size} is not divisible by "
                        f"tensor_parallel_size={world} (expert_parallel: true places whole experts instead)")
    if problems:
        raise ModelShapeError("cannot shard the model: " + "; ".join(problems))


def valid_tp_degrees(args: ModelArgs, up_to: int, expert_parallel: bool = False) -> list[int]:
    out = []
    for world in range(1, up_to + 1):
        try:
            check_tp_degree(args, world, expert_parallel)
            out.append(world)
        except ModelShapeError:
            pass
    return out


class Attention(DirectCall):
    def __init__(self, args: ModelArgs, layout: TPLayout, comm: Communicator, dtype: torch.dtype,
                 backend: AttentionBackend):
        super().__init__()
        self.backend = backend
        self.heads, self.kv_heads, self.head_dim = layout.heads, layout.kv_heads, args.head_dim
        self.scale = args.head_dim**-0.5
        qkv_out = (layout.heads + 2 * layout.kv_heads) * args.head_dim
        self.qkv_proj = ColumnParallelLinear(args.hidden_size, qkv_out, args.qkv_bias, dtype)
        self.o_proj = RowParallelLinear(layout.heads * args.head_dim, args.hidden_size, args.o_bias, dtype, comm)
        self.qk_norm, self.clip_qkv, self.comm, self.eps = args.qk_norm, args.clip_qkv, comm, args.rms_norm_eps
        if args.qk_norm == "head":
            self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps, dtype)
        elif args.qk_norm == "full":  # this rank's slices of weights over all query / key heads
            self.q_norm = RMSNorm(layout.heads * args.head_dim, args.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(layout.kv_heads * args.head_dim, args.rms_norm_eps, dtype)
            self.full_q_width, self.full_k_width = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
            # With more ranks than KV heads each KV head is on world / Hkv ranks: its squares are summed that often.
            self.kv_copies = max(1, layout.world // args.num_kv_heads)

    def norm_heads(self, qkv: torch.Tensor) -> torch.Tensor:
        """Qwen3's QK norm: qkv (T, (H + 2 Hkv) D) -> the same with each query and key head RMS-normalised."""
        T, D = qkv.shape[0], self.head_dim
        q, k, v = qkv.view(T, -1, D).split([self.heads, self.kv_heads, self.kv_heads], dim=1)  # (T, H|Hkv, D)
        q = self.q_norm(q.reshape(T * self.heads, D)).view(T, self.heads, D)
        k = self.k_norm(k.reshape(T * self.kv_heads, D)).view(T, self.kv_heads, D)
        return torch.cat([q, k, v], dim=1).view(T, -1)

    def norm_full(self, qkv: torch.Tensor) -> torch.Tensor:
        """OLMoE's QK norm: RMSNorm over all query heads (and over all key heads) at once, which at TP > 1 span
        the ranks: each rank sums its squares, one all-reduce of (T, 2) sums gives the whole rows'."""
        D = self.head_dim
        q, k, v = qkv.split([self.heads * D, self.kv_heads * D, self.kv_heads * D], dim=-1)  # this rank's columns
        qf, kf = q.float(), k.float()
        squares = torch.stack([qf.pow(2).sum(-1), kf.pow(2).sum(-1) / self.kv_copies], dim=1)  # (T, 2)
        if self.comm.world_size > 1:
            squares = self.comm.all_reduce(squares)
        q = self.q_norm.weight * (qf * torch.rsqrt(squares[:, :1] / self.full_q_width + self.eps)).to(q.dtype)
        k = self.k_norm.weight * (kf * torch.rsqrt(squares[:, 1:] / self.full_k_width + self.eps)).to(k.dtype)
        return torch.cat([q, k, v], dim=-1)

    def forward(self, x, cos, sin, cache, meta: AttentionMetadata):
        # x: (T, hidden)
        qkv = self.qkv_proj(x)  # (T, (H + 2 Hkv) D) on this rank's heads
        if self.qk_norm == "head":
            qkv = self.norm_heads(qkv)
        elif self.qk_norm == "full":
            qkv = self.norm_full(qkv)
        if self.clip_qkv is not None:
            qkv = qkv.clamp(-self.clip_qkv, self.clip_qkv)
        q = self.backend.rotate_and_cache(qkv, cos, sin, self.heads, cache, meta)  # (T, H, D); K/V into the cache
        out = self.backend.attend(q, cache, meta, self.scale).reshape(q.shape[0], -1)  # (T, H * D)
        return self.o_proj(out)  # all-reduce inside: (T, hidden)


class MLP(DirectCall):
    def __init__(self, args: ModelArgs, layout: TPLayout, comm: Communicator, dtype: torch.dtype):
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(args.hidden_size, 2 * layout.intermediate, args.mlp_bias, dtype)
        self.down_proj = RowParallelLinear(layout.intermediate, args.hidden_size, args.mlp_bias, dtype, comm)

    def forward(self, x):
        return self.down_proj(self.gate_up_proj.silu_mul(x))  # (T, I / p) -> all-reduce: (T, hidden)


class DecoderLayer(DirectCall):
    def __init__(self, args: ModelArgs, layout: TPLayout, comm: Communicator, dtype: torch.dtype,
                 backend: AttentionBackend, moe: bool = False):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, dtype)
        self.self_attn = Attention(args, layout, comm, dtype, backend)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, dtype)
        if moe:
            self.mlp = MoE(args.hidden_size, args.num_experts, args.experts_per_token, args.normalize_top_k,
                           layout.experts, layout.expert_intermediate, dtype, comm)
        else:
            self.mlp = MLP(args, layout, comm, dtype)

    def forward(self, h, residual, cos, sin, cache, meta):
        """h: the previous layer's MLP output (T, hidden), not yet added to residual, the stream before it (None at
        the first layer, where h is the embedding) -> this layer's (MLP output, residual stream before it). Each
        residual add is fused into the norm that follows it (one pass a row on CPU, updating residual in place)."""
        if residual is None:
            residual, normed = h, self.input_layernorm(h)
        else:
            residual, normed = self.input_layernorm.add_and_norm(residual, h)
        residual, normed = self.post_attention_layernorm.add_and_norm(residual,
                                                                      self.self_attn(normed, cos, sin, cache, meta))
        return self.mlp(normed), residual


class LlamaModel(nn.Module):
    def __init__(self, args: ModelArgs, comm: Communicator, dtype: torch.dtype, attention: AttentionBackend | None = None,
                 expert_parallel: bool = False, stage: Stage | None = None):
        """stage: the layers this rank's pipeline stage computes (pipeline.py); default all of them."""
        super().__init__()
        if attention is None:
            from raytp.model.attention.reference import ReferenceAttention

            attention = ReferenceAttention()
        self.args, self.comm, self.dtype, self.attention = args, comm, dtype, attention
        self.stage = stage or Stage.whole(args.num_layers)
        self.layout = TPLayout.of(args, comm.rank, comm.world_size, expert_parallel)
        first, last, tied = self.stage.first, self.stage.last, args.tie_word_embeddings
        # The last stage of a tied model keeps the embedding as its LM head's weight.
        self.embed_tokens = (VocabParallelEmbedding(args.vocab_size, args.hidden_size, dtype, comm)
                             if first or (last and tied) else None)
        # self.layers[j] is the model's layer stage.start + j.
        self.layers = nn.ModuleList(DecoderLayer(args, self.layout, comm, dtype, attention, args.is_moe_layer(i))
                                    for i in range(self.stage.start, self.stage.stop))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, dtype) if last else None
        self.lm_head = (ParallelLMHead(args.vocab_size, args.hidden_size, dtype, comm, self.embed_tokens if tied else None)
                        if last else None)
        self.rotary = RotaryEmbedding(args.head_dim, args.rope)

    def pack_weights(self, quantization: str = "none") -> None:
        """Repack every linear weight for the fastest kernel on this device, quantized where asked (after loading;
        see PackableLinear)."""
        for module in self.modules():
            if isinstance(module, PackableLinear):
                module.pack(quantization)

    def kv_cache_shape(self, num_slots: int) -> tuple[int, ...]:
        """One tensor for the stage's layers: (layers, 2, slots, kv_heads on this rank, head_dim)."""
        return (self.stage.num_layers, 2, num_slots, self.layout.kv_heads, self.args.head_dim)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor | None, meta: AttentionMetadata, kv_cache: torch.Tensor,
                stream: torch.Tensor | None = None) -> torch.Tensor:
        """The first stage takes input_ids (T,), a later one the residual stream (T, hidden) the stage before it
        sent. -> the last stage: hidden states (T, hidden) after the final norm; any other: the residual stream
        (T, hidden) after its last layer, for the next stage."""
        h = self.embed_tokens(input_ids) if self.stage.first else stream  # (T, hidden), all-reduce inside
        residual = None
        cos, sin = self.rotary(meta.positions, h.dtype)  # (T, D)
        for layer, cache in zip(self.layers, kv_cache):
            h, residual = layer(h, residual, cos, sin, cache, meta)
        if not self.stage.last:
            return residual + h
        return self.norm.add_and_norm(residual, h)[1]

    def expert_tokens(self) -> list[float] | None:
        """Mixtures of experts: the tokens each expert got in the last step, averaged over the MoE layers (every rank
        routes every token, so any rank's numbers are the model's); None for a dense model."""
        if not self.args.num_experts:
            return None
        layers = [layer.mlp.last_counts for layer in self.layers if isinstance(layer.mlp, MoE)]  # (E,) each
        return torch.stack(layers).double().mean(0).tolist() if layers else []  # a stage of dense layers only

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (N, hidden) -> logits (N, vocab) in float32, all-gathered."""
        return self.lm_head(hidden).float()


@dataclass(frozen=True)
class Piece:
    """Rows (dim 0) or columns (dim 1) [start, stop) of checkpoint tensor `name`, copied to offset `dst` of a parameter."""

    name: str
    dim: int
    start: int
    stop: int
    dst: int = 0


def weight_plan(args: ModelArgs, layout: TPLayout, vocab_rows_per_rank: int,
                stage: Stage | None = None) -> dict[str, list[Piece]]:
    """For each raytp parameter of this rank (of its pipeline stage: every layer by default), the checkpoint slices
    that fill it."""
    D, lo = args.head_dim, layout
    stage = stage or Stage.whole(args.num_layers)
    plan: dict[str, list[Piece]] = {}
    v_start = lo.rank * vocab_rows_per_rank
    v_stop = min(v_start + vocab_rows_per_rank, args.vocab_size)
    if stage.first or (stage.last and args.tie_word_embeddings):
        plan["embed_tokens.weight"] = [Piece("model.embed_tokens.weight", 0, v_start, v_stop)]
    if stage.last:
        if not args.tie_word_embeddings:
            plan["lm_head.weight"] = [Piece("lm_head.weight", 0, v_start, v_stop)]
        plan["norm.weight"] = [Piece("model.norm.weight", 0, 0, args.hidden_size)]
    q = (lo.head_start * D, (lo.head_start + lo.heads) * D)
    kv = (lo.kv_head_start * D, (lo.kv_head_start + lo.kv_heads) * D)
    inter = (lo.rank * lo.intermediate, (lo.rank + 1) * lo.intermediate)
    for i in range(stage.start, stage.stop):
        src, dst = f"model.layers.{i}", f"layers.{i - stage.start}"
        qkv_kinds = ["weight"] + (["bias"] if args.qkv_bias else [])
        for kind in qkv_kinds:
            plan[f"{dst}.self_attn.qkv_proj.{kind}"] = [
                Piece(f"{src}.self_attn.q_proj.{kind}", 0, *q, dst=0),
                Piece(f"{src}.self_attn.k_proj.{kind}", 0, *kv, dst=lo.heads * D),
                Piece(f"{src}.self_attn.v_proj.{kind}", 0, *kv, dst=(lo.heads + lo.kv_heads) * D),
            ]
        plan[f"{dst}.self_attn.o_proj.weight"] = [Piece(f"{src}.self_attn.o_proj.weight", 1, *q)]
        if args.o_bias:
            plan[f"{dst}.self_attn.o_proj.bias"] = [Piece(f"{src}.self_attn.o_proj.bias", 0, 0, args.hidden_size)]
        if args.qk_norm == "head":
            for norm in ("q_norm", "k_norm"):
                plan[f"{dst}.self_attn.{norm}.weight"] = [Piece(f"{src}.self_attn.{norm}.weight", 0, 0, D)]
        elif args.qk_norm == "full":  # this rank's heads' columns of weights over all heads
            plan[f"{dst}.self_attn.q_norm.weight"] = [Piece(f"{src}.self_attn.q_norm.weight", 0, *q)]
            plan[f"{dst}.self_attn.k_norm.weight"] = [Piece(f"{src}.self_attn.k_norm.weight", 0, *kv)]
        for norm in ("input_layernorm", "post_attention_layernorm"):
            plan[f"{dst}.{norm}.weight"] = [Piece(f"{src}.{norm}.weight", 0, 0, args.hidden_size)]
        if args.is_moe_layer(i):
            moe, gate, up, down = MOE_NAMES[args.architecture]
            plan[f"{dst}.mlp.gate"] = [Piece(f"{src}.{moe}.gate.weight", 0, 0, args.num_experts)]  # replicated
            I = lo.expert_intermediate  # noqa: E741
            cols = (lo.expert_col_start, lo.expert_col_start + I)
            for local, e in enumerate(lo.experts):
                expert = f"{src}.{moe}.experts.{e}"
                plan[f"{dst}.mlp.experts.{local}.gate_up.weight"] = [Piece(f"{expert}.{gate}.weight", 0, *cols, dst=0),
                                                                     Piece(f"{expert}.{up}.weight", 0, *cols, dst=I)]
                plan[f"{dst}.mlp.experts.{local}.down.weight"] = [Piece(f"{expert}.{down}.weight", 1, *cols)]
            continue
        for kind in ["weight"] + (["bias"] if args.mlp_bias else []):
            plan[f"{dst}.mlp.gate_up_proj.{kind}"] = [
                Piece(f"{src}.mlp.gate_proj.{kind}", 0, *inter, dst=0),
                Piece(f"{src}.mlp.up_proj.{kind}", 0, *inter, dst=lo.intermediate),
            ]
        plan[f"{dst}.mlp.down_proj.weight"] = [Piece(f"{src}.mlp.down_proj.weight", 1, *inter)]
        if args.mlp_bias:
            plan[f"{dst}.mlp.down_proj.bias"] = [Piece(f"{src}.mlp.down_proj.bias", 0, 0, args.hidden_size)]
    return plan


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Full (unsharded) shape of every checkpoint tensor the config implies."""
    h, D, I, V = args.hidden_size, args.head_dim, args.intermediate_size, args.vocab_size
    shapes = {"model.embed_tokens.weight": (V, h), "model.norm.weight": (h,)}
    if not args.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, h)
    for i in range(args.num_layers):
        p = f"model.layers.{i}"
        for name, rows in (("q_proj", args.num_heads * D), ("k_proj", args.num_kv_heads * D), ("v_proj", args.num_kv_heads * D)):
            shapes[f"{p}.self_attn.{name}.weight"] = (rows, h)
            if args.qkv_bias:
                shapes[f"{p}.self_attn.{name}.bias"] = (rows,)
        shapes[f"{p}.self_attn.o_proj.weight"] = (h, args.num_heads * D)
        if args.o_bias:
            shapes[f"{p}.self_attn.o_proj.bias"] = (h,)
        if args.qk_norm == "head":
            shapes[f"{p}.self_attn.q_norm.weight"] = shapes[f"{p}.self_attn.k_norm.weight"] = (D,)
        elif args.qk_norm == "full":
            shapes[f"{p}.self_attn.q_norm.weight"] = (args.num_heads * D,)
            shapes[f"{p}.self_attn.k_norm.weight"] = (args.num_kv_heads * D,)
        if args.is_moe_layer(i):
            moe, gate, up, down = MOE_NAMES[args.architecture]
            shapes[f"{p}.{moe}.gate.weight"] = (args.num_experts, h)
            for e in range(args.num_experts):
                for name in (gate, up):
                    shapes[f"{p}.{moe}.experts.{e}.{name}.weight"] = (args.moe_intermediate_size, h)
                shapes[f"{p}.{moe}.experts.{e}.{down}.weight"] = (h, args.moe_intermediate_size)
        else:
            shapes[f"{p}.mlp.gate_proj.weight"] = (I, h)
            shapes[f"{p}.mlp.up_proj.weight"] = (I, h)
            shapes[f"{p}.mlp.down_proj.weight"] = (h, I)
        if args.mlp_bias:
            shapes[f"{p}.mlp.gate_proj.bias"] = (I,)
            shapes[f"{p}.mlp.up_proj.bias"] = (I,)
            shapes[f"{p}.mlp.down_proj.bias"] = (h,)
        shapes[f"{p}.input_layernorm.weight"] = (h,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (h,)
    return shapes
