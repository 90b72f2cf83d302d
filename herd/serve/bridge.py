"""From the engine thread to asyncio: run several engine requests (the choices of one HTTP
request) and yield their events in order of arrival; leaving early cancels them all."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

from herd.engine import Engine, EngineStopped, Event, Request
from herd.errors import HerdError
from herd.serve.errors import APIError, from_herd_error


async def run_requests(engine: Engine, requests: list[Request],
                       disconnected: Callable[[], Awaitable[bool]] | None = None) -> AsyncIterator[tuple[int, Event, object]]:
    """Yield (choice index, event, handle) until every request has finished. `disconnected` is
    polled while waiting (non-streaming responses, where nothing else notices a client leaving);
    when it says so, or when the consumer stops iterating, every request is cancelled. Raises
    EngineStopped when the server shuts down first, and a 400 for more requests than the engine
    ever takes at once (waiting would not help)."""
    room = engine.n_slots + engine.max_queue
    if len(requests) > room:
        raise APIError(400, f"{len(requests)} choices (n times the prompts) are more than this server ever takes at "
                            f"once ({engine.n_slots} running and {engine.max_queue} waiting)", param="n")
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    handles = []
    def deliver(i: int, event: Event) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (i, event))
        except RuntimeError:  # the event loop has closed (shutdown): nobody is listening
            pass

    try:
        for i, r in enumerate(requests):
            r.on_event = lambda ev, i=i: deliver(i, ev)
            handles.append(engine.submit(r))
        remaining = len(handles)
        while remaining:
            try:
                i, event = await asyncio.wait_for(queue.get(), timeout=0.5)
            except TimeoutError:
                if disconnected is not None and await disconnected():
                    return
                continue
            if event.finish_reason == "shutdown":
                raise EngineStopped("the server is shutting down")
            if event.finish_reason is not None:
                remaining -= 1
            yield i, event, handles[i]
    finally:
        for h in handles:
            h.cancel()


async def started(events: AsyncIterator) -> AsyncIterator:
    """`events` with the first one awaited now, before a response starts, so that a request the
    engine refuses (queue full, shutting down) still gets its status code."""
    try:
        first = await anext(events)
    except HerdError as e:
        raise from_herd_error(e) from None

    async def chained():
        yield first
        async for item in events:
            yield item

    return chained()
