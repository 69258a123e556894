"""Structured outputs: a request's grammar (a JSON schema, any JSON object) -> a per-request matcher that gives
each step's allowed tokens as a packed bitmask and follows the tokens sampled.

The grammars are compiled by llguidance (chosen over xgrammar by measuring
the per-token mask cost; benchmarks/grammar_mask_cost.py). The engine owns
every request's matcher: it fills the mask when it builds a step (so the
mask needs the request's previous token to be known), the ranks apply it to
the logits before sampling, and the engine feeds the sampled token back.
After a group rebuild the matcher is where the request's tokens left it, so
the resumed request continues under the same grammar.

Bitmask layout (llguidance's and xgrammar's): int32 words, bit b of word w
allows token 32 * w + b.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import llguidance
# llguidance.numpy, not llguidance.torch: the latter's module-level torch.compile imports torch._dynamo and
# torch._inductor, ~2 s added to every process that imports raytp (each rank, spare and replica).
import llguidance.numpy as llg_numpy
import torch

from raytp.engine.tokenizer import Tokenizer


class GrammarError(ValueError):
    """The requested grammar cannot be compiled (a malformed or unsupported JSON schema)."""


@dataclass(frozen=True)
class StructuredOutputs:
    """What the output must be (one of): JSON valid against `json_schema`, or any JSON object (`json_object`)."""

    json_schema: dict[str, Any] | None = None
    json_object: bool = False

    def __post_init__(self) -> None:
        if (self.json_schema is None) == (not self.json_object):
            raise ValueError("structured_outputs: set exactly one of json_schema and json_object")

    def schema(self) -> dict[str, Any]:
        return self.json_schema if self.json_schema is not None else {"type": "object"}


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


# Compact JSON: no whitespace between tokens, so a model cannot fill its budget with blanks.
_JSON_OPTIONS = {"whitespace_flexible": False, "coerce_one_of": True}


class GrammarCompiler:
    """Compiles StructuredOutputs into matchers for one model's tokenizer (built once per engine)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        # vocab_size: the model's (the LM head may be padded past the tokenizer's ids; those are never allowed).
        self.vocab_size = vocab_size
        self._tokenizer = llguidance.LLTokenizer(tokenizer.backend_json(), n_vocab=vocab_size,
                                                 eos_token=list(tokenizer.eos_token_ids) or None)

    def grammar(self, spec: StructuredOutputs) -> str:
        """The llguidance grammar of spec; GrammarError if it cannot be compiled for this tokenizer."""
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(spec.schema()), overrides=_JSON_OPTIONS)
        except (ValueError, TypeError) as err:
            raise GrammarError(f"the JSON schema is not valid: {err}") from None
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self._tokenizer)
        if is_error:
            raise GrammarError(f"the JSON schema cannot be compiled: {messages[0]}")
        return grammar

    def matcher(self, spec: StructuredOutputs) -> GrammarMatcher:
        return GrammarMatcher(llguidance.LLMatcher(self._tokenizer, self.grammar(spec), log_level=0))


class GrammarMasks:
    """Fills the allowed-token bitmasks of a step's grammar rows at once, on llguidance's thread pool (the GIL is
    released while it runs): at a 128k vocabulary one row costs ~0.2 ms, a batch of them as much as the threads
    allow."""

    def __init__(self, vocab_size: int):
        self.words = bitmask_words(vocab_size)
        self._executor = llguidance.LLExecutor()

    def allowed_tokens(self, matchers: list[GrammarMatcher]) -> list[torch.Tensor]:
        """Each matcher's (W,) int32 packed bitmask of the tokens that may come next; each is a tensor of its own,
        so that pickling one row with a step does not carry the others."""
        bitmask = torch.full((len(matchers), self.words), -1, dtype=torch.int32)  # (G, W)
        llg_numpy.fill_next_token_bitmask_par(self._executor, [(m._matcher, i) for i, m in enumerate(matchers)],
                                              bitmask.numpy())  # a view: llguidance writes into the tensor
        return [row.clone() for row in bitmask]


class GrammarMatcher:
    """One request's position in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher):
        self._matcher = matcher  # its masks are filled by GrammarMasks

    def accept(self, token_id: int) -> None:
        """Follow a sampled token (one the mask allowed; the end-of-sequence token once the grammar is done)."""
        self._matcher.consume_token(token_id)
        if self._matcher.is_error():  # only a bug lets a masked-out token through
            raise RuntimeError(f"grammar matcher: {self._matcher.get_error()}")

    @property
    def done(self) -> bool:
        """The output is complete: the grammar takes no more tokens."""
        return self._matcher.is_stopped()


def apply_token_bitmask(logits: torch.Tensor, rows: list[int], bitmasks: list[torch.Tensor]) -> None:
    """logits: (B, V) float, changed in place: in each row of `rows`, tokens its bitmask (W,) int32 does not allow
    become -inf. The bitmasks go to the logits' device in one copy and are unpacked there."""
    vocab = logits.shape[-1]
    packed = torch.stack(bitmasks).to(logits.device, non_blocking=True)  # (G, W) int32
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)  # (32,)
    allowed = ((packed.unsqueeze(-1) >> shifts) & 1).flatten(1)[:, :vocab].bool()  # (G, W * 32) -> (G, V)
    index = torch.tensor(rows, device=logits.device)  # (G,)
    logits[index] = logits.index_select(0, index).masked_fill(~allowed, float("-inf"))
