"""A GGUF file (llama.cpp's format, what Ollama and llama.cpp users have on disk) read as a raytp checkpoint.

One file holds everything: the model's hyperparameters, its tokenizer (vocab,
merges, special tokens, chat template) and its weights, usually quantized in
blocks (Q4_K, Q8_0...). raytp serves in float32/bf16/fp16, so each rank
dequantizes the rows it owns once, at load, with the `gguf` package (the
reference implementation of the block formats, maintained with llama.cpp).

Names and layouts differ from a Hugging Face checkpoint in two ways that this
module undoes, so the loader sees HF names and HF layouts:
- tensors are named `blk.{i}.attn_q.weight` etc. (`HF_NAMES` maps them);
- llama.cpp stores Q and K of the `llama` architecture with the two halves of
  every head's rotary dimensions interleaved (its rotary convention): rows are
  put back in HF's order per head (`_unpermute_heads`).

The file is memory-mapped: a rank reads the bytes of its own rows (and, for
row-parallel weights, the rows it slices columns from) and nothing else.
"""
from __future__ import annotations

import functools
import os
import re

import numpy as np
import torch

from raytp.model.checkpoint_error import CheckpointError


GGUF_SUFFIX = ".gguf"
SUPPORTED_ARCHITECTURES = {"llama": "LlamaForCausalLM"}
# What llama.cpp's common files use; each is dequantized by the gguf package's reference code.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor (None: a tensor raytp does not use)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


def find_gguf(path: str) -> str | None:
    """The GGUF file `path` names: the file itself, or the one .gguf in a directory without config.json."""
    if os.path.isfile(path):
        return path if path.endswith(GGUF_SUFFIX) else None
    if not os.path.isdir(path) or os.path.isfile(os.path.join(path, "config.json")):
        return None
    files = sorted(f for f in os.listdir(path) if f.endswith(GGUF_SUFFIX))
    if len(files) > 1:
        raise CheckpointError(f"{path!r} holds {len(files)} GGUF files ({', '.join(files)}): name the one to serve")
    return os.path.join(path, files[0]) if files else None


