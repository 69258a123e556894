"""Structured outputs in the engine (no Ray: tiny, one rank in this process).

The tiny model's unconstrained output is random text; under a JSON schema
every answer that ends by itself must be JSON valid against the schema. The
grammar's mask is computed by the engine from every token so far, so the
AsyncEngine, which otherwise schedules a step before the previous one's
tokens are back, must wait for those tokens: its answers must equal the
synchronous engine's, token for token, and so must a run with a group
rebuild in the middle.
"""
from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest
import torch

from raytp.config import EngineConfig
from raytp.engine.engine import AsyncEngine
from raytp.cluster.executor import GroupFailure, LocalExecutor
from raytp.llm import LLM
from raytp.sampling import RowContext, SamplingParams, sample
from raytp.engine.step import PREVIOUS_TOKEN
from raytp.engine.structured import GrammarCompiler, GrammarError, GrammarMasks, StructuredOutputs, apply_token_bitmask

pytestmark = pytest.mark.timeout(180)

# Bounded strings, numbers, enums and arrays: a random model completes it within a few dozen tokens.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "kind": {"anyOf": [{"type": "null"}, {"enum": ["a", "b"]}]},
    },
    "required": ["name", "age", "ok", "tags", "kind"],
    "additionalProperties": False,
}
SEEDS = range(8)


def local(config, path, max_len):
    return LocalExecutor(config, path, max_len, num_threads=1)


@pytest.fixture(scope="module")
def llm():
    made = LLM("tiny", executor_factory=local, device="cpu", max_model_len=512)
    yield made
    made.shutdown()


def schema_params(seed: int, max_tokens: int = 200, **extra) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, seed=seed, structured_outputs=StructuredOutputs(json_schema=SCHEMA),
                          **extra)


