"""Per-token cost of a grammar's token mask: fill the next-token bitmask, then accept the chosen token.

Compares llguidance and xgrammar on a JSON schema at two vocabularies: the
`tiny` model's (1,024 tokens) and a 128,256-token byte-level BPE built here
(Llama 3's size and pre-tokenizer kind; trained by `tokenizers` on generated
pseudo-words, no network). Both libraries walk the same schema; at each step
a token is drawn uniformly from the allowed ones (seeded), so both see
comparable text. Prints one JSON line per (library, vocabulary): medians over the seeds.

    python benchmarks/grammar_mask_cost.py [--tokens 400] [--seeds 3] [--tokenizer-cache /tmp/bpe128k.json]
(xgrammar is optional: raytp does not depend on it; install it to compare.)
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "score": {"type": "number"},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "address", "score", "active"],
    "additionalProperties": False,
}


def llama3_sized_tokenizer(vocab_size: int = 128256) -> Tokenizer:
    """A byte-level BPE of Llama 3's vocabulary size, trained on ~1.5M generated pseudo-words and JSON-ish text
    (enough distinct words for the trainer to reach the size)."""
    rng = random.Random(0)
    syllables = [c + v for c in "bcdfghjklmnprstvwzBCDFGKLMPST" for v in "aeiouy"] + list("0123456789{}[]\":,._-")
    def lines():
        for _ in range(6000):
            yield " ".join("".join(rng.choice(syllables) for _ in range(rng.randint(1, 5))) for _ in range(250))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|end_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(lines(), trainer)
    return tok


def tiny_tokenizer() -> Tokenizer:
    from raytp.tiny import ensure_tiny_checkpoint

    return Tokenizer.from_file(f"{ensure_tiny_checkpoint()}/tokenizer.json")


def _allowed(bitmask_row: torch.Tensor, vocab: int) -> list[int]:
    bits = (bitmask_row.unsqueeze(1) >> torch.arange(32, dtype=torch.int32)) & 1  # (W, 32)
    return [i for i in torch.nonzero(bits.flatten()[:vocab]).flatten().tolist()]


def run_llguidance(tok: Tokenizer, eos: int, n_tokens: int, seed: int) -> dict:
    import llguidance
    import llguidance.torch as llt

    t0 = time.perf_counter()
    lltok = llguidance.LLTokenizer(tok.to_str(),
                                   n_vocab=tok.get_vocab_size(), eos_token=eos)
    tok_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    matcher = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_json_schema(SCHEMA))
    compile_s = time.perf_counter() - t0
    bitmask = llt.allocate_token_bitmask(1, tok.get_vocab_size())

    def fill():
        llt.fill_next_token_bitmask(matcher, bitmask, 0)

    return _walk("llguidance", fill, matcher.consume_token, lambda: matcher.is_stopped(), bitmask,
                 tok.get_vocab_size(), eos, n_tokens, seed, tok_s, compile_s)


def batch_fill_llguidance(tok: Tokenizer, eos: int, batch: int = 16, repeats: int = 40) -> dict:
    """A step's masks for `batch` requests: one by one, and at once on llguidance's thread pool (what raytp's
    engine does). Two identical sets of matchers take the same tokens, so each fill is of a new state (a matcher
    asked twice in one state answers from its cache)."""
    import llguidance
    import llguidance.torch as llt

    lltok = llguidance.LLTokenizer(tok.to_str(), n_vocab=tok.get_vocab_size(), eos_token=eos)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
    one_by_one = [llguidance.LLMatcher(lltok, grammar) for _ in range(batch)]
    at_once = [llguidance.LLMatcher(lltok, grammar) for _ in range(batch)]
    mask_a, mask_b = (llt.allocate_token_bitmask(batch, tok.get_vocab_size()) for _ in range(2))
    executor = llguidance.LLExecutor()
    rngs = [random.Random(i) for i in range(batch)]
    serial = parallel = 0.0
    steps = 0
    for _ in range(repeats):
        if any(m.is_stopped() for m in one_by_one):
            break
        t0 = time.perf_counter()
        for i, m in enumerate(one_by_one):
            llt.fill_next_token_bitmask(m, mask_a, i)
        t1 = time.perf_counter()
        llt.fill_next_token_bitmask_par(executor, [(m, i) for i, m in enumerate(at_once)], mask_b)
        t2 = time.perf_counter()
        serial, parallel, steps = serial + t1 - t0, parallel + t2 - t1, steps + 1
        for i in range(batch):
            token = rngs[i].choice(_allowed(mask_a[i], tok.get_vocab_size()))
            one_by_one[i].consume_token(token)
            at_once[i].consume_token(token)
    return {"library": "llguidance", "vocab": tok.get_vocab_size(), "batch": batch, "steps": steps,
            "step_fill_ms_one_by_one": round(serial / steps * 1e3, 3),
            "step_fill_ms_thread_pool": round(parallel / steps * 1e3, 3), "cpus": os.cpu_count()}


def run_xgrammar(tok: Tokenizer, eos: int, n_tokens: int, seed: int) -> dict:
    import transformers
    import xgrammar as xgr

    t0 = time.perf_counter()
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end_of_text|>" if tok.token_to_id(
        "<|end_of_text|>") is not None else "</s>")
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=tok.get_vocab_size(), stop_token_ids=[eos])
    compiler = xgr.GrammarCompiler(info)
    tok_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    matcher = xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(SCHEMA)))
    compile_s = time.perf_counter() - t0
    bitmask = xgr.allocate_token_bitmask(1, tok.get_vocab_size())
    return _walk("xgrammar", lambda: matcher.fill_next_token_bitmask(bitmask, 0), matcher.accept_token,
                 matcher.is_terminated, bitmask, tok.get_vocab_size(), eos, n_tokens, seed, tok_s, compile_s)


def _walk(name, fill, accept, done, bitmask, vocab, eos, n_tokens, seed, tok_s, compile_s) -> dict:
    """Up to n_tokens steps of fill + accept (timed); a walk that completes the JSON ends there."""
    rng = random.Random(seed)
    fill_s = accept_s = 0.0
    steps = 0
    while steps < n_tokens and not done():
        t0 = time.perf_counter()
        fill()
        t1 = time.perf_counter()
        allowed = _allowed(bitmask[0], vocab)
        token = rng.choice(allowed)
        t2 = time.perf_counter()
        accept(token)
        t3 = time.perf_counter()
        fill_s += t1 - t0
        accept_s += t3 - t2
        steps += 1
    return {"library": name, "vocab": vocab, "tokens": steps, "tokenizer_setup_s": round(tok_s, 3),
            "schema_compile_ms": round(compile_s * 1e3, 2), "fill_us_per_token": round(fill_s / steps * 1e6, 1),
            "accept_us_per_token": round(accept_s / steps * 1e6, 1),
            "total_us_per_token": round((fill_s + accept_s) / steps * 1e6, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=400)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--tokenizer-cache", help="a file to keep the built 128k tokenizer in between runs")
    args = ap.parse_args()
    t0 = time.perf_counter()
    if args.tokenizer_cache and os.path.exists(args.tokenizer_cache):
        big = Tokenizer.from_file(args.tokenizer_cache)
    else:
        big = llama3_sized_tokenizer()
        if args.tokenizer_cache:
            big.save(args.tokenizer_cache)
    print(json.dumps({"built_128k_tokenizer_s": round(time.perf_counter() - t0, 1),
                      "vocab": big.get_vocab_size()}), flush=True)
    runners = [run_llguidance]
    try:
        import xgrammar  # noqa: F401

        runners.append(run_xgrammar)
    except ImportError:
        print(json.dumps({"skipped": "xgrammar", "why": "not installed"}))
    for tok, eos_name in ((tiny_tokenizer(), "</s>"), (big, "<|end_of_text|>")):
        eos = tok.token_to_id(eos_name)
        rows: dict[str, list[dict]] = {r.__name__: [] for r in runners}
        for seed in range(args.seeds):  # the libraries alternate, so that load from elsewhere hits both alike
            for runner in runners:
                rows[runner.__name__].append(runner(tok, eos, args.tokens, seed))
        for runs in rows.values():
            summary = dict(runs[0], tokens=sum(r["tokens"] for r in runs))
            for key in ("schema_compile_ms", "fill_us_per_token", "accept_us_per_token", "total_us_per_token"):
                summary[key] = statistics.median(r[key] for r in runs)
            print(json.dumps(summary), flush=True)
        print(json.dumps(batch_fill_llguidance(tok, eos)), flush=True)


if __name__ == "__main__":
    main()
