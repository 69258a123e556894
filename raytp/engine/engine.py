"""The engine: requests in, tokens out, one step at a time.

`EngineCore` is synchronous and reads as three calls per step: schedule, run
(on the executor), postprocess. It owns every request's prompt and generated
tokens, so when the TP group fails every in-flight request resumes: where a
spare replaced the lost rank and the KV cache survived, only the steps that
were in flight are computed again; where the group had to be rebuilt (or is
resized), every request re-prefills what it already has.
`AsyncEngine` drives a core from an asyncio loop for the server; `LLM`
(llm.py) drives one synchronously.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from typing import AsyncIterator, Awaitable, Callable

from raytp.config import EngineConfig
from raytp.cluster.executor import Executor, GroupFailure
from raytp.model import cpu_ops
from raytp.engine.output_processor import OutputProcessor, RequestState
from raytp.engine.pacing import StepPacer
from raytp.outputs import RequestOutput, TokenLogprob
from raytp.sampling import SamplingParams
from raytp.engine.kv_cache import KVCacheManager
from raytp.engine.model_check import checked_model_args
from raytp.engine.scheduler import ScheduledSeq, Scheduler, Sequence, SeqStatus
from raytp.named_models import resolve_model_path
from raytp.engine.tokenizer import Tokenizer
from raytp.engine.step import PREVIOUS_TOKEN, SeqStep, StepResult
from raytp.engine.step_cost import StepCostModel, chunk_pairs
from raytp.engine.structured import GrammarCompiler, GrammarError, GrammarMasks
from raytp.cluster.supervisor import Supervisor

log = logging.getLogger(__name__)

ExecutorFactory = Callable[[EngineConfig, str, int], Executor]


def ray_executor(config: EngineConfig, model_path: str, max_model_len: int) -> Executor:
    from raytp.cluster.group import TPGroup

    return TPGroup(config, model_path, max_model_len)


class EngineCore:
    def __init__(self, config: EngineConfig, executor_factory: ExecutorFactory = ray_executor, metrics=None,
                 steps_in_flight: bool = False):
        """steps_in_flight: the async engine keeps config.steps_in_flight() steps in flight (a pipeline's in
        micro-batches of their own sequences); step() runs one at a time, with every running sequence."""
        self.config = config
        self.micro_batches = config.micro_batches() if steps_in_flight else 1
        # Tokens a sequence may have in flight: its micro-batch's share of the steps in flight.
        self.max_pending = math.ceil(config.steps_in_flight() / self.micro_batches)
        self.model_path = resolve_model_path(config.model)
        self.args = checked_model_args(config, self.model_path)
        self.max_model_len = config.max_model_len or self.args.max_position_embeddings
        self.tokenizer = Tokenizer.from_dir(self.model_path)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.model_name = config.served_model_name or ("tiny" if config.model == "tiny" else config.model_name())
        cpu_ops.check_quantization(config.quantization, config.resolved_device())
        if config.resolved_device() == "cpu":
            cpu_ops.prebuild(attention=config.attention_backend in ("auto", "cpu"), linear=config.pack_weights)
        self.executor = executor_factory(config, self.model_path, self.max_model_len)
        self.metrics = metrics
        self.requests: dict[str, RequestState] = {}
        self.scheduler: Scheduler | None = None
        self.step_costs = StepCostModel(self.args.attention_cost_per_pair())  # paces prompt chunks (scheduler.py)
        # Request ids of the last steps sent, newest last: the ones whose tokens so far the ranks still remember
        # (see step.py on history).
        self._recent_steps: collections.deque[set[str]] = collections.deque(maxlen=config.steps_remembered())
        self.recomputed_tokens = 0  # computed K/V that recoveries threw away (raytp_recomputed_tokens)
        self._grammars: GrammarCompiler | None = None  # built on the first structured-output request
        self._grammar_masks: GrammarMasks | None = None
        self.supervisor = Supervisor(config, self.args, self.executor, self._use_new_kv_cache, metrics)

    # ---- the group (its policy is the supervisor's) ---------------------------------------

    def start(self) -> None:
        """Build the group at the target TP degree, or the largest smaller one that fits (degraded mode)."""
        self.supervisor.start()

    def _use_new_kv_cache(self, num_kv_blocks: int) -> None:
        self._recent_steps.clear()  # new ranks remember no step
        # A new cache is empty: a rebuilt group's requests find no cached prefix until they compute it again.
        blocks = KVCacheManager(num_kv_blocks, self.config.resolved_block_size(), self.config.enable_prefix_caching)
        if self.scheduler is None:
            budget = self.config.resolved_max_num_batched_tokens()
            self.scheduler = Scheduler(blocks, self.config.max_num_seqs, budget, self.max_model_len,
                                       self.step_costs.cost_per_pair, self.args.sliding_window, self.micro_batches,
                                       self.max_pending)
        else:
            self.scheduler.reset_blocks(blocks)

    def roll_back(self, lost: list[list[ScheduledSeq]]) -> None:
        """The steps in flight (in the order sent) failed with the group: their sequences go back to where they
        started, and the ranks (mended or new) remember no earlier step."""
        self.scheduler.roll_back(lost)
        self._recent_steps.clear()

    def preempt_all(self) -> None:
        """The KV cache is lost (the group is rebuilt): every running sequence is recomputed from its tokens."""
        recomputed = self.scheduler.preempt_all()
        self.recomputed_tokens += recomputed
        if self.metrics:
            self.metrics.on_recomputed(recomputed)

    def roll_back_failed(self, lost: list[list[ScheduledSeq]]) -> dict[str, str]:
        """A step failed with these steps in flight: roll them back, and single out the requests that were in every
        failed step past the recovery cap (the supervisor counts), each with the message that says why. The caller
        ends those; the others resume once the group is mended."""
        culprits = self.supervisor.note_failure({s.seq.request_id for batch in lost for s in batch})
        self.roll_back(lost)
        return {rid: f"request {rid} was in every one of the {self.config.max_recoveries + 1} steps that brought the "
                     f"TP group down within {self.config.recovery_window_s:g}s: it is failed alone, the other requests "
                     "go on" for rid in sorted(culprits & self.requests.keys())}

    def recover(self, failure: GroupFailure, lost: list[list[ScheduledSeq]]) -> list[RequestOutput]:
        """The group failed with these steps in flight: mend it (replace the lost ranks, or rebuild it) and resume
        every request, but for those roll_back_failed singles out: they end, aborted (finish_reason "abort"), and
        their outputs are returned (AsyncEngine._recover does the same off its event loop)."""
        ended = []
        for rid, why in self.roll_back_failed(lost).items():
            log.error("%s (finish_reason 'abort')", why)
            state = self.requests[rid]
            self.abort(rid)
            ended.append(self.output_processor.output(state))
        if not self.supervisor.replace(failure):
            self.preempt_all()
            if not self.supervisor.rebuild_stage(failure):
                self.supervisor.rebuild(str(failure))
        log.warning("%d requests resume", len(self.scheduler.running) + len(self.scheduler.waiting))
        return ended

    def shutdown(self) -> None:
        self.supervisor.shutdown()

    # ---- requests --------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> RequestState:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer (no tokenizer.json): send the prompt as token ids")
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, list(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        vocab = self.args.vocab_size
        if bad := self._not_token_ids(ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab}); got {bad[:5]}")
        for name, token_ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", params.logit_bias)):
            if bad := self._not_token_ids(token_ids):
                raise ValueError(f"{name} must hold token ids of this model, in [0, {vocab}); got {bad[:5]}")
        if len(ids) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"this model's maximum context length is {self.max_model_len} tokens; the prompt has {len(ids)} "
                f"tokens and max_tokens is {params.max_tokens}"
            )
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos and self.tokenizer is not None:
            stop_ids |= set(self.tokenizer.eos_token_ids)
        grammar = self._grammar_matcher(params)
        seq = Sequence(request_id, ids, params, prompt=text, stop_token_ids=frozenset(stop_ids))
        state = self.output_processor.new_request(seq)
        state.grammar = grammar
        self.requests[request_id] = state
        self.scheduler.add(seq)
        if self.metrics:
            self.metrics.on_admitted(len(ids))
        return state

    def _not_token_ids(self, ids) -> list:
        """The entries of ids that are not token ids of this model."""
        return [t for t in ids if not isinstance(t, int) or not 0 <= t < self.args.vocab_size]

    def _grammar_matcher(self, params: SamplingParams):
        """The request's grammar matcher (None without structured_outputs); GrammarError if it cannot compile."""
        if params.structured_outputs is None:
            return None
        if self.tokenizer is None:
            raise GrammarError("structured outputs need the model's tokenizer, and this model has none")
        if self._grammars is None:
            self._grammars = GrammarCompiler(self.tokenizer, self.args.vocab_size)
            self._grammar_masks = GrammarMasks(self.args.vocab_size)
        return self._grammars.matcher(params.structured_outputs)

    def abort(self, request_id: str) -> None:
        state = self.requests.pop(request_id, None)
        if state is not None and state.seq.status is not SeqStatus.FINISHED:
            self.scheduler.finish(state.seq, "abort")

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ---- the step: schedule, run, postprocess -----------------------------------------

    def schedule(self) -> list[ScheduledSeq]:
        batch = self.scheduler.schedule()
        if self.metrics:
            stats = self.scheduler.take_prefix_stats()
            self.metrics.on_prefix_cache(stats.queried_tokens, stats.hit_tokens)
        return batch

    def to_steps(self, batch: list[ScheduledSeq]) -> list[SeqStep]:
        """The step the ranks run next (called once per step, in the order steps are sent)."""
        steps = [self._to_step(s) for s in batch]
        self._add_grammar_masks(batch, steps)
        self._recent_steps.append({s.seq.request_id for s in batch})
        return steps

    def _add_grammar_masks(self, batch: list[ScheduledSeq], steps: list[SeqStep]) -> None:
        """Each row that samples for a request under a grammar gets its allowed tokens, all filled at once."""
        rows, matchers = [], []
        for i, s in enumerate(batch):
            state = self.requests.get(s.seq.request_id)
            if s.samples and state is not None and state.grammar is not None:
                if PREVIOUS_TOKEN in s.token_ids:
                    raise RuntimeError(f"{s.seq.request_id}: a grammar's mask needs the previous token, still in flight")
                rows.append(i)
                matchers.append(state.grammar)
        if matchers:
            for i, mask in zip(rows, self._grammar_masks.allowed_tokens(matchers)):
                steps[i].allowed_tokens = mask

    def _to_step(self, s: ScheduledSeq) -> SeqStep:
        seq, params = s.seq, s.seq.params
        prompt_len = len(seq.prompt_token_ids)
        step = SeqStep(s.token_ids, s.start, list(seq.block_table), params, s.num_generated, seq.request_id,
                       prompt_len=prompt_len)
        # The ranks kept only the recent steps' sequences; one just admitted may be one they remember from before a
        # preemption, whose history there ends short of where a cached prefix lets it start now.
        remembered = any(seq.request_id in ids for ids in self._recent_steps)
        if params.penalized and s.start > 0 and (s.admitted or not remembered):
            step.history = seq.token_ids[: s.start]
        if s.num_generated < params.min_tokens:
            step.banned_ids = tuple(seq.stop_token_ids)
        state = self.requests.get(seq.request_id)
        if state is not None and not state.prompt_logprobs_done() and s.start < prompt_len - 1:
            step.prompt_logprobs = True
            end = s.start + len(s.token_ids)
            step.lookahead = seq.prompt_token_ids[end] if end < prompt_len else None
        return step

    def step(self) -> list[RequestOutput]:
        batch = self.schedule()
        if not batch:
            return []
        try:
            result = self.executor.execute(self.to_steps(batch))
        except GroupFailure as err:
            return self.recover(err, [batch])
        return self.postprocess(batch, result)

    def postprocess(self, batch: list[ScheduledSeq], result: StepResult) -> list[RequestOutput]:
        """The step's tokens go to the scheduler (arrival, stop token, length), then through the output
        processor (text, stop strings) to one output per request that took a token."""
        now = time.monotonic()
        outputs = []
        sampled_logprobs = self._take_logprobs(batch, result)
        for seq, token in self.scheduler.update_from_output(batch, result.token_ids):
            state = self.requests[seq.request_id]
            if state.logprobs is not None:
                state.logprobs.append(sampled_logprobs[seq.request_id])
            self._record_token_time(state, now)
            if state.grammar is not None and seq.status is not SeqStatus.FINISHED:
                state.grammar.accept(token)
                if state.grammar.done:  # the JSON is complete: nothing may follow it
                    self.scheduler.finish(seq, "stop")
            stop = self.output_processor.add_token(state, token)
            if stop is not None:
                self.scheduler.finish(seq, "stop", stop)
            if seq.status is SeqStatus.FINISHED:
                self.requests.pop(seq.request_id, None)
                if self.metrics:
                    self.metrics.on_finished(seq.finish_reason, now - seq.arrival_time)
            outputs.append(self.output_processor.output(state))
        self._learn_step_cost(batch, result.step_seconds)
        if self.metrics:
            self.metrics.on_step(len(self.scheduler.running), len(self.scheduler.waiting), self.scheduler.blocks.usage(),
                                 result.collective_seconds, result.step_seconds)
            if result.expert_tokens is not None:
                self.metrics.on_expert_tokens(result.expert_tokens)
            if result.stage_compute_seconds is not None:
                self.metrics.on_stages(result.stage_compute_seconds, result.stage_sent_bytes)
        return outputs

    def _learn_step_cost(self, batch: list[ScheduledSeq], step_seconds: float) -> None:
        """What the step's prompt chunks' attention cost on the ranks goes into the pacing of the next steps
        (step_cost.py). A step of one-token rows (decodes, a prompt's last token) has no chunk pairs."""
        tokens = sum(len(s.token_ids) for s in batch)
        pairs = sum(chunk_pairs(s.start, len(s.token_ids), self.args.sliding_window) for s in batch
                    if len(s.token_ids) > 1)
        self.scheduler.attention_cost = self.step_costs.observe(tokens, pairs, step_seconds)

    def needs_tokens_first(self, batch: list[ScheduledSeq]) -> bool:
        """Whether a step in flight samples for a request under a grammar: its next mask needs that token, so the
        step must be back before the next one is scheduled (no scheduling ahead while such requests run)."""
        for s in batch:
            state = self.requests.get(s.seq.request_id)
            if s.samples and state is not None and state.grammar is not None:
                return True
        return False

    def _take_logprobs(self, batch: list[ScheduledSeq], result: StepResult) -> dict[str, TokenLogprob]:
        """Prompt logprobs go to their requests by position; returns the sampled tokens' by request id."""
        if result.logprobs is None:
            return {}
        for i, logprobs in result.logprobs.prompt.items():
            state = self.requests.get(batch[i].seq.request_id)
            if state is not None and state.prompt_logprobs is not None:
                first = batch[i].start + 1  # the chunk's first row predicts the token after its first one
                state.prompt_logprobs[first : first + len(logprobs)] = logprobs
        return {batch[i].seq.request_id: lp for i, lp in result.logprobs.sampled.items()}

    def _record_token_time(self, state: RequestState, now: float) -> None:
        seq = state.seq
        if state.first_token_time is None:
            state.first_token_time = now
            if self.metrics:
                self.metrics.on_first_token(now - seq.arrival_time, seq.first_scheduled_time - seq.arrival_time)
                self.metrics.on_tokens(1, None)
        elif self.metrics:
            self.metrics.on_tokens(1, now - state.last_token_time)
        state.last_token_time = now


