"""Continuous batching: which sequences run in the next step, and which KV blocks they use.

The engine owns every sequence's tokens; the workers only hold the KV cache
that the block manager hands out. A sequence short of blocks is preempted:
its blocks are freed and it goes back to the front of the waiting queue, to be
recomputed (re-prefilled from prompt plus generated tokens) later, never
dropped. Recovery after a group failure uses the same path for every sequence.

The engine may schedule step N+1 while step N still runs (so the workers never
wait for the engine): a sequence's token sampled by a step in flight is
"pending", and the next step computes it as PREVIOUS_TOKEN, which the workers
replace with what they sampled for that sequence in their last step that had it.

A pipeline (micro_batches > 1) has several steps in flight, each decoding at
most its share (1 / micro_batches) of the running sequences, so that the
steps in flight are alike in size and every stage has work; the sequences
least recently in a step go first, so the micro-batches take turns (a
sequence in two steps in a row would make the second wait, at the first
stage, for the first's token from the last stage). Its last stage sends each
step's tokens to the first stage, so a sequence may have up to `max_pending`
tokens pending (its next step queued behind the previous one) before it
waits for them.
"""
from __future__ import annotations

import enum
import math
import time
from collections import deque
from dataclasses import dataclass, field

from raytp.engine.kv_cache import BlockHash, KVCacheManager, hash_blocks
from raytp.engine.step_cost import chunk_pairs
from raytp.sampling import SamplingParams
from raytp.engine.step import PREVIOUS_TOKEN


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    output_token_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_cached_blocks: int = 0  # leading blocks of block_table whose prefix is in the cache's index
    block_hashes: list[BlockHash] = field(default_factory=list)  # of the full blocks of token_ids (a memo)
    num_computed: int = 0  # tokens whose K/V are in the cache (or being computed by a step in flight)
    num_pending: int = 0  # tokens sampled by steps in flight, not yet in output_token_ids
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    last_step: int = -1  # the scheduler's number of the last step that had it
    num_preemptions: int = 0
    stop_token_ids: frozenset[int] = frozenset()  # eos (unless ignore_eos) and params.stop_token_ids
    finish_reason: str | None = None  # "stop", "length" or "abort" once finished
    stop_reason: str | int | None = None  # the stop token id (from stop_token_ids) or stop string that ended it

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def __len__(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def total_len(self) -> int:
        """Tokens including the pending ones."""
        return len(self) + self.num_pending


@dataclass
class ScheduledSeq:
    seq: Sequence
    token_ids: list[int]  # tokens to compute this step (PREVIOUS_TOKEN for a pending one)
    start: int  # position of token_ids[0]
    num_generated: int  # index in the output of the token this step samples (seeds the sampler)
    samples: bool = True  # False for a prompt chunk that is not the last: its sampled token is dropped
    admitted: bool = False  # this step admitted the sequence (it was waiting before)


@dataclass
class PrefixCacheStats:
    queried_tokens: int = 0  # prompt (or recompute) tokens of admitted sequences
    hit_tokens: int = 0  # of those, tokens found in the cache (not computed again)


class Scheduler:
    def __init__(self, blocks: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int | None = None, attention_cost: float = 0.0, sliding_window: int | None = None,
                 micro_batches: int = 1, max_pending: int = 2):
        self.blocks = blocks
        self.micro_batches = micro_batches
        self.max_pending = max_pending  # pending tokens a sequence may have before it waits for them
        self.steps = 0  # steps scheduled so far
        self.prefix_stats = PrefixCacheStats()
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        # In a step that carries running streams' next tokens, a prompt chunk's token costs 1 + attention_cost *
        # (keys it attends to) of the step's budget (the engine learns it: step_cost.py), so that a chunk deep into
        # a long prompt is shorter and the step takes no longer than one near its start. A step with no stream in
        # it keeps nobody waiting: its chunks take the whole budget in tokens.
        self.attention_cost = attention_cost
        self.sliding_window = sliding_window
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def has_room_for_arrivals(self) -> bool:
        """Whether a request arriving now could be in the next step: none waits ahead of it and the batch has room."""
        return not self.waiting and len(self.running) < self.max_num_seqs

    def finish(self, seq: Sequence, reason: str = "abort", stop_reason: str | int | None = None) -> None:
        """A finished or aborted sequence leaves the queues and frees its blocks at once.

        Finishing a finished sequence again only updates its reason (a stop
        string found in the text of a sequence that just hit its length).
        """
        if seq.status is not SeqStatus.FINISHED:
            if seq.status is SeqStatus.RUNNING:
                self.running.remove(seq)
            elif seq in self.waiting:
                self.waiting.remove(seq)
            seq.status = SeqStatus.FINISHED
            self._free_blocks(seq)
        seq.finish_reason, seq.stop_reason = reason, stop_reason

    def update_from_output(self, batch: list["ScheduledSeq"], token_ids: list[int]) -> list[tuple[Sequence, int]]:
        """A step's sampled tokens arrive: each sequence gets its token and finishes on a stop token or at its
        length (freeing its blocks). Returns (sequence, token) for each sequence that took a token; one
        that finished or was aborted while the step ran takes none."""
        taken = []
        for sched, token in zip(batch, token_ids):
            seq = sched.seq
            if seq.status is SeqStatus.FINISHED or not sched.samples:
                continue
            seq.num_pending -= 1
            seq.output_token_ids.append(token)
            if token in seq.stop_token_ids:
                # Its id is kept, its text is not (as in vLLM); stop_reason only for an explicit stop_token_ids hit.
                self.finish(seq, "stop", token if token in seq.params.stop_token_ids else None)
            elif len(seq.output_token_ids) >= seq.params.max_tokens or (
                self.max_model_len is not None and len(seq) >= self.max_model_len
            ):
                self.finish(seq, "length")
            taken.append((seq, token))
        return taken

    def take_prefix_stats(self) -> PrefixCacheStats:
        """The prefix-cache lookups since the last call."""
        stats, self.prefix_stats = self.prefix_stats, PrefixCacheStats()
        return stats

    # ---- blocks of a sequence ----------------------------------------------------------------

    def _grow_blocks(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow seq's block table to hold num_tokens tokens; False (and no change) if blocks run out."""
        need = max(0, math.ceil(num_tokens / self.blocks.block_size) - len(seq.block_table))
        new = self.blocks.allocate(need)
        if new is None:
            return False
        seq.block_table.extend(new)
        return True

    def _free_blocks(self, seq: Sequence) -> None:
        self._cache_full_blocks(seq)  # its last full block may not be indexed yet
        self.blocks.release(seq.block_table)
        seq.block_table, seq.num_cached_blocks, seq.num_computed = [], 0, 0

    def _cache_full_blocks(self, seq: Sequence) -> None:
        """Index seq's full blocks whose tokens are known and computed (or being computed by a step in flight,
        which the ranks finish before any later step reads them)."""
        num_full = min(seq.num_computed, len(seq)) // self.blocks.block_size
        if num_full <= seq.num_cached_blocks:
            return
        hashes = hash_blocks(seq.token_ids, self.blocks.block_size, seq.block_hashes)
        for i in range(seq.num_cached_blocks, num_full):
            self.blocks.cache_block(seq.block_table[i], hashes[i])
        seq.num_cached_blocks = num_full

    def _use_cached_prefix(self, seq: Sequence) -> None:
        """Start a sequence being admitted from the longest prefix of its tokens already in the cache. At least
        its last token is computed, whose logits sample the next one."""
        if not self.blocks.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return  # prompt logprobs (echo) need every prompt position computed, as in vLLM
        max_blocks = (len(seq) - 1) // self.blocks.block_size
        hashes = hash_blocks(seq.token_ids, self.blocks.block_size, seq.block_hashes)[:max_blocks]
        hit = self.blocks.lookup(hashes)
        self.blocks.claim(hit)
        seq.block_table = hit
        seq.num_cached_blocks = len(hit)
        seq.num_computed = len(hit) * self.blocks.block_size

    # ---- scheduling --------------------------------------------------------------------

    def _preempt(self, seq: Sequence, counted: bool = True) -> None:
        self.running.remove(seq)
        self._free_blocks(seq)
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += counted
        self.waiting.appendleft(seq)

    def preempt_all(self) -> int:
        """Send every running sequence back to be recomputed (the KV cache is gone or being replaced); call
        roll_back first for the steps in flight. Returns the tokens whose computed K/V this throws away."""
        lost_tokens = sum(min(seq.num_computed, len(seq)) for seq in self.running)
        for seq in sorted(self.running, key=lambda s: s.arrival_time, reverse=True):
            self._preempt(seq)
        for seq in self.waiting:  # (waiting sequences hold no blocks: _free_blocks cleared them)
            # Steps in flight are lost with the group: their tokens are computed again.
            seq.num_pending = 0
        return lost_tokens

    def roll_back(self, lost: list[list[ScheduledSeq]]) -> None:
        """The steps in flight (in the order sent) were lost, but the KV cache was not: each of their sequences goes
        back to where its first lost step started, and those positions are computed again in the same blocks (the
        tokens those steps sampled never arrived). Blocks those steps were filling stop being offered as cached
        prefixes; a sequence that a lost step admitted goes back to the front of the queue, to be admitted again."""
        starts: dict[str, tuple[Sequence, int, bool]] = {}  # request id -> (seq, first lost start, admitted by one)
        for batch in lost:
            for s in batch:
                seq, start, admitted = starts.get(s.seq.request_id, (s.seq, s.start, False))
                starts[s.seq.request_id] = (seq, min(start, s.start), admitted or s.admitted)
        readmit = []
        for seq, start, admitted in starts.values():
            seq.num_pending = 0
            if seq.status is not SeqStatus.RUNNING:
                continue  # finished, or preempted while those steps were scheduled: nothing computed to keep
            for i in range(start // self.blocks.block_size, seq.num_cached_blocks):
                self.blocks.forget(seq.block_table[i])
            seq.num_cached_blocks = min(seq.num_cached_blocks, start // self.blocks.block_size)
            seq.num_computed = start
            if admitted:
                readmit.append(seq)
        for seq in sorted(readmit, key=lambda s: s.arrival_time, reverse=True):
            self._preempt(seq, counted=False)

    def reset_blocks(self, blocks: KVCacheManager) -> None:
        """Use a new, empty KV cache (after a rebuild); nothing may be running."""
        assert not self.running
        self.blocks = blocks

    def _allocate_or_preempt(self, seq: Sequence, num_tokens: int, batch: list[ScheduledSeq]) -> bool:
        """Grow seq's blocks to num_tokens, preempting the latest arrival not already in this step's batch until they
        fit; False if seq itself was the one preempted. (A sequence in the batch keeps its blocks: its row runs.)"""
        while not self._grow_blocks(seq, num_tokens):
            in_batch = {id(s.seq) for s in batch}  # (only when short of blocks: not for every row of every step)
            victim = max((s for s in self.running if s is seq or id(s) not in in_batch), key=lambda s: s.arrival_time)
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _scheduled(self, seq: Sequence, token_ids: list[int], start: int) -> ScheduledSeq:
        """Mark the tokens as computed; if they complete the sequence, the token this step samples is pending."""
        seq.num_computed = start + len(token_ids)
        self._cache_full_blocks(seq)
        samples = seq.num_computed == seq.total_len
        sched = ScheduledSeq(seq, token_ids, start, len(seq.output_token_ids) + seq.num_pending, samples)
        seq.last_step = self.steps
        if samples:
            seq.num_pending += 1
        return sched

    def _chunk_cost(self, context: int, n: int, paced: bool) -> float:
        """Budget that n prompt tokens after `context` computed ones use: n, plus (paced: the step carries running
        streams) their query-key pairs at attention_cost each."""
        if not paced:
            return n
        return n + self.attention_cost * chunk_pairs(context, n, self.sliding_window)

    def _chunk_len(self, context: int, remaining: int, budget: float, paced: bool) -> int:
        """The longest chunk of the `remaining` prompt tokens after `context` that fits `budget` (at least one
        token, so that a prompt longer than any budget still makes progress): a binary search, the cost growing
        with n."""
        low, high = 1, max(1, min(remaining, int(budget)))
        while low < high:
            mid = (low + high + 1) // 2
            if self._chunk_cost(context, mid, paced) <= budget:
                low = mid
            else:
                high = mid - 1
        return low

    def _schedule_decodes(self, batch: list[ScheduledSeq], order: list[Sequence], rows: int, spaced: bool) -> None:
        """Add up to `rows` decode rows to batch, in this order (spaced: none of a sequence in one of the last
        micro_batches - 1 steps)."""
        for seq in order:
            if seq.status is not SeqStatus.RUNNING or seq.total_len - seq.num_computed > 1:
                continue  # preempted below in this loop, or still prefilling (step 2)
            if len(seq.output_token_ids) + seq.num_pending >= seq.params.max_tokens:
                continue  # its last token is being sampled: nothing more to compute
            if seq.num_pending >= self.max_pending or len(batch) >= rows:
                continue  # it waits for its tokens in flight, or this micro-batch has its share
            if spaced and self.steps - seq.last_step < self.micro_batches:
                continue
            if self._allocate_or_preempt(seq, seq.total_len, batch):
                if seq.num_pending:  # the newest token is still on the workers
                    batch.append(self._scheduled(seq, [PREVIOUS_TOKEN], seq.total_len - 1))
                else:
                    batch.append(self._scheduled(seq, seq.token_ids[seq.num_computed :], seq.num_computed))

    def schedule(self) -> list[ScheduledSeq]:
        """The next step: decode rows first, then prompt chunks within the token budget.

        A prompt (or a preempted sequence's recompute) longer than what is left
        of `max_num_batched_tokens` is computed in chunks over several steps;
        only its last chunk samples a token. Beside running streams, a chunk's
        tokens cost the budget more the longer the context they attend to
        (_chunk_cost).
        """
        batch: list[ScheduledSeq] = []
        budget = self.max_num_batched_tokens
        running = sorted(self.running, key=lambda s: s.arrival_time)
        decode_rows = math.ceil(len(running) / self.micro_batches)  # a micro-batch's share
        # 1. Decode: every running sequence whose prompt is in the cache computes its newest token. Out of
        #    blocks, the latest arrival is preempted until the others fit. A pipeline's sequences go least
        #    recently scheduled first (sorted is stable: then by arrival), and not in two of any micro_batches
        #    steps in a row (its token would not be back at the first stage in time, which would wait for it)
        #    unless the step would otherwise be empty (step 4).
        if self.micro_batches > 1:
            decode_order = sorted(running, key=lambda s: s.last_step)
            self._schedule_decodes(batch, decode_order, decode_rows, spaced=True)
        else:
            self._schedule_decodes(batch, running, decode_rows, spaced=False)
        budget -= len(batch)
        paced = bool(batch)  # running streams wait for this step (see __init__)
        # 2. Prompts being prefilled in chunks continue, in arrival order, while the budget allows. Out of
        #    blocks, the latest arrival is preempted (as for decodes): chunks holding blocks must not wait on
        #    each other forever.
        for seq in running:
            if seq.status is not SeqStatus.RUNNING or seq.total_len - seq.num_computed <= 1 or budget < 1:
                continue
            n = self._chunk_len(seq.num_computed, len(seq) - seq.num_computed, budget, paced)
            if self._allocate_or_preempt(seq, seq.num_computed + n, batch):
                cost = self._chunk_cost(seq.num_computed, n, paced)
                batch.append(self._scheduled(seq, seq.token_ids[seq.num_computed : seq.num_computed + n],
                                             seq.num_computed))
                budget -= cost
        # 3. Admission: waiting sequences first come, first served, while the budget, the batch size and the
        #    free blocks allow; the last one admitted may start with a chunk of its prompt.
        while self.waiting and len(self.running) < self.max_num_seqs and budget >= 1:
            seq = self.waiting[0]
            if seq.num_pending:
                break  # preempted while a step in flight samples its token: recompute once it is known
            self._use_cached_prefix(seq)
            n = self._chunk_len(seq.num_computed, len(seq) - seq.num_computed, budget, paced)
            if not self._grow_blocks(seq, seq.num_computed + n):
                self._free_blocks(seq)  # the prefix it found stays cached
                break
            self.prefix_stats.queried_tokens += len(seq)
            self.prefix_stats.hit_tokens += seq.num_computed
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
            self.running.append(seq)
            cost = self._chunk_cost(seq.num_computed, n, paced)
            batch.append(self._scheduled(seq, seq.token_ids[seq.num_computed : seq.num_computed + n], seq.num_computed))
            batch[-1].admitted = True
            budget -= cost
        # 4. A pipeline with nothing else to compute decodes the sequences that were in a recent step (a lone
        #    sequence decodes in every step). Not before prompts: a prompt chunk needs no token from the steps in
        #    flight, so the first stage computes it while the last one finishes them (in a burst, every prefill
        #    step would otherwise wait for the one before).
        if self.micro_batches > 1 and not batch:
            self._schedule_decodes(batch, decode_order, decode_rows, spaced=False)
        if batch:
            self.steps += 1
        return batch
