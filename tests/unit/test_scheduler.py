"""The scheduler on its own (no Ray, no model).

`advance` hands the scheduler a step's output: each sequence's pending token
(the one its step sampled) arrives. The sequences here share their prompts'
first tokens, so the policy tests run without prefix caching; test_kv_cache.py
covers it.
"""
import pytest

from raytp.sampling import SamplingParams
from raytp.engine.kv_cache import KVCacheManager
from raytp.engine.scheduler import ScheduledSeq, Scheduler, Sequence, SeqStatus
from raytp.engine.step import PREVIOUS_TOKEN

pytestmark = pytest.mark.timeout(30)

PARAMS = SamplingParams(max_tokens=64, temperature=0.0)


def make_seq(name: str, prompt_len: int, arrival: float) -> Sequence:
    return Sequence(name, list(range(1, prompt_len + 1)), PARAMS, arrival_time=arrival)


def make_scheduler(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=256,
                   prefix_caching=False) -> Scheduler:
    return Scheduler(KVCacheManager(num_blocks, block_size, prefix_caching), max_num_seqs, max_num_batched_tokens)


def advance(sched: Scheduler, batch: list[ScheduledSeq], token: int = 7) -> None:
    sched.update_from_output(batch, [token] * len(batch))


def names(batch) -> list[str]:
    return [s.seq.request_id for s in batch]


# ---- admission -------------------------------------------------------------------------


def test_admission_respects_max_num_seqs():
    sched = make_scheduler(max_num_seqs=3)
    for i in range(5):
        sched.add(make_seq(f"s{i}", 4, float(i)))
    batch = sched.schedule()
    assert names(batch) == ["s0", "s1", "s2"]
    assert [s.start for s in batch] == [0, 0, 0] and all(len(s.token_ids) == 4 for s in batch)
    assert [s.request_id for s in sched.waiting] == ["s3", "s4"]
    advance(sched, batch)
    # Next step: three decodes and no admission while the batch is full.
    batch = sched.schedule()
    assert names(batch) == ["s0", "s1", "s2"] and all(len(s.token_ids) == 1 for s in batch)
    assert len(sched.waiting) == 2
    # One finishes: the first waiting one comes in.
    advance(sched, batch)
    sched.finish(sched.running[0])
    assert names(sched.schedule()) == ["s1", "s2", "s3"]



def test_room_for_arrivals_means_nobody_waits_and_the_batch_has_room():
    """What the step loop asks before it holds the next step back for requests that may arrive meanwhile."""
    sched = make_scheduler(max_num_seqs=2)
    assert sched.has_room_for_arrivals()
    for i in range(3):
        sched.add(make_seq(f"s{i}", 4, float(i)))
    assert not sched.has_room_for_arrivals()  # three wait
    advance(sched, sched.schedule())
    assert not sched.has_room_for_arrivals()  # two run (the batch is full), one waits
    sched.finish(sched.running[0])
    advance(sched, sched.schedule())  # the third is admitted
    assert not sched.has_room_for_arrivals()
    sched.finish(sched.running[0])
    assert sched.has_room_for_arrivals()

def test_admission_respects_token_budget():
    sched = make_scheduler(max_num_batched_tokens=20)
    for i in range(3):
        sched.add(make_seq(f"p{i}", 8, float(i)))
    batch = sched.schedule()
    # 8 + 8, then the first 4 of p2's 8 tokens: a chunk that samples nothing
    assert names(batch) == ["p0", "p1", "p2"] and [len(s.token_ids) for s in batch] == [8, 8, 4]
    assert [s.samples for s in batch] == [True, True, False] and batch[2].seq.num_pending == 0
    advance(sched, batch)
    assert batch[2].seq.output_token_ids == []  # the chunk's sampled token was dropped
    batch = sched.schedule()
    assert names(batch) == ["p0", "p1", "p2"]  # 1 + 1 decode tokens, then the rest of p2's prompt
    assert [(s.start, len(s.token_ids), s.samples) for s in batch] == [(8, 1, True), (8, 1, True), (4, 4, True)]