class EngineNotReady(RuntimeError):
    """The TP group is starting or recovering; the server answers 503."""


class _Failed(Exception):
    """Ends the step loop: the group could not be rebuilt (AsyncEngine.failed says why)."""


class AsyncEngine:
    """Runs an EngineCore in the background of an asyncio loop; requests stream their outputs."""

    def __init__(self, config: EngineConfig, executor_factory: ExecutorFactory = ray_executor, metrics=None):
        self.core = EngineCore(config, executor_factory, metrics, steps_in_flight=True)
        self.config = config
        self.ready = False
        self._queues: dict[str, asyncio.Queue] = {}
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self.failed: str | None = None  # why the group cannot be rebuilt (a permanent error), once that happened
        self.pacer = StepPacer()
        self._replaying_since: float | None = None  # when a mended group started on the steps that were lost
        self._found_unhealthy: GroupFailure | None = None  # a failure the health check found, for the loop to mend
        self._unhealthy = asyncio.Event()  # set with _found_unhealthy: ends the wait for a step that will not finish

    @property
    def model_name(self) -> str:
        return self.core.model_name

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.core.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.core.args.vocab_size

    @property
    def tp_size(self) -> int:
        return self.core.executor.tp_size

    async def start(self) -> None:
        await asyncio.to_thread(self.core.start)
        if self.core.metrics:
            self.core.metrics.on_group(self.core.executor.tp_size, restarted=False,
                                       attention_backend=self.core.executor.attention_backend)
        self.ready = True
        self._loop_task = asyncio.create_task(self._run())

    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str) -> RequestStream:
        """Admit a request now (ValueError for bad input) and return the stream of its outputs; closing the
        stream before the request finished aborts it. Admission is synchronous, so a caller that checks
        `room()` and then adds requests without awaiting in between cannot be overtaken by another."""
        self.core.add_request(request_id, prompt, params)
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        self._wake.set()
        return RequestStream(self, request_id, queue)

    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str) -> AsyncIterator[RequestOutput]:
        """Stream the outputs of one request; closing the iterator early aborts it."""
        stream = self.add_request(prompt, params, request_id)
        try:
            async for out in stream:
                yield out
        finally:
            await stream.aclose()

    def request_limit(self) -> int | None:
        """Most unfinished requests: max_num_seqs + max_queued_requests (None: no limit)."""
        if self.config.max_queued_requests is None:
            return None
        return self.config.max_num_seqs + self.config.max_queued_requests

    def room(self) -> int | None:
        """How many more requests this replica takes now (None: no limit)."""
        limit = self.request_limit()
        return None if limit is None else max(0, limit - len(self.core.requests))

    def abort(self, request_id: str) -> None:
        self.core.abort(request_id)

    async def resize(self, tp_size: int) -> None:
        """Reshard the live replica to tp_size at the next step boundary; requests carry on."""
        if self.core.supervisor.request_resize(tp_size):
            self._wake.set()

    async def check_health(self) -> None:
        """EngineNotReady unless the group can run a step now. A rank found dead or hung here is recovered like one
        a step found (the step loop stops waiting on a step that needs the rank and mends the group), so the check
        reports not-ready (recovering), never a failure that Serve would answer by replacing the replica: only
        `failed` is one."""
        if self.failed:
            raise EngineNotReady(self.failed)
        if not self.ready:
            raise EngineNotReady("the TP group is not ready (starting or recovering)")
        group_before = self.core.supervisor.restarts
        try:
            await asyncio.to_thread(self.core.executor.check_health)
        except GroupFailure as err:
            if self.core.supervisor.restarts != group_before or not self.ready:
                # The group was mended (or is being) while the ranks were asked: the finding is about ranks that
                # are gone already, and acting on it would kill their healthy replacements.
                raise EngineNotReady(f"the TP group is recovering: {err}") from err
            log.warning("health check: %s; the group is mended now", err)
            self._found_unhealthy = err
            self._unhealthy.set()
            self._wake.set()
            raise EngineNotReady(f"the TP group is recovering: {err}") from err

    def _refresh_gauges(self) -> None:
        """While idle: gauges not set for a while drop out of Ray's export, so set them again."""
        metrics, sched = self.core.metrics, self.core.scheduler
        if metrics:
            metrics.set_load(len(sched.running), len(sched.waiting), sched.blocks.usage())
            metrics.on_group(self.tp_size, restarted=False, attention_backend=self.core.executor.attention_backend)

    async def _recover(self, failure: GroupFailure, lost: list[list[ScheduledSeq]]) -> None:
        """A step failed with these steps in flight (in the order sent): mend the group off the event loop, which
        keeps taking requests, and resume every request; the scheduler's state is only touched on the loop."""
        self.ready = False
        self._found_unhealthy = None  # whatever the health check found, this recovery mends
        self._unhealthy.clear()
        core = self.core
        for rid, why in core.roll_back_failed(lost).items():
            self._fail_request(rid, why)
        if await asyncio.to_thread(core.supervisor.replace, failure):
            self._replaying_since = time.monotonic()
            log.warning("%d requests resume on the mended group", len(core.scheduler.running) + len(core.scheduler.waiting))
            self.ready = True
            return
        self._replaying_since = None
        core.preempt_all()  # (on the loop's thread: the queues are only touched from here)
        if await asyncio.to_thread(core.supervisor.rebuild_stage, failure):
            log.warning("%d requests resume on the pipeline", len(core.scheduler.waiting))
            self.ready = True
        else:
            await self._rebuild(str(failure))

    async def _rebuild(self, reason: str, recovery: bool = True) -> None:
        """Rebuild the group off the event loop, which keeps taking requests, until it works; a permanent error
        fails every request with its message and leaves the engine failed (Serve then replaces the replica)."""
        self.ready = False
        self._replaying_since = None  # a rebuild recomputes everything: no replay of lost steps to time
        # On the loop thread: the queues are only ever touched from here.
        self.core.preempt_all()
        try:
            await self.core.supervisor.rebuild_until_done(reason, recovery)
        except Exception as err:  # noqa: BLE001 - permanent: retrying cannot help
            self._fail_all(f"the TP group cannot be rebuilt: {type(err).__name__}: {err}")
        log.warning("%d requests resume", len(self.core.scheduler.waiting))
        self.ready = True

    def _fail_request(self, request_id: str, message: str) -> None:
        queue = self._queues.get(request_id)
        if queue is not None:
            queue.put_nowait(RuntimeError(message))
        self.core.abort(request_id)

    def _fail_all(self, why: str) -> None:
        """A failure recovery cannot mend: every request fails with `why`, and the engine stays failed (its health
        check says so, and Serve replaces the replica)."""
        self.failed = why
        log.error("%s", why)
        for rid in list(self._queues):
            self._fail_request(rid, why)
        raise _Failed()

    async def _run(self) -> None:
        """The step loop. It sends step N+1 to the workers before it waits for step N's tokens (the workers then
        go straight from one step to the next), and postprocesses and streams step N while N+1 runs. It schedules
        N+1 as late as that allows (the pacer), so that requests arriving while N runs are in it. A pipeline keeps
        up to config.steps_in_flight() steps in flight, sent as soon as there is room: its micro-batches take turns,
        each stage working on one while the others work on theirs, and each micro-batch's next step is already
        queued at the first stage when the last stage sends it the tokens it needs."""
        core = self.core
        depth = self.config.steps_in_flight()
        paced = self.config.pipeline_parallel_size == 1
        in_flight: collections.deque[tuple[list[ScheduledSeq], Awaitable[StepResult]]] = collections.deque()
        while True:
            try:
                rebuild = core.supervisor.wanted_rebuild()
                if not in_flight:  # a step boundary with nothing running
                    if self._found_unhealthy is not None:
                        await self._recover(self._found_unhealthy, [])
                        continue
                    if rebuild is not None:
                        core.supervisor.take_rebuild()
                        await self._rebuild(rebuild, recovery=False)
                        continue
                    if not core.has_work():
                        self._refresh_gauges()
                        self._wake.clear()
                        try:
                            await asyncio.wait_for(self._wake.wait(), timeout=core.supervisor.grow_check_interval_s)
                        except asyncio.TimeoutError:
                            pass
                        continue
                # While a rebuild waits, no new step starts: the ones in flight drain. So does a step whose
                # tokens a grammar needs before the next step's masks can be made.
                drain = rebuild is not None or any(core.needs_tokens_first(batch) for batch, _ in in_flight)
                if paced and in_flight and not drain and core.scheduler.has_room_for_arrivals():
                    # Requests that arrive meanwhile make it into the next step. (When they could not, because
                    # others wait ahead of them or the batch is full, waiting would only idle the ranks.)
                    await self.pacer.wait_for_slot(in_flight[-1][1])
                batch = core.schedule() if not drain else []
                if batch:
                    in_flight.append((batch, asyncio.ensure_future(core.executor.submit(core.to_steps(batch)))))
                    self.pacer.sent(sum(len(s.token_ids) for s in batch))
                if not in_flight:
                    await asyncio.sleep(0.005)  # nothing can run yet (e.g. waiting for free blocks)
                    continue
                if batch and len(in_flight) < depth:
                    continue  # room for another step in flight: schedule it now
                done_batch, done_step = in_flight.popleft()
                try:
                    result = await self._step_result(done_step)
                except GroupFailure as err:
                    lost = [done_batch] + [batch for batch, _ in in_flight]
                    _discard(in_flight)
                    self.pacer.forget()
                    await self._recover(err, lost)
                    continue
                self.pacer.done(result.lead_seconds)
                if self._replaying_since is not None:  # the first step after a replacement replayed the lost ones
                    replay_s, self._replaying_since = time.monotonic() - self._replaying_since, None
                    log.warning("the mended group replayed the lost steps in %.0f ms (%d rows)", replay_s * 1e3,
                                len(done_batch))
                    if core.metrics:
                        core.metrics.on_replay(replay_s)
                for out in core.postprocess(done_batch, result):
                    queue = self._queues.get(out.request_id)
                    if queue is not None:
                        queue.put_nowait(out)
            except asyncio.CancelledError:
                _discard(in_flight)
                raise
            except _Failed:
                _discard(in_flight)
                return
            except Exception as err:  # a bug or an unrecoverable group: fail the requests, keep serving
                log.exception("engine step failed")
                _discard(in_flight)
                self.pacer.forget()
                for rid, queue in list(self._queues.items()):
                    queue.put_nowait(RuntimeError(f"engine error: {err}"))
                    core.abort(rid)
                await asyncio.sleep(1.0)

    async def _step_result(self, step: asyncio.Future) -> StepResult:
        """The step's result, or GroupFailure: the step's own (a rank died, or the watchdog found one hung) or what
        the health check found meanwhile (a rank that does not answer its ping), whichever comes first. Either is
        mended the same way; waiting on for the watchdog would only lengthen the pause."""
        found = asyncio.ensure_future(self._unhealthy.wait())
        try:
            await asyncio.wait({step, found}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            found.cancel()
        if step.done():
            return step.result()
        _drop(step)
        raise self._found_unhealthy

    async def shutdown(self) -> None:
        """Stop stepping and release the group (workers, placement group, shared memory). Streams still open get
        a clear error now instead of hanging until the replica's process is gone."""
        if self._loop_task is not None:
            self._loop_task.cancel()
        self.ready = False
        for rid in list(self._queues):
            self._fail_request(rid, "the server is shutting down this replica: the request was not finished; retry it")
        await asyncio.to_thread(self.core.shutdown)


class RequestStream:
    """The outputs of one admitted request, as an async iterator; aclose() before the end aborts the request."""

    def __init__(self, engine: AsyncEngine, request_id: str, queue: asyncio.Queue):
        self._engine, self.request_id, self._queue = engine, request_id, queue
        self._finished = self._closed = False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._finished or self._closed:
            raise StopAsyncIteration
        out = await self._queue.get()
        if isinstance(out, BaseException):
            await self.aclose()
            raise out
        if out.finished:
            self._finished = True
            self._engine._queues.pop(self.request_id, None)
        return out

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._engine._queues.pop(self.request_id, None)
        if not self._finished:
            self._engine.core.abort(self.request_id)


def _drop(step: Awaitable[StepResult]) -> None:
    """Drop a submitted step whose result is no longer wanted (its group failed, or the loop stops)."""
    step = asyncio.ensure_future(step)
    step.cancel()
    step.add_done_callback(lambda f: f.cancelled() or f.exception())  # no "exception never retrieved"


def _discard(in_flight: collections.deque) -> None:
    """Drop every step in flight, (batch, step) pairs, emptying the deque."""
    while in_flight:
        _drop(in_flight.popleft()[1])
