"""From tokens to what a client sees: incremental detokenization, stop strings, RequestOutput deltas.

The scheduler decides finishes that tokens alone decide (stop tokens,
length); this module finds the ones that need the text (stop strings) and
builds each request's output, holding back a tail of text that could still
turn out to be the start of a stop string, so streamed text is never taken back.
"""
from __future__ import annotations

from dataclasses import dataclass

from raytp.outputs import CompletionOutput, RequestOutput, TokenLogprob
from raytp.engine.scheduler import Sequence, SeqStatus
from raytp.engine.structured import GrammarMatcher
from raytp.engine.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class RequestState:
    seq: Sequence
    detokenizer: IncrementalDetokenizer | None
    text: str = ""  # all text so far, cut at a stop string
    sent_text: int = 0  # characters of text already handed out
    sent_tokens: int = 0
    first_token_time: float | None = None
    last_token_time: float | None = None
    logprobs: list[TokenLogprob] | None = None  # one per output token (params.logprobs set)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # by prompt position (params.prompt_logprobs set)
    grammar: GrammarMatcher | None = None  # params.structured_outputs set: where the output is in its grammar

    def prompt_logprobs_done(self) -> bool:
        return self.prompt_logprobs is None or all(lp is not None for lp in self.prompt_logprobs[1:])


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer | None):
        self.tokenizer = tokenizer

    def new_request(self, seq: Sequence) -> RequestState:
        detok = IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids) if self.tokenizer else None
        state = RequestState(seq, detok)
        if seq.params.logprobs is not None:
            state.logprobs = []
        if seq.params.prompt_logprobs is not None:
            state.prompt_logprobs = [None] * len(seq.prompt_token_ids)
        return state

    def add_token(self, state: RequestState, token: int) -> str | None:
        """Append the text of `token` (already in seq.output_token_ids; the scheduler may have finished the
        sequence with it). Returns the stop string that now ends the request, if any: the text is cut there."""
        seq, params = state.seq, state.seq.params
        if state.detokenizer is None:
            return None
        if token not in seq.stop_token_ids:  # a stop token's text is not part of the output
            state.text += state.detokenizer.add([token])
        if seq.status is SeqStatus.FINISHED:
            state.text += state.detokenizer.flush()
        if not params.stop or len(seq.output_token_ids) < params.min_tokens:  # vLLM: no stop before min_tokens
            return None
        # Only the tail can hold a stop string that this token completed.
        longest = max(len(s) for s in params.stop)
        search_from = max(0, state.sent_text - longest)
        hits = [(state.text.find(s, search_from), s) for s in params.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return None
        i, stop = min(hits)
        state.text = state.text[:i]
        return stop

    def output(self, state: RequestState) -> RequestOutput:
        """The request's output so far, with what is new since the previous one as the delta."""
        seq, params = state.seq, state.seq.params
        finished = seq.status is SeqStatus.FINISHED
        # While running, hold back a tail that may be the start of a stop string.
        hold = 0 if finished or not params.stop else max(len(s) for s in params.stop) - 1
        upto = max(state.sent_text, len(state.text) - hold)
        delta_text = state.text[state.sent_text : upto]
        delta_tokens = seq.output_token_ids[state.sent_tokens :]
        state.sent_text, state.sent_tokens = upto, len(seq.output_token_ids)
        completion = CompletionOutput(0, state.text if finished else state.text[:upto], list(seq.output_token_ids),
                                      seq.finish_reason if finished else None, seq.stop_reason if finished else None,
                                      None if state.logprobs is None else list(state.logprobs))
        return RequestOutput(seq.request_id, seq.prompt, seq.prompt_token_ids, [completion], finished,
                             delta_text, delta_tokens, state.prompt_logprobs)