def test_long_prompt_is_prefilled_in_chunks_while_others_decode():
    sched = make_scheduler(num_blocks=64, block_size=4, max_num_batched_tokens=16)
    short, long = make_seq("short", 3, 0.0), make_seq("long", 40, 1.0)
    sched.add(short)
    sched.add(long)
    steps = []
    while long.output_token_ids == []:
        batch = sched.schedule()
        assert sum(len(s.token_ids) for s in batch) <= 16
        steps.append([(s.seq.request_id, s.start, len(s.token_ids), s.samples) for s in batch])
        advance(sched, batch)
    assert steps == [
        [("short", 0, 3, True), ("long", 0, 13, False)],
        [("short", 3, 1, True), ("long", 13, 15, False)],
        [("short", 4, 1, True), ("long", 28, 12, True)],
    ]
    assert long.num_computed == 40 and len(long.block_table) == 10 and len(short.output_token_ids) == 3



def test_chunks_shorten_as_their_context_grows():
    """With attention counted (here a query-key pair costs 1/256 of a token), a chunk of n tokens after c costs
    n * (1 + (c + (n + 1) / 2) / 256). Beside a decode row, 63 of the 64 budget are left: 56 tokens at context 0
    (cost 62.2; 57 would cost 63.5), then 47 at context 56 (61.7; 48: 63.1)."""
    sched = Scheduler(KVCacheManager(64, 4), 4, 64, attention_cost=1 / 256)
    short, long = make_seq("short", 3, 0.0), make_seq("long", 200, 1.0)
    sched.add(short)
    batch = sched.schedule()
    advance(sched, batch)
    sched.add(long)
    chunks = []
    while long.num_computed < 200:
        batch = sched.schedule()
        chunks += [(s.start, len(s.token_ids)) for s in batch if s.seq is long]
        advance(sched, batch)
    assert chunks[:2] == [(0, 56), (56, 47)]
    lengths = [n for _, n in chunks]
    assert sum(lengths) == 200 and lengths[:-1] == sorted(lengths[:-1], reverse=True)


def test_sliding_window_caps_the_context_a_chunk_pays_for():
    sched = Scheduler(KVCacheManager(64, 4), 4, 64, attention_cost=1 / 256, sliding_window=8)
    short, long = make_seq("short", 3, 0.0), make_seq("long", 200, 1.0)
    sched.add(short)
    advance(sched, sched.schedule())
    sched.add(long)
    lengths = []
    while long.num_computed < 200:
        batch = sched.schedule()
        lengths += [len(s.token_ids) for s in batch if s.seq is long]
        advance(sched, batch)
    # Beside the decode row, a token sees at most 8 keys: n * (1 + 8 / 256) <= 63 -> 61 at every context (without
    # the window, the chunks would shrink: 56, then 47, ...).
    assert lengths[:4] == [61, 61, 61, 17]


def test_a_step_without_running_streams_takes_the_whole_budget_in_tokens():
    """Attention is charged only where running streams wait for the step: a prompt alone is cut in chunks of the
    whole budget, as deep as they go."""
    sched = Scheduler(KVCacheManager(64, 4), 4, 64, attention_cost=1 / 256)
    long = make_seq("long", 200, 0.0)
    sched.add(long)
    lengths = []
    while long.num_computed < 200:
        batch = sched.schedule()
        lengths.append(len(batch[0].token_ids))
        advance(sched, batch)
    assert lengths == [64, 64, 64, 8]

def test_chunk_is_scheduled_ahead_like_a_decode():
    """Steps are sent ahead: a chunk's continuation needs no token from the step in flight."""
    sched = make_scheduler(num_blocks=64, block_size=4, max_num_batched_tokens=8)
    seq = make_seq("a", 20, 0.0)
    sched.add(seq)
    first, second, third = sched.schedule(), sched.schedule(), sched.schedule()
    assert [(b[0].start, len(b[0].token_ids), b[0].samples) for b in (first, second, third)] == [
        (0, 8, False), (8, 8, False), (16, 4, True)]
    assert sched.schedule()[0].token_ids == [PREVIOUS_TOKEN] and seq.num_pending == 2


def test_admission_waits_for_blocks():
    sched = make_scheduler(num_blocks=3, block_size=4)
    sched.add(make_seq("a", 8, 0.0))  # 2 blocks
    sched.add(make_seq("b", 8, 1.0))  # 2 more: only 1 left
    assert names(sched.schedule()) == ["a"]
    assert [s.request_id for s in sched.waiting] == ["b"] and sched.blocks.num_free == 1


# ---- decode ------------------------------------------------------------------------------