class GGUFCheckpoint:
    """One GGUF file: its metadata, as a Hugging Face config and tokenizer, and its tensors, as row slices."""

    def __init__(self, file: str):
        import gguf

        self.file = file
        try:
            self._reader = gguf.GGUFReader(file, "r")
        except Exception as err:  # noqa: BLE001 - any parse failure means the same to the user
            raise CheckpointError(f"{file}: not a readable GGUF file ({type(err).__name__}: {err}); "
                                  f"is it truncated or corrupt?") from None
        self.architecture = self.value("general.architecture")
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise CheckpointError(f"{file}: GGUF architecture {self.architecture!r} is not supported; raytp loads "
                                  f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}")
        self.tensors = {}
        for t in self._reader.tensors:
            name = hf_name(t.name)
            if name is None:
                if t.name == "rope_freqs.weight":
                    raise CheckpointError(f"{file}: per-dimension rotary frequency factors (rope_freqs, Llama 3.1 "
                                          f"style) are not supported yet")
                continue
            if t.tensor_type.name not in SUPPORTED_TYPES:
                raise CheckpointError(f"{file}: tensor {t.name!r} is quantized as {t.tensor_type.name}, which raytp "
                                      f"cannot load; supported: {', '.join(SUPPORTED_TYPES)}")
            self.tensors[name] = t
        self.config = self._hf_config()

    def value(self, key: str, default=None):
        """A metadata value (strings, numbers, lists of them), or default where the file has none."""
        field = self._reader.fields.get(key)
        return default if field is None else field.contents()

    def _arch(self, key: str, default=None):
        return self.value(f"{self.architecture}.{key}", default)

    # ---- config ----------------------------------------------------------------------

    def _hf_config(self) -> dict:
        """The model's hyperparameters as a Hugging Face config.json would give them."""
        heads = self._arch("attention.head_count")
        hidden = self._arch("embedding_length")
        if heads is None or hidden is None:
            raise CheckpointError(f"{self.file}: metadata lacks {self.architecture}.attention.head_count or "
                                  f"{self.architecture}.embedding_length")
        head_dim = self._arch("attention.key_length") or self._arch("rope.dimension_count") or hidden // heads
        rope = {"rope_type": "default", "rope_theta": float(self._arch("rope.freq_base", 10000.0))}
        scaling = self._arch("rope.scaling.type", "none")
        if scaling == "linear":
            rope.update(rope_type="linear", factor=float(self._arch("rope.scaling.factor")))
        elif scaling != "none":
            raise CheckpointError(f"{self.file}: rotary scaling {scaling!r} is not supported yet (only linear)")
        tokens = self._reader.fields.get("tokenizer.ggml.tokens")
        vocab = self._arch("vocab_size") or (len(tokens.data) if tokens is not None else None)
        if vocab is None:
            vocab = self.tensors["model.embed_tokens.weight"].shape[-1]
        return {
            "architectures": [SUPPORTED_ARCHITECTURES[self.architecture]],
            "vocab_size": int(vocab),
            "hidden_size": int(hidden),
            "intermediate_size": int(self._arch("feed_forward_length")),
            "num_hidden_layers": int(self._arch("block_count")),
            "num_attention_heads": int(heads),
            "num_key_value_heads": int(self._arch("attention.head_count_kv", heads)),
            "head_dim": int(head_dim),
            "rms_norm_eps": float(self._arch("attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_parameters": rope,
            "max_position_embeddings": int(self._arch("context_length", 4096)),
            "tie_word_embeddings": "lm_head.weight" not in self.tensors,
            "torch_dtype": self._weights_dtype(),
            "bos_token_id": self.value("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self.value("tokenizer.ggml.eos_token_id"),
        }

    def _weights_dtype(self) -> str:
        """What the file's matrices are stored as, as a torch dtype name: float32, float16, or bfloat16 for BF16
        and the quantized types, whose 4-8 bits per weight bfloat16 holds with a rounding (2^-9 of the value) about
        the size of their own quantization step or below."""
        types = {t.tensor_type.name for t in self.tensors.values() if len(t.shape) > 1}
        if types <= {"F32"}:
            return "float32"
        if types <= {"F16", "F32"}:
            return "float16"
        return "bfloat16"

    # ---- tensors ---------------------------------------------------------------------

    def get_slice(self, name: str) -> "GGUFSlice":
        """A tensor by its Hugging Face name, sliced like safetensors' get_slice ([a:b] or [:, a:b])."""
        if name not in self.tensors:
            raise CheckpointError(f"{self.file}: tensor {name!r} is missing from the GGUF file")
        heads_of = None
        if name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            heads_of = self.config["head_dim"]
        return GGUFSlice(self.tensors[name], heads_of)

    # ---- tokenizer -------------------------------------------------------------------

    def tokenizer_parts(self):
        """(tokenizers.Tokenizer, tokenizer_config dict, eos ids, chat template) built from the metadata."""
        from raytp.model.gguf_tokenizer import build_tokenizer

        return build_tokenizer(self.file, self._value)


class GGUFSlice:
    """A GGUF tensor in Hugging Face layout, dequantized to float32 only where it is read."""

    def __init__(self, tensor, head_dim: int | None):
        self._t = tensor
        self._head_dim = head_dim  # set for Q and K of the llama architecture: rows to put back in HF order
        # GGUF lists dimensions fastest first; HF (and torch) slowest first.
        self.shape = tuple(int(d) for d in reversed(tensor.shape))

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, slice):  # rows [a:b]: only their bytes are read and dequantized
            rows = self._rows(key.start or 0, self.shape[0] if key.stop is None else key.stop)
        elif isinstance(key, tuple) and len(key) == 2 and key[0] == slice(None):  # columns [:, a:b]
            rows = self._rows(0, self.shape[0])[:, key[1]]
        else:
            raise TypeError(f"unsupported GGUF slice {key!r}")
        return torch.from_numpy(np.array(rows, dtype=np.float32))  # a copy: the file's pages stay read-only

    def _rows(self, start: int, stop: int) -> np.ndarray:
        from gguf.quants import dequantize

        data = self._t.data  # memory-mapped: rows of blocks (quantized) or of values
        out = dequantize(np.asarray(data[start:stop]), self._t.tensor_type).reshape(stop - start, *self.shape[1:])
        if self._head_dim is not None:
            out = _unpermute_heads(out, self._head_dim)
        return out


def _unpermute_heads(rows: np.ndarray, head_dim: int) -> np.ndarray:
    """llama.cpp's Q/K rows -> HF's: within each head, llama.cpp interleaves the rotary pairs (row 2j, 2j+1 = HF's
    j, j + head_dim/2); whole heads only, which is what every rank's slice holds."""
    heads = rows.shape[0] // head_dim
    # [heads * head_dim, in] -> [heads, head_dim/2, 2, in] -> [heads, 2, head_dim/2, in] -> [heads * head_dim, in]
    return rows.reshape(heads, head_dim // 2, 2, -1).swapaxes(1, 2).reshape(rows.shape)


@functools.lru_cache(maxsize=4)
def open_gguf(file: str, mtime_ns: int) -> GGUFCheckpoint:
    """The file, parsed once per process and modification time (the replica and every rank read its metadata)."""
    return GGUFCheckpoint(file)


def gguf_checkpoint(file: str) -> GGUFCheckpoint:
    try:
        mtime = os.stat(file).st_mtime_ns
    except OSError as err:
        raise CheckpointError(f"{file}: {err.strerror}") from None
    return open_gguf(file, mtime)
