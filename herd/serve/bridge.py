"""From the engine thread to asyncio: run several engine requests (the choices of one HTTP
request) and yield their events in order of arrival; leaving early cancels them all."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

from herd.engine import Engine, Event, Request


async def run_requests(engine: Engine, requests: list[Request],
                       disconnected: Callable[[], Awaitable[bool]] | None = None) -> AsyncIterator[tuple[int, Event, object]]:
    """Yield (choice index, event, handle) until every request has finished. `disconnected` is
    polled while waiting (non-streaming responses, where nothing else notices a client leaving);
    when it says so, or when the consumer stops iterating, every request is cancelled."""
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
            if event.finish_reason is not None:
                remaining -= 1
            yield i, event, handles[i]
    finally:
        for h in handles:
            h.cancel()