def test_decode_grows_block_table():
    sched = make_scheduler(num_blocks=8, block_size=4)
    seq = make_seq("a", 4, 0.0)
    sched.add(seq)
    batch = sched.schedule()
    assert len(seq.block_table) == 1 and batch[0].token_ids == [1, 2, 3, 4]
    for step in range(1, 6):
        advance(sched, batch, token=100 + step)
        batch = sched.schedule()
        # One new token at the next position; the table holds every position so far.
        assert batch[0].token_ids == [100 + step] and batch[0].start == 3 + step
        assert len(seq.block_table) == (4 + step + 3) // 4
    assert len(set(seq.block_table)) == len(seq.block_table)
    assert sched.blocks.num_free == 8 - len(seq.block_table)


# ---- preemption ------------------------------------------------------------------------


def test_preemption_picks_latest_arrival_and_requeues_it_first():
    # Queue order differs from arrival order, so "latest arrival" is not "last admitted".
    sched = make_scheduler(num_blocks=4, block_size=4)
    late, early = make_seq("late", 8, arrival=2.0), make_seq("early", 8, arrival=1.0)
    sched.add(late)
    sched.add(early)
    batch = sched.schedule()
    assert names(batch) == ["late", "early"] and sched.blocks.num_free == 0
    behind = make_seq("behind", 2, arrival=3.0)
    sched.add(behind)
    advance(sched, batch)
    # Both now need a third block; none is free: the latest arrival gives its blocks up.
    batch = sched.schedule()
    assert names(batch) == ["early"] and batch[0].token_ids == [7] and batch[0].start == 8
    assert late.status is SeqStatus.WAITING and late.num_preemptions == 1 and early.num_preemptions == 0
    assert late.block_table == [] and late.num_computed == 0
    assert [s.request_id for s in sched.waiting] == ["late", "behind"]
    assert sched.running == [early] and len(early.block_table) == 3
    # When room comes back, it is recomputed from scratch: prompt plus what it generated.
    advance(sched, batch)
    sched.finish(early)
    batch = sched.schedule()
    assert names(batch) == ["late", "behind"]
    assert batch[0].start == 0 and batch[0].token_ids == late.prompt_token_ids + [7]


def test_preemption_of_the_sequence_itself():
    # The latest arrival is the one short of a block: it steps aside, the others run.
    sched = make_scheduler(num_blocks=3, block_size=4)
    a, b = make_seq("a", 3, 0.0), make_seq("b", 8, 1.0)
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert names(batch) == ["a", "b"] and sched.blocks.num_free == 0
    advance(sched, batch)
    batch = sched.schedule()  # a (4 tokens) still fits its block; b (9) needs a third
    assert names(batch) == ["a"] and b.status is SeqStatus.WAITING and b.num_preemptions == 1
    assert a.num_preemptions == 0 and list(sched.waiting) == [b] and sched.blocks.num_free == 2


def test_preempt_all():
    sched = make_scheduler(num_blocks=16, block_size=4, max_num_seqs=2)
    seqs = [make_seq(f"s{i}", 5, float(i)) for i in range(3)]
    for s in seqs:
        sched.add(s)
    advance(sched, sched.schedule())
    assert sched.blocks.num_free < 16 and [s.request_id for s in sched.waiting] == ["s2"]
    sched.preempt_all()
    assert sched.running == [] and sched.blocks.num_free == 16
    # Running ones go back in arrival order, ahead of those that were already waiting.
    assert [s.request_id for s in sched.waiting] == ["s0", "s1", "s2"]
    assert [s.num_preemptions for s in seqs] == [1, 1, 0]
    assert all(s.block_table == [] and s.num_computed == 0 and s.status is SeqStatus.WAITING for s in seqs)
    batch = sched.schedule()
    assert names(batch) == ["s0", "s1"] and all(b.start == 0 and len(b.token_ids) == 6 for b in batch)


# ---- finishing ---------------------------------------------------------------------------


def test_finish_frees_blocks():
    sched = make_scheduler(num_blocks=8, block_size=4, max_num_seqs=1)
    a, b = make_seq("a", 6, 0.0), make_seq("b", 3, 1.0)
    sched.add(a)
    sched.add(b)
    advance(sched, sched.schedule())
    assert sched.blocks.num_free == 6
    sched.finish(a)
    assert a.status is SeqStatus.FINISHED and a.block_table == [] and sched.running == []
    assert sched.blocks.num_free == 8
    # A waiting sequence can be finished (aborted) too.
    sched.finish(b)
    assert not sched.has_work() and sched.blocks.num_free == 8