def test_the_first_mask_allows_only_the_start_of_an_object(llm):
    tokenizer = llm.tokenizer
    matcher = GrammarCompiler(tokenizer, llm.engine.args.vocab_size).matcher(StructuredOutputs(json_object=True))
    (mask,) = GrammarMasks(llm.engine.args.vocab_size).allowed_tokens([matcher])  # (W,) int32
    assert mask.shape == ((llm.engine.args.vocab_size + 31) // 32,) and mask.dtype == torch.int32
    logits = torch.zeros(1, llm.engine.args.vocab_size)  # (1, V)
    apply_token_bitmask(logits, [0], [mask])
    allowed = torch.nonzero(logits[0] == 0).flatten().tolist()
    assert tokenizer.encode("{", add_special_tokens=False)[0] in allowed
    assert allowed and all(tokenizer.decode([t]).startswith("{") for t in allowed)


def test_the_sampler_never_picks_a_masked_token_whatever_the_bias(llm):
    """Greedy and seeded rows, with +100 on "x" (which cannot start JSON): every pick is one its matcher accepts."""
    compiler = GrammarCompiler(llm.tokenizer, llm.engine.args.vocab_size)
    masks = GrammarMasks(llm.engine.args.vocab_size)
    x = llm.tokenizer.encode("x", add_special_tokens=False)[0]
    params = [SamplingParams(temperature=0, logit_bias={x: 100.0}), SamplingParams(temperature=1.0, logit_bias={x: 100.0})]
    for seed in range(6):
        matchers = [compiler.matcher(StructuredOutputs(json_schema=SCHEMA)) for _ in params]
        for step in range(12):
            logits = torch.randn(2, llm.engine.args.vocab_size, generator=torch.Generator().manual_seed(seed * 100 + step))
            contexts = [RowContext(allowed_tokens=mask) for mask in masks.allowed_tokens(matchers)]
            picks = sample(logits, params, [step, step], torch.Generator().manual_seed(seed), contexts)
            assert step > 0 or x not in picks
            for matcher, token in zip(matchers, picks):
                if not matcher.done:
                    matcher.accept(token)  # raises if the mask let a token through that the grammar refuses


def test_every_json_schema_answer_validates(llm):
    outs = llm.generate(["Tell me about a person", "hi"] * 4, [schema_params(seed) for seed in SEEDS])
    for out in outs:
        completion = out.outputs[0]
        assert completion.finish_reason == "stop", completion.text
        jsonschema.validate(json.loads(completion.text), SCHEMA)
    assert len({o.outputs[0].text for o in outs}) > 4  # the seeds give different answers


def test_json_object_and_a_cut_answer(llm):
    obj = llm.generate("hi", SamplingParams(max_tokens=300, seed=1, structured_outputs=StructuredOutputs(json_object=True)))
    text = obj[0].outputs[0].text
    assert text.startswith("{")
    if obj[0].outputs[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    # max_tokens reached mid-JSON: finish_reason "length", the text is a prefix of an answer, not JSON.
    cut = llm.generate("hi", schema_params(0, max_tokens=5))[0].outputs[0]
    whole = llm.generate("hi", schema_params(0))[0].outputs[0]
    assert cut.finish_reason == "length" and whole.text.startswith(cut.text) and len(cut.token_ids) == 5


def test_a_malformed_schema_is_a_grammar_error(llm):
    with pytest.raises(GrammarError, match="nonsense"):
        llm.engine.add_request("bad", "hi", SamplingParams(structured_outputs=StructuredOutputs(
            json_schema={"type": "nonsense"})))
    assert "bad" not in llm.engine.requests


def test_a_rebuild_mid_answer_changes_no_token(llm):
    """The matchers live in the engine: the resumed requests re-prefill and continue under the same grammar."""
    params = [schema_params(seed) for seed in range(4)]
    expected = [o.outputs[0].token_ids for o in llm.generate(["hi"] * 4, params)]
    core = llm.engine
    for i, p in enumerate(params):
        core.add_request(f"rebuilt-{i}", "hi", p)
    finals, steps = {}, 0
    while len(finals) < 4:
        finals.update({o.request_id: o.outputs[0].token_ids for o in core.step() if o.finished})
        steps += 1
        if steps == 6:
            core.recover(GroupFailure("test: rebuild mid-answer"), [])  # TP=1 has no spare: the group is rebuilt
    assert [finals[f"rebuilt-{i}"] for i in range(4)] == expected


class RecordingExecutor(LocalExecutor):
    """Records every submitted step's rows: (request id, its token ids, whether it carried a mask)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps: list[list[tuple[str, list[int], bool]]] = []

    def submit(self, seqs):
        self.steps.append([(s.request_id, list(s.token_ids), s.allowed_tokens is not None) for s in seqs])
        return super().submit(seqs)


def test_scheduling_ahead_waits_for_a_grammar_token_and_changes_nothing(llm):
    """Mixed batch on the AsyncEngine: grammar rows never carry PREVIOUS_TOKEN (their mask needs the token), the
    unconstrained ones still do while no grammar row is in flight, and every answer equals the synchronous
    engine's."""
    free = SamplingParams(max_tokens=60, seed=3, ignore_eos=True)
    params = [schema_params(seed) for seed in range(4)] + [free]
    expected = [o.outputs[0].token_ids for o in llm.generate(["hi"] * 5, params)]
    executors = []

    def factory(config, path, max_len):
        executors.append(RecordingExecutor(config, path, max_len, num_threads=1))
        return executors[-1]

    async def main():
        engine = AsyncEngine(EngineConfig(model="tiny", device="cpu", max_model_len=512), factory)
        await engine.start()
        try:
            async def run(i, p, delay):
                await asyncio.sleep(delay)
                async for out in engine.generate("hi", p, f"r{i}"):
                    final = out
                return final.outputs[0].token_ids
            # The unconstrained request starts alone, so some of its steps are scheduled ahead.
            return await asyncio.gather(*(run(i, p, 0.0 if i == 4 else 0.1) for i, p in enumerate(params)))
        finally:
            await engine.shutdown()

    got = asyncio.run(main())
    assert got == expected
    rows = [row for step in executors[0].steps for row in step]
    assert any(masked for _, _, masked in rows)
    assert not any(masked and PREVIOUS_TOKEN in ids for _, ids, masked in rows)
    assert any(rid == "r4" and PREVIOUS_TOKEN in ids for rid, ids, _ in rows)
