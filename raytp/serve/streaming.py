"""Running a request's prompts on the engine and turning their outputs into an HTTP answer.

`start_requests` admits every prompt of one HTTP request (all or nothing),
`merge` interleaves their outputs as they come, `sse_events` renders them
as an SSE body and `collect` waits for the final outputs. Closing any of
these generators aborts the engine's requests, which frees their KV blocks.
"""
from __future__ import annotations

import asyncio
import json
import logging
from contextlib import aclosing
from typing import TYPE_CHECKING, AsyncIterator, Callable

from fastapi import Request

from raytp.outputs import RequestOutput
from raytp.sampling import SamplingParams
from raytp.serve.protocol import APIError, bad_request, too_many_requests

if TYPE_CHECKING:
    from raytp.engine.engine import AsyncEngine

log = logging.getLogger(__name__)


async def start_requests(engine: AsyncEngine, requests: list[tuple[list[int], SamplingParams]],
                         base_id: str) -> list[tuple[AsyncIterator[RequestOutput], RequestOutput]]:
    """Admit every (prompt, params) of one HTTP request and wait for its first output; all or nothing.

    Admission happens without an await in between, so the queue cap holds
    under concurrency: past it the whole HTTP request is a 429 (and nothing
    admitted is touched). Bad input raises here, before any response has been
    sent. Closing a stream (or cancelling the task that iterates it) aborts
    its request.
    """
    room, limit = engine.room(), engine.request_limit()
    if limit is not None and len(requests) > limit:
        raise bad_request(f"this request needs {len(requests)} sequences (prompts x n); a replica holds at most "
                          f"{limit} (max_num_seqs + max_queued_requests)", "n")
    if room is not None and len(requests) > room:
        raise too_many_requests(f"this replica is at its queue limit (max_num_seqs={engine.config.max_num_seqs} "
                                f"running + max_queued_requests={engine.config.max_queued_requests} waiting); "
                                f"retry shortly")
    streams = []
    try:
        for i, (ids, params) in enumerate(requests):
            streams.append(engine.add_request(ids, params, f"{base_id}-{i}"))
        firsts = await asyncio.gather(*(s.__anext__() for s in streams), return_exceptions=True)
    except BaseException:
        await _close_all(streams)
        raise
    errors = [r for r in firsts if isinstance(r, BaseException)]
    if errors:
        await _close_all(streams)
        raise errors[0]
    return list(zip(streams, firsts))


async def _close_all(streams) -> None:
    await asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True)


async def merge(started) -> AsyncIterator[list[tuple[int, RequestOutput]]]:
    """Interleave the outputs of started requests as they come: lists of (prompt index, output), each list
    everything that is ready at that moment (one output, or several when the consumer fell behind).

    Closing this generator (or cancelling its consumer) cancels the pumps,
    which closes the engine's generators: their requests are aborted.
    """
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i, gen, first):
        try:
            queue.put_nowait((i, first))
            if not first.finished:
                async for out in gen:
                    queue.put_nowait((i, out))
        except Exception as err:
            queue.put_nowait((i, err))
        finally:
            await gen.aclose()
            queue.put_nowait((i, done))

    tasks = [asyncio.ensure_future(pump(i, g, first)) for i, (g, first) in enumerate(started)]
    remaining = len(tasks)
    try:
        while remaining:
            items = [await queue.get()]
            while not queue.empty():
                items.append(queue.get_nowait())
            ready, error = [], None
            for i, item in items:
                if item is done:
                    remaining -= 1
                elif isinstance(item, Exception):
                    error = error or item
                elif error is None:  # nothing after a failure goes out
                    ready.append((i, item))
            if ready:
                yield ready
            if error is not None:
                raise error
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def sse_events(request: Request, rid: str, started, render: Callable[[int, RequestOutput], str],
                     tail: Callable[[int], str | None], head: str | None = None) -> AsyncIterator[str]:
    """The SSE body of a streamed answer: chunks as outputs arrive, the usage chunk, then [DONE].

    Outputs that are ready together go out as one body part (one message
    through Serve's proxy instead of several): when the server falls behind
    under load, that is what lets it catch up.

    A client that goes away aborts its requests: Starlette cancels this
    generator (or the check between parts sees it), and closing the merged
    stream closes the engine's generators, which frees the KV blocks.
    """
    generated = [0] * len(started)
    try:
        if head is not None:
            yield head
        async with aclosing(merge(started)) as stream:
            async for ready in stream:
                events = []
                for i, out in ready:
                    generated[i] = len(out.outputs[0].token_ids)
                    # A chunk per new token, even while its text is held back (or the model has no tokenizer).
                    if out.delta_text or out.delta_token_ids or out.finished:
                        events.append(render(i, out))
                if events:
                    yield "".join(events)
                if await request.is_disconnected():
                    log.info("client went away: aborting %s", rid)
                    return
        last = tail(sum(generated))  # the usage chunk, if asked for
        if last is not None:
            yield last
    except Exception as err:
        yield _stream_error(err)
    yield sse("[DONE]")


async def collect(started) -> list[RequestOutput]:
    """Run started requests to the end; returns each one's final output."""
    finals = [first for _, first in started]
    async with aclosing(merge(started)) as stream:
        async for ready in stream:
            for i, out in ready:
                finals[i] = out
    return finals


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def _stream_error(err: BaseException) -> str:
    log.exception("request failed while streaming", exc_info=err)
    return sse(APIError(500, f"generation failed: {err}", "server_error").body())