# ---- scheduling ahead (the next step sent while this one runs) ----------------------------


def test_next_step_scheduled_before_the_tokens_arrive():
    sched = make_scheduler(num_blocks=8, block_size=4)
    seq = make_seq("a", 4, 0.0)
    sched.add(seq)
    first = sched.schedule()
    assert first[0].token_ids == [1, 2, 3, 4] and first[0].num_generated == 0 and seq.num_pending == 1
    # The prefill's token is still on the workers: the next step computes it as PREVIOUS_TOKEN.
    second = sched.schedule()
    assert second[0].token_ids == [PREVIOUS_TOKEN] and second[0].start == 4 and second[0].num_generated == 1
    assert seq.num_pending == 2 and seq.num_computed == 5 and len(seq.block_table) == 2  # room for position 5
    advance(sched, first, token=50)
    advance(sched, second, token=51)
    assert seq.output_token_ids == [50, 51] and seq.num_pending == 0
    # With nothing in flight, the newest token is sent as itself.
    third = sched.schedule()
    assert third[0].token_ids == [51] and third[0].start == 5 and third[0].num_generated == 2


def test_sequence_whose_last_token_is_pending_is_not_scheduled_again():
    sched = make_scheduler()
    seq = Sequence("a", [1, 2, 3], SamplingParams(max_tokens=2, temperature=0.0))
    sched.add(seq)
    sched.schedule()
    assert names(sched.schedule()) == ["a"]  # samples output token 2 of 2
    assert sched.schedule() == [] and seq.num_pending == 2


def test_preempted_sequence_waits_for_its_pending_token_before_recompute():
    sched = make_scheduler(num_blocks=4, block_size=4)
    early, late = make_seq("early", 8, 1.0), make_seq("late", 8, 2.0)
    sched.add(early)
    sched.add(late)
    in_flight = sched.schedule()  # both prefill; all 4 blocks used
    # Scheduled ahead: both need a third block, so late is preempted while its first token is still pending.
    ahead = sched.schedule()
    assert names(ahead) == ["early"] and late.status is SeqStatus.WAITING and late.num_pending == 1
    sched.finish(early)
    assert sched.schedule() == []  # late's tokens are not all known yet: no recompute
    advance(sched, in_flight, token=9)  # its token arrives (early finished: the scheduler drops its token)
    batch = sched.schedule()
    assert names(batch) == ["late"] and batch[0].token_ids == late.prompt_token_ids + [9] and batch[0].start == 0


# ---- a step's output -----------------------------------------------------------------------


def test_update_from_output_finishes_on_stop_token_and_length():
    sched = make_scheduler(num_blocks=16, block_size=4)
    by_stop = Sequence("stop", [1, 2], SamplingParams(max_tokens=8, stop_token_ids=[99]), stop_token_ids=frozenset({2, 99}))
    by_eos = Sequence("eos", [1, 2], SamplingParams(max_tokens=8), stop_token_ids=frozenset({2}))
    by_len = Sequence("len", [1, 2], SamplingParams(max_tokens=1), stop_token_ids=frozenset({2}))
    going = make_seq("going", 2, 3.0)
    for s in (by_stop, by_eos, by_len, going):
        sched.add(s)
    batch = sched.schedule()
    taken = sched.update_from_output(batch, [99, 2, 5, 2])
    assert [(s.request_id, t) for s, t in taken] == [("stop", 99), ("eos", 2), ("len", 5), ("going", 2)]
    assert (by_stop.finish_reason, by_stop.stop_reason) == ("stop", 99)  # an explicit stop_token_ids hit
    assert (by_eos.finish_reason, by_eos.stop_reason) == ("stop", None)  # eos
    assert (by_len.finish_reason, by_len.stop_reason) == ("length", None)
    assert going.status is SeqStatus.RUNNING and going.output_token_ids == [2]  # 2 is not its stop token
    assert sched.running == [going] and sched.blocks.num_free == 16 - len(going.block_table)
    assert all(s.output_token_ids == [t] for s, t in taken)


def test_update_from_output_skips_a_sequence_finished_while_its_step_ran():
    sched = make_scheduler()
    a, b = make_seq("a", 3, 0.0), make_seq("b", 3, 1.0)
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    sched.finish(a, "abort")
    taken = sched.update_from_output(batch, [5, 6])
    assert [(s.request_id, t) for s, t in taken] == [("b", 6)]
    assert a.output_token_ids == [] and a.finish_reason == "abort" and b.num_pending == 0


