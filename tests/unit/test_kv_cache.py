"""Prefix caching: the KV-cache manager alone, the scheduler sharing cached prefixes, and a property test that
drives the scheduler through random admit / finish / abort / preempt / evict / rebuild sequences against a
simulated KV cache (what the ranks would hold), checking that no sequence ever reads a block that was evicted or
reused, and that every block is accounted for."""
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raytp.engine.kv_cache import KVCacheManager, hash_blocks
from raytp.sampling import SamplingParams
from raytp.engine.scheduler import Scheduler, Sequence, SeqStatus
from raytp.engine.step import PREVIOUS_TOKEN

pytestmark = pytest.mark.timeout(120)


# ---- the manager ---------------------------------------------------------------------------


def test_hash_names_the_whole_prefix():
    a = hash_blocks([1, 2, 3, 4, 5, 6, 7, 8, 9], 4, [])
    b = hash_blocks([9, 9, 9, 9, 5, 6, 7, 8], 4, [])
    assert len(a) == 2 and len(b) == 2  # full blocks only
    assert a[1] != b[1]  # same tokens in block 1, different prefix
    assert hash_blocks([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], 4, list(a[:1]))[:2] == a  # extends a memo


def test_released_blocks_stay_cached_until_evicted_lru():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    h = hash_blocks([1, 2, 3, 4, 5, 6], 2, [])
    first = kv.allocate(3)
    for block, hb in zip(first, h):
        kv.cache_block(block, hb)
    kv.release(first)
    assert kv.num_free == 4 and kv.usage() == 0.0
    assert kv.lookup(h) == first  # still there after its sequence is gone
    kv.claim(first[:2])
    assert kv.num_free == 2
    # The one never-cached block is reused before any cached one; then the least recently used cached one
    # (the tail of the released sequence before its shared prefix).
    (fresh,) = kv.allocate(1)
    assert fresh not in first
    (evicted,) = kv.allocate(1)
    assert evicted == first[2] and kv.lookup(h) == first[:2]
    assert kv.allocate(1) is None  # all in use: nothing changes
    kv.release(first[:2] + [fresh, evicted])
    assert kv.num_free == 4


def test_a_prefix_is_indexed_once():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    (h,) = hash_blocks([1, 2], 2, [])
    a, b = kv.allocate(2)
    kv.cache_block(a, h)
    kv.cache_block(b, h)  # computed twice (two requests in one step): the second copy stays uncached
    assert kv.lookup([h]) == [a] and kv.block_hash == {a: h}


def test_disabled_caching_never_hits():
    kv = KVCacheManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    (h,) = hash_blocks([1, 2], 2, [])
    (a,) = kv.allocate(1)
    kv.cache_block(a, h)
    assert kv.lookup([h]) == []


# ---- the scheduler with a cache ----------------------------------------------------------------


PARAMS = SamplingParams(max_tokens=4, temperature=0.0)


def run_to_end(sched: Scheduler, token: int = 7) -> None:
    while sched.has_work():
        batch = sched.schedule()
        sched.update_from_output(batch, [token] * len(batch))


def test_a_later_request_skips_the_cached_prefix():
    sched = Scheduler(KVCacheManager(64, 4), max_num_seqs=8, max_num_batched_tokens=256)
    shared = list(range(100, 120))  # 5 blocks
    sched.add(Sequence("a", shared + [1, 2, 3], PARAMS))
    run_to_end(sched)
    assert sched.take_prefix_stats().hit_tokens == 0
    b = Sequence("b", shared + [4, 5], PARAMS)
    sched.add(b)
    (row,) = sched.schedule()
    assert row.start == 20 and row.token_ids == [4, 5]
    stats = sched.take_prefix_stats()
    assert (stats.queried_tokens, stats.hit_tokens) == (22, 20)


def test_a_fully_cached_prompt_still_computes_its_last_token():
    sched = Scheduler(KVCacheManager(64, 4), max_num_seqs=8, max_num_batched_tokens=256)
    prompt = list(range(100, 116))  # exactly 4 blocks
    sched.add(Sequence("a", prompt, PARAMS))
    run_to_end(sched)
    sched.add(Sequence("b", prompt, PARAMS))
    (row,) = sched.schedule()
    assert row.start == 12 and row.token_ids == prompt[12:] and row.samples  # the last block is recomputed


def test_requests_admitted_in_one_step_share_the_prefix_being_computed():
    sched = Scheduler(KVCacheManager(64, 4), max_num_seqs=8, max_num_batched_tokens=256)
    shared = list(range(100, 112))
    a, b = Sequence("a", shared + [1], PARAMS), Sequence("b", shared + [2], PARAMS)
    sched.add(a)
    sched.add(b)
    rows = sched.schedule()
    assert [(r.start, len(r.token_ids)) for r in rows] == [(0, 13), (12, 1)]
    assert a.block_table[:3] == b.block_table[:3] and a.block_table[3] != b.block_table[3]


def test_chunked_recompute_after_a_rebuild_computes_a_shared_prefix_once():
    """After a rebuild (new, empty cache) the resumed requests re-prefill in chunks; the first computes the
    prefix they share and the others find it."""
    sched = Scheduler(KVCacheManager(64, 4), max_num_seqs=8, max_num_batched_tokens=16)
    shared = list(range(100, 124))  # 6 blocks
    seqs = [Sequence(f"s{i}", shared + [i], SamplingParams(max_tokens=8, temperature=0.0)) for i in range(3)]
    for s in seqs:
        sched.add(s)
    for _ in range(4):
        sched.update_from_output(batch := sched.schedule(), [7] * len(batch))
    sched.preempt_all()
    sched.reset_blocks(KVCacheManager(64, 4))
    sched.take_prefix_stats()
    while any(s.status is SeqStatus.WAITING or s.total_len - s.num_computed > 1 for s in seqs):
        batch = sched.schedule()
        assert sum(len(r.token_ids) for r in batch) <= 16  # no giant recovery step
        sched.update_from_output(batch, [7] * len(batch))
    assert sched.take_prefix_stats().hit_tokens == 2 * 24