def test_max_model_len_ends_a_sequence():
    sched = Scheduler(KVCacheManager(16, 4), 4, 64, max_model_len=5)
    seq = make_seq("a", 4, 0.0)
    sched.add(seq)
    sched.update_from_output(sched.schedule(), [9])
    assert seq.finish_reason == "length" and len(seq) == 5 and not sched.has_work()


def test_chunked_prompts_short_of_blocks_do_not_wait_on_each_other():
    """Two long prompts admitted chunk by chunk into a cache that holds only one of them: the later one is
    preempted (and recomputed later), so both finish, each block in use by one sequence at a time."""
    sched = make_scheduler(num_blocks=12, block_size=4, max_num_seqs=4, max_num_batched_tokens=12)
    a = Sequence("a", list(range(1, 31)), SamplingParams(max_tokens=3, temperature=0.0))
    b = Sequence("b", list(range(1, 31)), SamplingParams(max_tokens=3, temperature=0.0))
    sched.add(a)
    sched.add(b)
    for _ in range(40):
        if not sched.has_work():
            break
        batch = sched.schedule()
        owners = [blk for s in sched.running for blk in s.block_table]
        assert len(owners) == len(set(owners)) and len(owners) + sched.blocks.num_free == 12
        advance(sched, batch)
    assert not sched.has_work()
    assert a.finish_reason == b.finish_reason == "length" and b.num_preemptions >= 1


def test_attention_cost_per_pair_of_the_bench_model():
    """bench-58m's shape (hidden 512, 8 heads / 4 KV heads of 64, MLP 1536): a token's linear layers do
    512 * (2 * 512 + 2 * 256) + 3 * 512 * 1536 = 3,145,728 multiply-adds per layer, a query-key pair 2 * 512."""
    from raytp.model.llama import ModelArgs
    from raytp.random_checkpoint import llama_config

    args = ModelArgs.from_hf_config(llama_config(hidden=512, intermediate=1536, layers=8, heads=8, kv_heads=4,
                                                 vocab=32000, bos_id=1, eos_id=2))
    assert args.attention_cost_per_pair() == pytest.approx(1 / 3072)


def test_roll_back_returns_the_lost_steps_sequences_to_where_those_steps_started():
    """Two steps in flight are lost with a rank but the KV cache survives: a running sequence goes back to the start
    of its first lost step (keeping its blocks), one the lost steps admitted goes back to the queue, the tokens they
    sampled never arrived, and the blocks they were filling are no longer offered as cached prefixes."""
    sched = make_scheduler(num_blocks=32, block_size=4, max_num_seqs=4, prefix_caching=True)
    a = make_seq("a", 6, 0.0)
    sched.add(a)
    advance(sched, sched.schedule())  # a's prompt; its first token arrived
    first_lost = sched.schedule()  # a decodes (in flight)...
    b = Sequence("b", list(range(100, 109)), PARAMS, arrival_time=1.0)  # no prefix in common with a
    sched.add(b)
    second_lost = sched.schedule()  # ...and decodes again with b admitted (in flight)
    assert names(first_lost) == ["a"] and names(second_lost) == ["a", "b"] and second_lost[1].admitted
    blocks_a, cached_b = list(a.block_table), sched.blocks.lookup(b.block_hashes)
    assert a.num_pending == 2 and cached_b  # b's full blocks were indexed when scheduled

    sched.roll_back([first_lost, second_lost])

    assert a.status is SeqStatus.RUNNING and a.block_table == blocks_a
    assert a.num_computed == first_lost[0].start == 6 and a.num_pending == 0 and a.output_token_ids == [7]
    assert b.status is SeqStatus.WAITING and list(sched.waiting) == [b] and b.block_table == [] and b.num_preemptions == 0
    assert sched.blocks.lookup(b.block_hashes) == []  # never computed: nobody may find b's prefix
    replay = sched.schedule()
    assert names(replay) == ["a", "b"] and replay[0].token_ids == [7] and replay[0].start == 6
    assert replay[1].start == 0 and len(replay[1].token_ids) == 9


# ---- a pipeline's micro-batches -------------------------------------------------------------------------