# ---- the property test -------------------------------------------------------------------


class SimulatedRanks:
    """What the ranks' KV cache holds: per block slot, the whole token prefix whose last token's K/V it has.
    Steps run in the order they are scheduled (as on the ranks); a step's sampled token is drawn here and
    reaches the scheduler later (the engine schedules one step ahead)."""

    def __init__(self, num_blocks: int, block_size: int, rng: random.Random):
        self.block_size, self.rng = block_size, rng
        self.slots: dict[tuple[int, int], tuple[int, ...]] = {}
        self.tokens: dict[str, list[int]] = {}  # every token of a sequence, including those not yet delivered

    def execute(self, batch) -> list[int]:
        sampled = []
        for row in batch:
            seq = row.seq
            tokens = self.tokens.setdefault(seq.request_id, list(seq.token_ids))
            ids = [tokens[row.start] if t == PREVIOUS_TOKEN else t for t in row.token_ids]
            assert ids == tokens[row.start : row.start + len(ids)], "a step computes tokens the sequence does not have"
            end = row.start + len(ids)
            for pos in range(row.start, end):  # write this step's K/V ...
                self.slots[self._slot(seq.block_table, pos)] = tuple(tokens[: pos + 1])
            for pos in range(end):  # ... then attention reads the whole context
                got = self.slots.get(self._slot(seq.block_table, pos))
                assert got == tuple(tokens[: pos + 1]), f"{seq.request_id} reads a stale or reused slot at {pos}"
            token = self.rng.randrange(1, 4)  # few distinct tokens: outputs share prefixes too
            if row.samples:
                tokens.append(token)
            sampled.append(token)
        return sampled

    def _slot(self, block_table: list[int], pos: int) -> tuple[int, int]:
        return block_table[pos // self.block_size], pos % self.block_size

    def forget_undelivered(self, seqs) -> None:
        """A rebuild loses the steps in flight, and the cache."""
        self.slots.clear()
        for seq in seqs:
            self.tokens[seq.request_id] = list(seq.token_ids)


def check_accounting(sched: Scheduler, ranks: SimulatedRanks) -> None:
    kv = sched.blocks
    refs = [0] * kv.num_blocks
    for seq in sched.running:
        assert len(set(seq.block_table)) == len(seq.block_table)
        for block in seq.block_table:
            refs[block] += 1
    for seq in sched.waiting:
        assert seq.block_table == []
    assert refs == kv.ref_count, "a block's reference count is not the number of sequences holding it"
    assert set(kv.free) == {b for b in range(kv.num_blocks) if refs[b] == 0}, "a held block is free or a lost one"
    assert {b: h for h, b in kv.cached.items()} == kv.block_hash
    for block, h in kv.block_hash.items():  # an indexed block holds (or is being written with) what its hash names
        last = ranks.slots.get((block, kv.block_size - 1))
        if last is not None:
            assert hash_blocks(list(last), kv.block_size, [])[-1] == h


OPS = st.lists(st.sampled_from(["add", "add", "step", "step", "step", "deliver", "abort", "rebuild"]),
               min_size=10, max_size=120)


@settings(max_examples=150, deadline=None)
@given(ops=OPS, seed=st.integers(0, 2**16), num_blocks=st.integers(6, 24), budget=st.sampled_from([4, 8, 64]))
def test_random_schedules_never_read_an_evicted_or_reused_block(ops, seed, num_blocks, budget):
    rng = random.Random(seed)
    block_size = 2
    sched = Scheduler(KVCacheManager(num_blocks, block_size), max_num_seqs=4, max_num_batched_tokens=budget,
                      max_model_len=num_blocks * block_size)
    ranks = SimulatedRanks(num_blocks, block_size, rng)
    prefixes = [[5, 6, 7, 8, 9, 10], [5, 6, 7, 1], [11, 12]]
    in_flight: list[tuple[list, list[int]]] = []  # scheduled and executed, tokens not yet delivered
    live: list[Sequence] = []
    for i, op in enumerate(ops):
        if op == "add":
            prompt = rng.choice(prefixes)[: rng.randint(1, 6)] + [rng.randrange(1, 4) for _ in range(rng.randint(0, 3))]
            seq = Sequence(f"r{i}", prompt, SamplingParams(max_tokens=rng.randint(1, 6), temperature=0.0))
            sched.add(seq)
            live.append(seq)
        elif op == "step" and len(in_flight) < 2:
            batch = sched.schedule()
            if batch:
                in_flight.append((batch, ranks.execute(batch)))
        elif op == "deliver" and in_flight:
            sched.update_from_output(*in_flight.pop(0))
        elif op == "abort" and live:
            sched.finish(rng.choice(live), "abort")
        elif op == "rebuild":
            in_flight.clear()
            sched.preempt_all()
            sched.reset_blocks(KVCacheManager(num_blocks, block_size))
            ranks.forget_undelivered(live)
        live = [s for s in live if s.status is not SeqStatus.FINISHED]
        check_accounting(sched, ranks)
    # Drain: everything left finishes, and every block comes back.
    for _ in range(2000):
        if not (sched.has_work() or in_flight):
            break
        if in_flight:
            sched.update_from_output(*in_flight.pop(0))
        batch = sched.schedule()
        if batch:
            in_flight.append((batch, ranks.execute(batch)))
        check_accounting(sched, ranks)
    assert not sched.has_work() and sched.blocks.num_free == num_blocks