def test_micro_batches_take_turns_with_two_steps_each_in_flight():
    """Two micro-batches, four steps in flight (a pipeline of two stages): each step decodes half the running
    sequences, a micro-batch's second step carries PREVIOUS_TOKEN, and none runs ahead by more than two tokens."""
    sched = Scheduler(KVCacheManager(64, 4), 4, 256, micro_batches=2, max_pending=2)
    for i in range(4):
        sched.add(make_seq(f"s{i}", 4, float(i)))
    advance(sched, sched.schedule())  # every prompt in one step; its tokens arrive
    in_flight = [sched.schedule() for _ in range(4)]
    assert [names(b) for b in in_flight] == [["s0", "s1"], ["s2", "s3"], ["s0", "s1"], ["s2", "s3"]]
    assert [s.token_ids for s in in_flight[0]] == [[7], [7]]
    assert [s.token_ids for s in in_flight[2]] == [[PREVIOUS_TOKEN], [PREVIOUS_TOKEN]]
    assert sched.schedule() == []  # every sequence has two tokens in flight: it waits
    advance(sched, in_flight.pop(0))  # the first micro-batch's oldest step is back
    assert names(sched.schedule()) == ["s0", "s1"]


def test_a_prompt_goes_before_the_decode_of_a_sequence_in_the_step_just_sent():
    """Two micro-batches: a sequence that was in the step just sent decodes in the next one only when that step would
    otherwise be empty. A prompt waiting is computed instead (it needs no token from the steps in flight, so the
    first stage does not wait for the last), and the sequence decodes in the step after."""
    sched = Scheduler(KVCacheManager(64, 4), 4, 8, micro_batches=2, max_pending=2)
    sched.add(make_seq("a", 4, 0.0))
    advance(sched, sched.schedule())  # a's prompt; its first token is back
    assert [s.token_ids for s in sched.schedule()] == [[7]]
    sched.add(make_seq("b", 8, 1.0))
    assert names(sched.schedule()) == ["b"]  # b's prompt, not a's next token right behind the one before
    # Nothing else can run now (b's first token is in flight): a decodes, a step after its last.
    assert [(s.seq.request_id, s.token_ids) for s in sched.schedule()] == [("a", [PREVIOUS_TOKEN])]


def test_one_step_in_flight_decodes_every_sequence_once_its_token_is_back():
    """pipeline_steps_in_flight=1: one micro-batch, and a sequence with a token in flight waits for it."""
    sched = Scheduler(KVCacheManager(64, 4), 4, 256, micro_batches=1, max_pending=1)
    for i in range(3):
        sched.add(make_seq(f"s{i}", 4, float(i)))
    advance(sched, sched.schedule())
    batch = sched.schedule()
    assert names(batch) == ["s0", "s1", "s2"]
    assert sched.schedule() == []
    advance(sched, batch)
    assert names(sched.schedule()) == ["s0", "s1", "s2"]


@pytest.mark.parametrize("micro_batches, max_pending", [(1, 2), (2, 2), (3, 2), (2, 3)])
def test_every_row_of_a_step_has_its_blocks_even_when_blocks_run_out(micro_batches, max_pending):
    """Short of blocks, steps in flight, sequences arriving and finishing at random: every row the scheduler hands out
    belongs to a running sequence whose blocks cover the positions it computes (a sequence preempted after its row
    was added would compute in blocks that are no longer its own)."""
    import random

    for seed in range(40):
        rng = random.Random(seed)
        sched = Scheduler(KVCacheManager(12, 4), 6, 24, micro_batches=micro_batches, max_pending=max_pending)
        in_flight, arrivals = [], 0
        for _ in range(60):
            if rng.random() < 0.3:
                params = SamplingParams(max_tokens=rng.randrange(2, 12), temperature=0.0)
                sched.add(Sequence(f"s{arrivals}", list(range(1, rng.randrange(2, 14))), params, arrival_time=arrivals))
                arrivals += 1
            batch = sched.schedule() if len(in_flight) < micro_batches * max_pending else []
            for row in batch:
                seq = row.seq
                assert seq.status is SeqStatus.RUNNING, (seed, seq.request_id)
                assert len(seq.block_table) * 4 >= row.start + len(row.token_ids), (seed, seq.request_id)
            if batch:
                in_flight.append(batch)
            if in_flight and (not batch or rng.random() < 0.5):
                advance(sched, in_flight.pop(0))
